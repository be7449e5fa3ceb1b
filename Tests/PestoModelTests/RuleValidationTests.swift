// SPDX-License-Identifier: GPL-2.0-or-later

// Every validation failure has its own message; every accepted shape is accepted.

import PestoTestSupport
import Testing

@testable import PestoModel

@Suite("Rule validation")
struct RuleValidationTests {
    @Test("source client: only where the table allows it, for TCP, without proxy-protocol")
    func clientSource() throws {
        let all = Self.all
        try Rule(proto: .tcp, firstPort: 80, source: .client).validate(capabilities: all, clientSource: true)
        try Rule(proto: .udp, firstPort: 53, source: .client).validate(capabilities: all, clientSource: true)
        try Rule(proto: .tcp, firstPort: 80).validate(capabilities: all, clientSource: false)
        for (rule, fragment) in [
            (Rule(proto: .tcp, firstPort: 80, proxyProtocol: .v1, source: .client), "do not combine")
        ] {
            #expect(throws: PestoError.self) { try rule.validate(capabilities: all, clientSource: true) }
            do {
                try rule.validate(capabilities: all, clientSource: true)
            } catch {
                #expect(error.code == .invalidRule && error.message.contains(fragment), "\(error.message)")
            }
        }
        #expect(try ConnectionSource(parsing: "") == .pestod)
        #expect(try ConnectionSource(parsing: "client") == .client)
        #expect(throws: PestoError.self) { try ConnectionSource(parsing: "Client") }
    }

    static let all: Capabilities = [.ipv4, .ipv6, .tcp, .udp, .scan, .ifname]

    static func ip(_ s: String) -> IPAddress { IPAddress(s)! }

    /// (rule, capabilities, a fragment the message must contain).
    static let rejected: [(Rule, Capabilities, String)] = [
        (Rule(proto: .tcp, firstPort: 0), all, "first-port must be between 1 and 65535, not 0"),
        (Rule(proto: .udp, firstPort: 53, proxyProtocol: .v2), all, "proxy-protocol \"v2\" is for TCP rules only"),
        (Rule(proto: .udp, firstPort: 53, proxyProtocol: .v1), all, "proxy-protocol \"v1\" is for TCP rules only"),
        (Rule(proto: .tcp, firstPort: 80, source: .client), all, "source \"client\" needs a target inside the network namespace"),
        (Rule(proto: .tcp, firstPort: 80, lastPort: 0), all, "last-port must be between 1 and 65535, not 0"),
        (Rule(proto: .tcp, firstPort: 90, lastPort: 80), all, "last-port 80 is below first-port 90"),
        (Rule(proto: .tcp, firstPort: 80, targetPort: 0), all, "target-port must be between 1 and 65535, not 0"),
        (Rule(proto: .udp, firstPort: 100, lastPort: 200, targetPort: 65500), all, "target ports 65500-65600 pass 65535"),
        (Rule(proto: .tcp, address: ip("224.0.0.1"), firstPort: 80), all, "address 224.0.0.1 is a multicast address"),
        (Rule(proto: .tcp, firstPort: 80, targetAddress: ip("10.0.0.1")), all, "a dual-stack rule (no address)"),
        (
            Rule(proto: .tcp, address: ip("::1"), firstPort: 80, targetAddress: ip("10.0.0.1")), all,
            "target-address 10.0.0.1 is IPv4 but address ::1 is IPv6"
        ),
        (
            Rule(proto: .tcp, address: ip("0.0.0.0"), firstPort: 80, targetAddress: ip("239.1.1.1")), all,
            "target-address 239.1.1.1 is a multicast address"
        ),
        (
            Rule(proto: .tcp, address: ip("::"), firstPort: 80, targetAddress: ip("ff02::1")), all,
            "target-address ff02::1 is a multicast address"
        ),
        (
            Rule(proto: .udp, address: ip("0.0.0.0"), firstPort: 80, targetAddress: ip("255.255.255.255")), all,
            "target-address 255.255.255.255 is the broadcast address; a connection or flow needs one unicast target."
        ),
        (
            Rule(proto: .tcp, address: ip("0.0.0.0"), firstPort: 80, targetAddress: ip("0.0.0.0")), all,
            "target-address 0.0.0.0 is a wildcard address"
        ),
        (Rule(proto: .tcp, interface: "abcdefghijklmnop", firstPort: 80), all, "is 16 bytes long; at most 15"),
        (Rule(proto: .tcp, interface: ".", firstPort: 80), all, "interface \".\" is not a valid interface name"),
        (Rule(proto: .tcp, interface: "..", firstPort: 80), all, "interface \"..\" is not a valid interface name"),
        (Rule(proto: .tcp, interface: "eth/0", firstPort: 80), all, "contains \"/\""),
        (Rule(proto: .tcp, interface: "eth 0", firstPort: 80), all, "contains a space"),
        (
            Rule(proto: .tcp, interface: String(repeating: "n", count: 1 << 20), firstPort: 80), all,
            "interface \"\(String(repeating: "n", count: 64))\"…(1048576 bytes) is 1048576 bytes long; at most 15"
        ),
        (Rule(proto: .tcp, interface: "a\nb", firstPort: 80), all, "interface \"a\\nb\" contains the control character 0xa"),
        (Rule(proto: .tcp, firstPort: 80, owner: String(repeating: "x", count: 256)), all, "owner is 256 bytes long"),
        (Rule(proto: .tcp, firstPort: 80), [.udp, .ipv4], "lacks the tcp capability"),
        (Rule(proto: .udp, firstPort: 80), [.tcp, .ipv4], "lacks the udp capability"),
        (Rule(proto: .tcp, address: ip("127.0.0.1"), firstPort: 80), [.tcp, .ipv6], "lacks the ipv4 capability"),
        (Rule(proto: .tcp, address: ip("::1"), firstPort: 80), [.tcp, .ipv4], "lacks the ipv6 capability"),
        (Rule(proto: .tcp, firstPort: 80), [.tcp], "neither the ipv4 nor the ipv6 capability"),
        (Rule(proto: .tcp, interface: "lo", firstPort: 80), [.tcp, .ipv4], "lacks the ifname capability"),
        (Rule(proto: .tcp, firstPort: 80, scan: true), [.tcp, .ipv4], "lacks the scan capability"),
    ]

    @Test("each invalid rule is rejected with its own message", arguments: rejected.indices)
    func rejects(_ i: Int) {
        let (rule, caps, fragment) = Self.rejected[i]
        #expect {
            try rule.validate(capabilities: caps)
        } throws: { error in
            guard let e = error as? PestoError else { return false }
            return e.code == .invalidRule && e.message.contains(fragment)
        }
    }

    @Test("the messages are all different")
    func distinctMessages() {
        var messages = Set<String>()
        for (rule, caps, _) in Self.rejected {
            do { try rule.validate(capabilities: caps) } catch { messages.insert(error.message) }
        }
        #expect(messages.count == Self.rejected.count)
    }

    @Test("valid shapes are accepted")
    func accepts() throws {
        let ok: [Rule] = [
            Rule(proto: .tcp, firstPort: 1, lastPort: 65535),
            Rule(proto: .udp, firstPort: 65535),
            Rule(proto: .tcp, address: Self.ip("127.0.0.1"), firstPort: 80, targetAddress: Self.ip("10.1.2.3"), targetPort: 8080),
            Rule(proto: .tcp, address: Self.ip("::"), firstPort: 80, lastPort: 90, targetAddress: Self.ip("fd00::1"), targetPort: 65525),
            Rule(proto: .tcp, interface: "eth0", firstPort: 22, owner: String(repeating: "o", count: 255)),
            Rule(proto: .tcp, interface: "fifteen-bytes-x", firstPort: 22),
            Rule(proto: .udp, firstPort: 1000, lastPort: 2000, scan: true),
        ]
        for rule in ok { try rule.validate(capabilities: Self.all) }
        #expect(ok[2].targetPort(for: 80) == 8080)
        #expect(ok[3].targetPort(for: 90) == 65535)
    }

    @Test("client strings are quoted escaped and cut to 64 scalars with their full length")
    func quoting() {
        #expect(ClientText.quote("eth0") == "\"eth0\"")
        #expect(ClientText.quote("a\"b\\c\nd\u{7}") == "\"a\\\"b\\\\c\\nd\\u{7}\"")
        let sixtyFour = String(repeating: "é", count: 64)
        #expect(ClientText.quote(sixtyFour) == "\"\(sixtyFour)\"")
        #expect(ClientText.quote(sixtyFour + "x") == "\"\(sixtyFour)\"…(129 bytes)")
        #expect(ClientText.quote(String(repeating: "x", count: 1 << 20)).utf8.count < 100)
    }

    @Test("protocol names")
    func protocolParsing() throws {
        #expect(try TransportProtocol(parsing: "tcp") == .tcp)
        #expect(try TransportProtocol(parsing: "udp") == .udp)
        #expect(throws: PestoError(.invalidRule, "protocol must be \"tcp\" or \"udp\", not \"sctp\".")) {
            try TransportProtocol(parsing: "sctp")
        }
    }

    @Test("capability names follow the contract")
    func capabilityNames() {
        #expect(Self.all.names == ["ipv4", "ipv6", "tcp", "udp", "scan", "ifname"])
        #expect(Self.all.rawValue == 0x3F)
    }
}

@Suite("IP addresses")
struct IPAddressTests {
    @Test("parse and print")
    func roundTrip() {
        for text in ["127.0.0.1", "0.0.0.0", "255.255.255.255", "::", "::1", "fe80::1", "2001:db8::42", "ff02::1"] {
            #expect(IPAddress(text)?.description == text)
        }
        #expect(IPAddress("::ffff:192.0.2.1") == IPAddress("192.0.2.1"))
        for bad in ["", "1.2.3", "1.2.3.256", "::g", "[::1]", "localhost", "1.2.3.4%lo"] {
            #expect(IPAddress(bad) == nil, "\(bad)")
        }
    }

    @Test("classification")
    func classes() {
        #expect(IPAddress("224.0.0.1")!.isMulticast)
        #expect(IPAddress("239.255.255.255")!.isMulticast)
        #expect(!IPAddress("223.255.255.255")!.isMulticast)
        #expect(IPAddress("ff05::2")!.isMulticast)
        #expect(!IPAddress("fe80::2")!.isMulticast)
        #expect(IPAddress("0.0.0.0")!.isUnspecified && IPAddress("::")!.isUnspecified)
        #expect(IPAddress("10.0.0.1")!.family == .ipv4 && IPAddress("::2")!.family == .ipv6)
    }
}

@Suite("Conflicts")
struct ConflictTests {
    func r(_ address: String?, _ first: UInt16, _ last: UInt16, _ iface: String = "", proto: TransportProtocol = .tcp) -> Rule {
        Rule(proto: proto, address: address.map { IPAddress($0)! }, interface: iface, firstPort: first, lastPort: last)
    }

    @Test("conflict matrix")
    func matrix() {
        let cases: [(Rule, Rule, Bool, String)] = [
            (r(nil, 80, 90), r(nil, 90, 100), true, "overlapping ranges"),
            (r(nil, 80, 90), r(nil, 91, 100), false, "adjacent ranges"),
            (r(nil, 80, 80), r(nil, 80, 80, proto: .udp), false, "different protocols"),
            (r(nil, 80, 80), r("127.0.0.1", 80, 80), true, "dual stack matches IPv4"),
            (r(nil, 80, 80), r("::1", 80, 80), true, "dual stack matches IPv6"),
            (r("0.0.0.0", 80, 80), r("127.0.0.1", 80, 80), true, "IPv4 wildcard matches its family"),
            (r("0.0.0.0", 80, 80), r("::1", 80, 80), false, "IPv4 wildcard does not match IPv6"),
            (r("::", 80, 80), r("::1", 80, 80), true, "IPv6 wildcard matches its family"),
            (r("::", 80, 80), r("0.0.0.0", 80, 80), false, "IPv6 wildcard does not match IPv4"),
            (r("127.0.0.1", 80, 80), r("127.0.0.2", 80, 80), false, "different specific addresses"),
            (r("127.0.0.1", 80, 80), r("127.0.0.1", 70, 80), true, "same specific address"),
            (r(nil, 80, 80, "eth0"), r(nil, 80, 80, "eth1"), false, "different interfaces"),
            (r(nil, 80, 80, "eth0"), r(nil, 80, 80), true, "interface vs none"),
            (r(nil, 80, 80, "eth0"), r(nil, 80, 80, "eth0"), true, "same interface"),
        ]
        for (a, b, expected, what) in cases {
            #expect(a.conflicts(with: b) == expected, "\(what)")
            #expect(b.conflicts(with: a) == expected, "\(what), reversed")
        }
    }
}

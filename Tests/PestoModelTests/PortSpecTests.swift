// SPDX-License-Identifier: GPL-2.0-or-later

// PortSpec: every example of pasta's man page (passt.1, "-t, --tcp-ports spec", which -u, -T
// and -U refer to) parses to the exact rules; every error names its bad piece; the ephemeral
// port range is read from the sysctl file or falls back.

import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoModel

#if canImport(Glibc)
    import Glibc
#endif

/// One expected rule, without the protocol (each example runs for TCP and UDP).
struct ExpectedRule: Sendable {
    var first: UInt16
    var last: UInt16
    var to: UInt16
    var address: String? = nil
    var interface: String = ""
    var target: String? = nil
    var scan: Bool = false

    /// The rule for `proto`.
    func rule(_ proto: TransportProtocol) -> Rule {
        Rule(
            proto: proto, address: address.map { IPAddress($0)! }, interface: interface, firstPort: first,
            lastPort: last, targetAddress: target.map { IPAddress($0)! }, targetPort: to, scan: scan)
    }
}

/// A spec and what it must parse to.
struct SpecExample: Sendable, CustomTestStringConvertible {
    var spec: String
    var rules: [ExpectedRule]
    var bestEffort: Bool = false
    var isNone: Bool = false

    var testDescription: String { "\"\(spec)\"" }
}

/// Shorthand: ports `first...last` to `to...` with optional fields.
private func r(
    _ first: UInt16, _ last: UInt16? = nil, to: UInt16? = nil, addr: String? = nil, ifname: String = "",
    target: String? = nil, scan: Bool = false
) -> ExpectedRule {
    ExpectedRule(
        first: first, last: last ?? first, to: to ?? first, address: addr, interface: ifname,
        target: target, scan: scan)
}

/// The non-ephemeral ports with the fixed test range 32768-60999 left out.
private func nonEphemeral(addr: String? = nil, ifname: String = "", scan: Bool = false) -> [ExpectedRule] {
    [r(1, 32767, addr: addr, ifname: ifname, scan: scan), r(61000, 65535, addr: addr, ifname: ifname, scan: scan)]
}

@Suite("Port spec")
struct PortSpecTests {
    /// Tests never use the host's range.
    static let ephemeral: ClosedRange<UInt16> = 32768...60999

    // MARK: - The man page's examples

    /// passt.1 (passt upstream, -t/--tcp-ports; -u, -T, -U: "spec is as described for TCP above").
    static let manPage: [SpecExample] = [
        // ".BR none  Don't forward any ports"
        SpecExample(spec: "none", rules: [], isNone: true),
        // "-t all  Forward all unbound, non-ephemeral ports as permitted by current capabilities to the
        //  corresponding port on the guest or namespace"
        SpecExample(spec: "all", rules: nonEphemeral(), bestEffort: true),
        // "-t ::1/all  For the local address ::1, forward all unbound, non-ephemeral ports as permitted by
        //  current capabilities"
        SpecExample(spec: "::1/all", rules: nonEphemeral(addr: "::1"), bestEffort: true),
        // "-t 22  Forward local port 22 to port 22 on the guest or namespace"
        SpecExample(spec: "22", rules: [r(22)]),
        // "-t 22:23  Forward local port 22 to port 23 on the guest or namespace"
        SpecExample(spec: "22:23", rules: [r(22, to: 23)]),
        // "-t 22,25  Forward local ports 22 and 25 to ports 22 and 25 on the guest or namespace"
        SpecExample(spec: "22,25", rules: [r(22), r(25)]),
        // "-t 22-80  Forward local ports between 22 and 80 to corresponding ports on the guest or namespace"
        SpecExample(spec: "22-80", rules: [r(22, 80)]),
        // "-t 22-80:32-90  Forward local ports between 22 and 80 to ports between 32 and 90 on the guest or
        //  namespace"
        SpecExample(spec: "22-80:32-90", rules: [r(22, 80, to: 32)]),
        // "-t 192.0.2.1/22  Forward local port 22, bound to 192.0.2.1, to port 22 on the guest or namespace"
        SpecExample(spec: "192.0.2.1/22", rules: [r(22, addr: "192.0.2.1")]),
        // "-t 192.0.2.1%eth0/22  Forward local port 22, bound to 192.0.2.1 and interface eth0, to port 22"
        SpecExample(spec: "192.0.2.1%eth0/22", rules: [r(22, addr: "192.0.2.1", ifname: "eth0")]),
        // "-t %eth0/22  Forward local port 22, bound to any address on interface eth0, to port 22"
        SpecExample(spec: "%eth0/22", rules: [r(22, ifname: "eth0")]),
        // "-t 2000-5000,~3000-3010  Forward local ports between 2000 and 5000, except for those between 3000
        //  and 3010"
        SpecExample(spec: "2000-5000,~3000-3010", rules: [r(2000, 2999), r(3011, 5000)]),
        // "-t 192.0.2.1/20-30,~25  For the local address 192.0.2.1, forward ports between 20 and 24 and
        //  between 26 and 30"
        SpecExample(spec: "192.0.2.1/20-30,~25", rules: [r(20, 24, addr: "192.0.2.1"), r(26, 30, addr: "192.0.2.1")]),
        // "-t ~20000-20010  Forward all ports to the guest, except for the range from 20000 to 20010"
        // ("Specifying excluded ranges only implies that all other non-ephemeral ports are forwarded.")
        SpecExample(spec: "~20000-20010", rules: [r(1, 19999), r(20011, 32767), r(61000, 65535)], bestEffort: true),
        // "-t auto  Automatically forward any ports which are bound in the namespace"
        SpecExample(spec: "auto", rules: nonEphemeral(scan: true), bestEffort: true),
        // "-t ::1/auto  Automatically forward any ports which are bound in the namespace, listening only on
        //  local port ::1"
        SpecExample(spec: "::1/auto", rules: nonEphemeral(addr: "::1", scan: true), bestEffort: true),
        // "-t 8000-8010,auto  Forward ports in the range 8000-8010 if and only if they are bound in the
        //  namespace"
        SpecExample(spec: "8000-8010,auto", rules: [r(8000, 8010, scan: true)]),
    ]

    /// The same examples as passt's --help text words them (conf.c, usage()).
    static let usageText: [SpecExample] = [
        // "-t 192.0.2.1/5  Bind port 5 of 192.0.2.1 to guest"
        SpecExample(spec: "192.0.2.1/5", rules: [r(5, addr: "192.0.2.1")]),
        // "-t 5-25,~10-20  Forward ports 5 to 9, and 21 to 25"
        SpecExample(spec: "5-25,~10-20", rules: [r(5, 9), r(21, 25)]),
        // "-t ~25  Forward all ports except for 25"
        SpecExample(spec: "~25", rules: [r(1, 24), r(26, 32767), r(61000, 65535)], bestEffort: true),
    ]

    /// Forms beyond the man page: brackets, wildcards, target addresses, order. Every verdict
    /// here is upstream pesto's (the port spec table of doc/pesto-conformance.md has them all,
    /// checked by PortSpecConformanceTests); these check the Rule values themselves.
    static let extensions: [SpecExample] = [
        SpecExample(spec: "[::1]/22", rules: [r(22, addr: "::1")]),
        SpecExample(spec: "[fe80::1]%eth0/22", rules: [r(22, addr: "fe80::1", ifname: "eth0")]),
        SpecExample(spec: "[192.0.2.1]/22", rules: [r(22, addr: "192.0.2.1")]),
        SpecExample(spec: "*/22", rules: [r(22)]),
        SpecExample(spec: "/22", rules: [r(22)]),
        SpecExample(spec: "0.0.0.0/22", rules: [r(22, addr: "0.0.0.0")]),
        SpecExample(spec: "::/22", rules: [r(22, addr: "::")]),
        SpecExample(spec: "all,~25", rules: [r(1, 24), r(26, 32767), r(61000, 65535)], bestEffort: true),
        SpecExample(spec: "all,22", rules: [r(22)]),
        SpecExample(
            spec: "auto,~25", rules: [r(1, 24, scan: true), r(26, 32767, scan: true), r(61000, 65535, scan: true)],
            bestEffort: true),
        SpecExample(spec: "~22,20-25", rules: [r(20, 21), r(23, 25)]),
        SpecExample(spec: "100-110:200-210,~105", rules: [r(100, 104, to: 200), r(106, 110, to: 206)]),
        // Not merged, in the order given, as upstream makes them.
        SpecExample(spec: "81,80", rules: [r(81), r(80)]),
        SpecExample(spec: "80:90,81:91", rules: [r(80, to: 90), r(81, to: 91)]),
        SpecExample(spec: "30-40,20-29,41", rules: [r(30, 40), r(20, 29), r(41)]),
        SpecExample(spec: "20-30,25,~25", rules: [r(20, 24), r(26, 30)]),
        SpecExample(spec: "22,~22", rules: []),
        SpecExample(spec: "~1-65535", rules: [], bestEffort: true),
        // strtoul(3) numbers.
        SpecExample(spec: " 22", rules: [r(22)]),
        SpecExample(spec: "+22", rules: [r(22)]),
        SpecExample(spec: "022", rules: [r(22)]),
        // Target addresses need a listening address of their family; a wildcard target is none.
        SpecExample(spec: "0.0.0.0/8080:10.88.0.2/80", rules: [r(8080, to: 80, addr: "0.0.0.0", target: "10.88.0.2")]),
        SpecExample(spec: "[::]/8080:fd00::2/80", rules: [r(8080, to: 80, addr: "::", target: "fd00::2")]),
        SpecExample(spec: "192.0.2.1/22:10.0.0.1", rules: [r(22, addr: "192.0.2.1", target: "10.0.0.1")]),
        SpecExample(
            spec: "0.0.0.0/all:10.0.0.1",
            rules: [
                r(1, 32767, addr: "0.0.0.0", target: "10.0.0.1"),
                r(61000, 65535, addr: "0.0.0.0", target: "10.0.0.1"),
            ], bestEffort: true),
        SpecExample(spec: "22:0.0.0.0/80", rules: [r(22, to: 80)]),
        // The greedy listening prefix: an address, not a port with a target.
        SpecExample(spec: "8080:fd00::2/80", rules: [r(80, addr: "8080:fd00::2")]),
    ]

    /// Checks one example for one protocol.
    func check(_ example: SpecExample, _ proto: TransportProtocol) throws {
        let parsed = try PortSpec.parse(example.spec, proto: proto, ephemeralPorts: Self.ephemeral)
        #expect(parsed.rules == example.rules.map { $0.rule(proto) })
        #expect(parsed.bestEffort == example.bestEffort)
        #expect(parsed.isNone == example.isNone)
    }

    @Test("man page examples", arguments: manPage, TransportProtocol.allCases)
    func manPageExample(_ example: SpecExample, _ proto: TransportProtocol) throws {
        try check(example, proto)
    }

    @Test("--help examples", arguments: usageText, TransportProtocol.allCases)
    func usageExample(_ example: SpecExample, _ proto: TransportProtocol) throws {
        try check(example, proto)
    }

    @Test("forms beyond the man page", arguments: extensions, TransportProtocol.allCases)
    func extensionExample(_ example: SpecExample, _ proto: TransportProtocol) throws {
        try check(example, proto)
    }

    @Test("all yields two rules on a 32768-60999 host; the ephemeral range is a parameter")
    func ephemeralRangeIsUsed() throws {
        let spec = try PortSpec.parse("all", proto: .tcp, ephemeralPorts: 1024...65535)
        #expect(spec.rules == [Rule(proto: .tcp, firstPort: 1, lastPort: 1023)])
        let low = try PortSpec.parse("~25", proto: .udp, ephemeralPorts: 1...1000)
        #expect(low.rules == [Rule(proto: .udp, firstPort: 1001, lastPort: 65535)])
    }

    @Test("the host's ephemeral range, as read from the kernel, parses a plain port")
    func hostEphemeralRange() throws {
        let spec = try PortSpec.parse("22", proto: .tcp, ephemeralPorts: EphemeralPortRange.current())
        #expect(spec.rules == [Rule(proto: .tcp, firstPort: 22)])
    }

    // MARK: - Errors

    /// (spec, the piece the error must name): specs upstream pesto refuses.
    static let rejected: [(String, String)] = [
        ("", ""),
        ("80,,81", ",,"),
        ("80,", ""),
        (",80", ","),
        ("0", "0"),
        ("0-5", "0-5"),
        ("65536", "65536"),
        ("99999999999", "99999999999"),
        ("abc", "abc"),
        ("1-0", "1-0"),
        ("22-", "22-"),
        ("-22", "-22"),
        ("1-2-3", "-3"),
        ("80-81:90-95", "80-81:90-95"),
        ("80-81:8080", "80-81:8080"),
        ("35022-35024:35032", "35022-35024:35032"),
        ("22:0", "22:0"),
        ("22:", ":"),
        ("300.1.1.1/22", "300.1.1.1"),
        ("localhost/22", "localhost"),
        ("[::1/22", "[::1"),
        ("%eth0", "%eth0"),
        ("%abcdefghijklmnop/22", "abcdefghijklmnop"),
        ("%./22", "."),
        ("%../22", ".."),
        ("none,22", "none"),
        ("auto:22", ":22"),
        ("~25:26", ":26"),
        ("22,22", "22"),
        ("20-30,25", "25"),
        ("22:10.0.0.1", "22:10.0.0.1"),
        ("22:[::1]/2222", "22:[::1]/2222"),
        ("::1/22:10.0.0.1", "22:10.0.0.1"),
        ("0.0.0.0/22:224.0.0.1", "22:224.0.0.1"),
        ("0.0.0.0/22:255.255.255.255/22", "22:255.255.255.255/22"),
    ]

    @Test("errors name the bad piece", arguments: rejected)
    func error(_ spec: String, _ piece: String) {
        do {
            let parsed = try PortSpec.parse(spec, proto: .tcp, ephemeralPorts: Self.ephemeral)
            Issue.record("\"\(spec)\" parsed to \(parsed)")
        } catch {
            #expect(error.spec == spec)
            #expect(error.piece == piece)
            #expect(!error.message.isEmpty)
            #expect(error.message.hasSuffix("."))
            if !piece.isEmpty {
                #expect(error.message.contains("\"\(piece)\""), "message does not quote the piece: \(error.message)")
            }
            #expect(error.description == "invalid port spec \"\(spec)\": \(error.message)")
        }
    }

    @Test("-T and -U: no listening address; the rules listen on %lo, dual stack")
    func spliceSide() throws {
        let spec = try PortSpec.parse("8080:80", proto: .tcp, table: .splice, ephemeralPorts: Self.ephemeral)
        #expect(spec.rules == [Rule(proto: .tcp, interface: "lo", firstPort: 8080, targetPort: 80)])
        for text in ["127.0.0.1/8080", "%eth0/8080", "*/8080", "/8080"] {
            #expect(throws: PortSpecError.self) { try PortSpec.parse(text, proto: .udp, table: .splice, ephemeralPorts: Self.ephemeral) }
        }
    }

    @Test("a few messages word by word")
    func messages() {
        func message(_ spec: String) -> String {
            do {
                _ = try PortSpec.parse(spec, proto: .tcp, ephemeralPorts: Self.ephemeral)
                return ""
            } catch { return error.message }
        }
        #expect(message("70000") == "\"70000\" is past 65535, the highest port; give a port from 1 to 65535.")
        #expect(
            message("35022-35024:35032")
                == "\"35022-35024:35032\" maps 3 ports to 1; the target range must be as long as the listening range.")
        #expect(message("20-30,25") == "\"25\" forwards port 25 again; each port can be forwarded only once.")
        #expect(
            message("22:10.0.0.1/22")
                == "\"22:10.0.0.1/22\" listens dual stack (no listening address) but forwards to IPv4 address 10.0.0.1; "
                + "give 0.0.0.0/... to listen on IPv4 only.")
        #expect(
            message("22 ") == "\" \" follows the ports; separate ports with commas, as in 22,80, and give ranges as 8000-8010.")
    }

    // MARK: - Ephemeral port range

    /// Writes `contents` to a new temporary file and returns its path.
    static func temporaryFile(_ contents: String) -> String {
        var template = Array("/tmp/pesto-portspec-XXXXXX".utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        precondition(fd >= 0, "mkstemp failed")
        let bytes = Array(contents.utf8)
        let written = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        precondition(written == bytes.count, "write failed")
        close(fd)
        return String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// (file contents, expected range; nil means the fallback).
    static let sysctlFiles: [(String, ClosedRange<UInt16>?)] = [
        ("32768\t60999\n", 32768...60999),
        ("32768\t60999", 32768...60999),
        ("1024 65535\n", 1024...65535),
        ("40000\t40000\n", 40000...40000),
        ("", nil),
        ("\n", nil),
        ("garbage\n", nil),
        ("32768\n", nil),
        ("60999\t32768\n", nil),
        ("0\t60999\n", nil),
        ("32768\t70000\n", nil),
        ("32768\t60999\t1\n", nil),
        ("-1\t60999\n", nil),
        ("32768\t60999\n\n", nil),
        (String(repeating: "1", count: 200), nil),
    ]

    @Test("ip_local_port_range is parsed, anything odd falls back", arguments: sysctlFiles)
    func sysctlFile(_ contents: String, _ expected: ClosedRange<UInt16>?) {
        let path = Self.temporaryFile(contents)
        defer { unlink(path) }
        #expect(EphemeralPortRange.current(path: path) == (expected ?? EphemeralPortRange.fallback))
    }

    @Test("a missing file falls back to 49152-65535")
    func missingFile() {
        #expect(EphemeralPortRange.current(path: "/nonexistent/pesto/ip_local_port_range") == 49152...65535)
        #expect(EphemeralPortRange.fallback == 49152...65535)
    }

    @Test("the host's range is sane")
    func hostRange() {
        let range = EphemeralPortRange.current()
        #expect(range.lowerBound >= 1)
    }
}

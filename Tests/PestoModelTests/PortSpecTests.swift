// SPDX-License-Identifier: GPL-2.0-or-later

// PortSpec: every example of pasta's man page (passt.1, "-t, --tcp-ports spec", which -u, -T
// and -U refer to) parses to the exact rules; every error names its bad piece; the ephemeral
// port range is read from the sysctl file or falls back.

#if canImport(Glibc)
import Glibc
#endif
import Testing

@testable import PestoModel
import PestoSystem
import PestoTestSupport

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
        Rule(proto: proto, address: address.map { IPAddress($0)! }, interface: interface, firstPort: first,
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
private func r(_ first: UInt16, _ last: UInt16? = nil, to: UInt16? = nil, addr: String? = nil, ifname: String = "",
               target: String? = nil, scan: Bool = false) -> ExpectedRule {
    ExpectedRule(first: first, last: last ?? first, to: to ?? first, address: addr, interface: ifname,
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

    /// pesto's own decisions: brackets, wildcards, target addresses, merging, ordering.
    static let extensions: [SpecExample] = [
        SpecExample(spec: "[::1]/22", rules: [r(22, addr: "::1")]),
        SpecExample(spec: "[fe80::1]%eth0/22", rules: [r(22, addr: "fe80::1", ifname: "eth0")]),
        SpecExample(spec: "fe80::1%eth0/22", rules: [r(22, addr: "fe80::1", ifname: "eth0")]),
        SpecExample(spec: "*/22", rules: [r(22)]),
        SpecExample(spec: "*%eth0/22", rules: [r(22, ifname: "eth0")]),
        SpecExample(spec: "0.0.0.0/22", rules: [r(22, addr: "0.0.0.0")]),
        SpecExample(spec: "::/22", rules: [r(22, addr: "::")]),
        SpecExample(spec: "%eth0/all", rules: nonEphemeral(ifname: "eth0"), bestEffort: true),
        SpecExample(spec: "all,~25", rules: [r(1, 24), r(26, 32767), r(61000, 65535)], bestEffort: true),
        SpecExample(spec: "~25,all", rules: [r(1, 24), r(26, 32767), r(61000, 65535)], bestEffort: true),
        SpecExample(spec: "all,auto", rules: nonEphemeral(scan: true), bestEffort: true),
        SpecExample(spec: "auto,~25", rules: [r(1, 24, scan: true), r(26, 32767, scan: true), r(61000, 65535, scan: true)],
                    bestEffort: true),
        SpecExample(spec: "auto,8000-8010", rules: [r(8000, 8010, scan: true)]),
        SpecExample(spec: "~1-100,~50-200", rules: [r(201, 32767), r(61000, 65535)], bestEffort: true),
        // Exclusions win whatever their position.
        SpecExample(spec: "~22,20-25", rules: [r(20, 21), r(23, 25)]),
        SpecExample(spec: "22,80,~22", rules: [r(80)]),
        // Exclusion inside a translated range keeps the offsets.
        SpecExample(spec: "100-110:200-210,~105", rules: [r(100, 104, to: 200), r(106, 110, to: 206)]),
        // Merging and ascending order.
        SpecExample(spec: "81,80", rules: [r(80, 81)]),
        SpecExample(spec: "80:90,81:91", rules: [r(80, 81, to: 90)]),
        SpecExample(spec: "80:90,81:95", rules: [r(80, to: 90), r(81, to: 95)]),
        SpecExample(spec: "30-40,20-29,41", rules: [r(20, 41)]),
        // `F-L:T` shifts the whole range.
        SpecExample(spec: "80-81:8080", rules: [r(80, 81, to: 8080)]),
        SpecExample(spec: "65535", rules: [r(65535)]),
        SpecExample(spec: "1:65535", rules: [r(1, to: 65535)]),
        SpecExample(spec: "022", rules: [r(22)]),
        // Target addresses; a dual-stack listener becomes the target family's wildcard.
        SpecExample(spec: "22:10.0.0.1", rules: [r(22, addr: "0.0.0.0", target: "10.0.0.1")]),
        SpecExample(spec: "22:10.0.0.1/2222", rules: [r(22, to: 2222, addr: "0.0.0.0", target: "10.0.0.1")]),
        SpecExample(spec: "22:[::1]/2222", rules: [r(22, to: 2222, addr: "::", target: "::1")]),
        SpecExample(spec: "22:[::1]", rules: [r(22, addr: "::", target: "::1")]),
        SpecExample(spec: "%eth0/22:[fd00::2]/22", rules: [r(22, addr: "::", ifname: "eth0", target: "fd00::2")]),
        SpecExample(spec: "192.0.2.1/22:10.0.0.1/2222", rules: [r(22, to: 2222, addr: "192.0.2.1", target: "10.0.0.1")]),
        SpecExample(spec: "[::1]/22:[::2]/2222", rules: [r(22, to: 2222, addr: "::1", target: "::2")]),
        SpecExample(spec: "::1/22:[::2]/2222", rules: [r(22, to: 2222, addr: "::1", target: "::2")]),
        SpecExample(spec: "80-81:10.0.0.1/90-91,82:10.0.0.1/92",
                    rules: [r(80, 82, to: 90, addr: "0.0.0.0", target: "10.0.0.1")]),
        SpecExample(spec: "80:10.0.0.1,81", rules: [r(80, addr: "0.0.0.0", target: "10.0.0.1"), r(81)]),
        SpecExample(spec: "80:10.0.0.1,81:10.0.0.2",
                    rules: [r(80, addr: "0.0.0.0", target: "10.0.0.1"), r(81, addr: "0.0.0.0", target: "10.0.0.2")]),
    ]

    /// Checks one example for one protocol.
    func check(_ example: SpecExample, _ proto: TransportProtocol) throws {
        let parsed = try PortSpec.parse(example.spec, proto: proto, ephemeralPorts: Self.ephemeral)
        #expect(parsed.rules == example.rules.map { $0.rule(proto) })
        #expect(parsed.bestEffort == example.bestEffort)
        #expect(parsed.isNone == example.isNone)
        #expect(parsed.rules.map(\.firstPort) == parsed.rules.map(\.firstPort).sorted())
    }

    @Test("man page examples", arguments: manPage, TransportProtocol.allCases)
    func manPageExample(_ example: SpecExample, _ proto: TransportProtocol) throws {
        try check(example, proto)
    }

    @Test("--help examples", arguments: usageText, TransportProtocol.allCases)
    func usageExample(_ example: SpecExample, _ proto: TransportProtocol) throws {
        try check(example, proto)
    }

    @Test("pesto extensions and decisions", arguments: extensions, TransportProtocol.allCases)
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

    /// (spec, the piece the error must name).
    static let rejected: [(String, String)] = [
        ("", ""),  // empty spec
        ("80,,81", ""),  // empty item
        ("80,", ""),
        (",80", ""),
        ("0", "0"),  // out of range
        ("65536", "65536"),
        ("99999999999", "99999999999"),
        ("abc", "abc"),
        ("+22", "+22"),
        (" 22", " 22"),
        ("1-0", "1-0"),  // reversed
        ("90-80", "90-80"),
        ("0-5", "0"),
        ("22-", "22-"),
        ("-22", "-22"),
        ("1-2-3", "2-3"),
        ("80-81:90-95", "80-81:90-95"),  // target length mismatch
        ("80-81:90-90", "80-81:90-90"),
        ("65530-65535:65534", "65530-65535:65534"),  // target past 65535
        ("22:65536", "65536"),
        ("22:0", "0"),
        ("22:", "22:"),
        ("300.1.1.1/22", "300.1.1.1"),  // bad listening address
        ("1.2.3/22", "1.2.3"),
        ("2001:db8::zz/22", "2001:db8::zz"),
        ("localhost/22", "localhost"),
        ("224.0.0.1/22", "224.0.0.1"),
        ("[::1/22", "[::1"),  // unterminated bracket
        ("[::1]22", "[::1]22"),
        ("[::1]x/22", "[::1]x"),
        ("[192.0.2.1]/22", "192.0.2.1"),
        ("[*]/22", "*"),
        ("*", "*"),
        ("%eth0", "%eth0"),
        ("/22", "/"),
        ("192.0.2.1/", "192.0.2.1/"),
        ("%abcdefghijklmnop/22", "abcdefghijklmnop"),  // interface names
        ("192.0.2.1%abcdefghijklmnop/22", "abcdefghijklmnop"),
        ("%./22", "."),
        ("%../22", ".."),
        ("192.0.2.1%/22", "192.0.2.1%"),
        ("%eth 0/22", "eth 0"),
        ("%eth:0/22", "eth:0"),
        ("none,22", "none"),  // keywords combined wrongly
        ("22,none", "none"),
        ("::1/none", "none"),
        ("all,22", "all"),
        ("22,all", "all"),
        ("all,all", "all"),
        ("auto,auto", "auto"),
        ("all:10.0.0.1", "all:10.0.0.1"),
        ("auto:22", "auto:22"),
        ("All", "All"),
        ("~1-65535", "~1-65535"),  // nothing left
        ("~1-32767,~61000-65535", "~1-32767,~61000-65535"),
        ("192.0.2.1/~1-40000,~60000-65535", "~1-40000,~60000-65535"),
        ("22,~22", "22,~22"),
        ("~0", "0"),
        ("~25:26", "~25:26"),
        ("~", "~"),
        ("22,22", "22"),  // overlapping includes
        ("20-30,25", "25"),
        ("25,20-30", "20-30"),
        ("20-30,30-40:50-60", "30-40:50-60"),
        ("1-100,200,50-60", "50-60"),
        ("22,192.0.2.1/25", "192.0.2.1/25"),  // second listening address
        ("22,[::1]/25", "[::1]/25"),
        ("::1/22:10.0.0.1", "22:10.0.0.1"),  // family mismatch
        ("192.0.2.1/22:[::1]/22", "22:[::1]/22"),
        ("22:[::1", "[::1"),  // bad target addresses
        ("22:[::1]x", "[::1]x"),
        ("22:[::1]/", "22:[::1]/"),
        ("22:10.0.0.1/", "22:10.0.0.1/"),
        ("22:[192.0.2.1]/22", "192.0.2.1"),
        ("22:::1", "::1"),
        ("22:10.0.0", "10.0.0"),
        ("22:10.0.0.1/x", "x"),
        ("22:host", "host"),
        ("22:0.0.0.0", "0.0.0.0"),
        ("22:[::]/22", "::"),
        ("22:224.0.0.1", "224.0.0.1"),
        ("22:[ff02::1]/22", "ff02::1"),
        ("22:10.0.0.1/80-81", "22:10.0.0.1/80-81"),
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

    @Test("a few messages word by word")
    func messages() {
        func message(_ spec: String) -> String {
            do {
                _ = try PortSpec.parse(spec, proto: .tcp, ephemeralPorts: Self.ephemeral)
                return ""
            } catch { return error.message }
        }
        #expect(message("70000") == "port \"70000\" is out of range; ports are 1-65535.")
        #expect(message("1-0") == "range \"1-0\" is reversed; give the lower port first.")
        #expect(message("[::1/22") == "\"[::1\" has no closing \"]\".")
        #expect(message("80-81:90-95")
            == "\"80-81:90-95\" maps 2 ports to 6; the target range must be as long as the listening range.")
        #expect(message("~1-65535")
            == "\"~1-65535\" leaves no port to forward once exclusions and the ephemeral ports 32768-60999 are taken out.")
        #expect(message("20-30,25") == "\"25\" overlaps \"20-30\"; each port can be forwarded only once.")
        #expect(message("80,,81") == "\"80,,81\" has an empty item; separate ports with single commas.")
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

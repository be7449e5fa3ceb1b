// SPDX-License-Identifier: GPL-2.0-or-later

// PortSpec: pasta's and pesto's -t/-u/-T/-U port forwarding specification syntax, parsed into
// rules with exactly upstream pesto's accept/refuse decisions.
//
// Theory of operation
// -------------------
// The syntax is the one passt(1) and pesto(1) document under "-t, --tcp-ports spec" (and, by
// reference, -u, -T and -U):
//
//     spec     := "none" | [listen "/"] chunk ("," chunk)*
//     listen   := ADDR ["%" IFNAME] | ["*"] ["%" IFNAME]
//     chunk    := "all" [":" ADDR] | "auto" | "~" range | range [":" target]
//     range    := NUMBER ["-" NUMBER]
//     target   := ADDR "/" range | ADDR | range
//     ADDR     := IPv6 (brackets optional) | IPv4 (brackets optional)
//
// The reading follows upstream's parser (passt's parse.c and fwd_rule.c) decision for decision,
// because pestoctl is a drop-in for `pesto` and the same argument must be accepted or refused
// the same way; doc/pesto-conformance.md lists the forms and a test checks every row. In short:
//
// * The parse is greedy and never backtracks across the listening prefix: an address is read
//   first (IPv6 as the longest run of hex digits, ":" and "."; IPv4 as digits and dots), then an
//   optional "%IFNAME" (anything but "/" and white space, 1-15 bytes), then "/". Only when that
//   fails is the whole argument read as the port list. So `8080:fd00::2/80` is the listening
//   address 8080:fd00::2 with port 80, as upstream reads it; give `[::]/8080:fd00::2/80`.
// * Numbers are read as strtoul(3) reads them: leading white space, a sign, decimal digits.
// * Exclusions (`~F[-L]`) and `auto` are collected first, over the whole list; then every include
//   range becomes rules, one per run of ports that the exclusions leave, in the order given.
//   Includes are never merged: `22,23` is two rules, as upstream makes it, so `-D -t 22` finds
//   the rule `-t 22,23` made.
// * A target port range must be exactly as long as the listening range (`22-24:32` is refused).
// * With no include range (`all`, `auto` alone, exclusions only), the rules cover 1-65535 minus
//   the exclusions and the host's ephemeral range, and are best effort (upstream's weak rules).
// * Each rule is then checked as upstream's fwd_rule_add checks it: no port 0, a dual-stack rule
//   (no listening address) cannot name a target address, a target address must be unicast and of
//   the listening address's family, and no two rules of one spec may share a listening port.
// * -T/-U (the SPLICE table) take no listening address; their rules listen on the namespace's
//   loopback interface only (`%lo`), dual stack, as pasta and pesto make them.
//
// What upstream accepts and pestod cannot honour (a multicast listening address, an interface
// name the kernel never allows) is accepted here too and refused by pestod's rule validation,
// so pestoctl exits 1; the conformance table marks those rows.

#if canImport(Glibc)
    import Glibc
#endif

/// The result of parsing one -t/-u/-T/-U argument.
///
/// `rules` are in the order upstream pesto makes them: include ranges in the order given, each
/// split where exclusions cut it.
public struct PortSpec: Hashable, Sendable {
    /// The rules to insert.
    public var rules: [Rule]
    /// `all`, `auto` alone or exclusions only: tolerate bind failures if at least one socket binds.
    public var bestEffort: Bool
    /// The spec was `none`: forward nothing.
    public var isNone: Bool

    /// Makes a spec result directly (parsing is `parse(_:proto:table:ephemeralPorts:)`).
    public init(rules: [Rule] = [], bestEffort: Bool = false, isNone: Bool = false) {
        self.rules = rules
        self.bestEffort = bestEffort
        self.isNone = isNone
    }

    /// Parses one -t/-u/-T/-U argument into rules for `proto`.
    ///
    /// - Parameters:
    ///   - text: the whole argument, e.g. `192.0.2.1/20-30,~25`.
    ///   - proto: the protocol every rule gets (-t/-T: TCP, -u/-U: UDP).
    ///   - table: `.host` for -t/-u, `.splice` for -T/-U (no listening address; `%lo`).
    ///   - ephemeralPorts: the range `all`, `auto` alone and exclusion-only specs leave out.
    /// - Throws: `PortSpecError` naming the first bad piece of `text`.
    public static func parse(
        _ text: String,
        proto: TransportProtocol,
        table: TableKind = .host,
        ephemeralPorts: ClosedRange<UInt16>
    ) throws(PortSpecError) -> PortSpec {
        var parser = PortSpecParser(spec: text, proto: proto, table: table, ephemeral: ephemeralPorts)
        return try parser.parse()
    }
}

/// A port spec that could not be parsed.
public struct PortSpecError: Error, Hashable, Sendable, CustomStringConvertible {
    /// The whole argument.
    public let spec: String
    /// The bad piece, e.g. `70000`, `22-24:32` or `[::1`; empty for an empty spec.
    public let piece: String
    /// One sentence naming the bad piece and what is wrong with it.
    public let message: String

    /// Makes an error for `piece` of `spec`.
    public init(spec: String, piece: String, message: String) {
        self.spec = spec
        self.piece = piece
        self.message = message
    }

    public var description: String { "invalid port spec \"\(spec)\": \(message)" }
}

/// The host's ephemeral (local, automatically assigned) port range. Reading it from the
/// kernel is PestoSystem's `EphemeralPortRange.current()`.
public enum EphemeralPortRange {
    /// RFC 6335's dynamic port range, used when the kernel's range cannot be read.
    public static let fallback: ClosedRange<UInt16> = 49152...65535

    /// Parses the sysctl's text: two decimal ports separated by tabs or spaces, low first, with
    /// an optional trailing newline. Nil for anything else (including 0 or a reversed range).
    public static func parse(_ bytes: [UInt8]) -> ClosedRange<UInt16>? {
        var text = bytes[...]
        if text.last == UInt8(ascii: "\n") { text = text.dropLast() }
        let fields = text.split(whereSeparator: { $0 == UInt8(ascii: "\t") || $0 == UInt8(ascii: " ") })
        guard fields.count == 2 else { return nil }
        var values: [UInt16] = []
        for field in fields {
            guard field.count <= 5, field.allSatisfy({ $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") })
            else { return nil }
            let value = field.reduce(0) { $0 * 10 + Int($1 - UInt8(ascii: "0")) }
            guard value >= 1, value <= 65535 else { return nil }
            values.append(UInt16(value))
        }
        guard values[0] <= values[1] else { return nil }
        return values[0]...values[1]
    }
}

// MARK: - Reading primitives

/// A position in the argument's bytes; every reader returns nil (and leaves the cursor alone)
/// when the input there is not what it reads.
private struct Cursor {
    let bytes: [UInt8]
    var at: Int

    var rest: ArraySlice<UInt8> { bytes[at...] }
    var atEnd: Bool { at == bytes.count }

    /// Reads `text` literally.
    mutating func literal(_ text: String) -> Bool {
        let want = Array(text.utf8)
        guard bytes.count - at >= want.count, Array(bytes[at..<at + want.count]) == want else { return false }
        at += want.count
        return true
    }

    /// Reads an unsigned number as strtoul(3) with base 10 does: white space, an optional sign,
    /// at least one digit; a value past UInt64 fails (ERANGE); "-N" wraps around as in C.
    mutating func unsigned() -> UInt64? {
        var p = at
        while p < bytes.count, [0x20, 0x09, 0x0A, 0x0B, 0x0C, 0x0D].contains(bytes[p]) { p += 1 }
        var negative = false
        if p < bytes.count, bytes[p] == UInt8(ascii: "+") || bytes[p] == UInt8(ascii: "-") {
            negative = bytes[p] == UInt8(ascii: "-")
            p += 1
        }
        let digitsStart = p
        var value: UInt64 = 0
        var overflow = false
        while p < bytes.count, bytes[p] >= UInt8(ascii: "0"), bytes[p] <= UInt8(ascii: "9") {
            let (times, o1) = value.multipliedReportingOverflow(by: 10)
            let (sum, o2) = times.addingReportingOverflow(UInt64(bytes[p] - UInt8(ascii: "0")))
            overflow = overflow || o1 || o2
            value = sum
            p += 1
        }
        guard p > digitsStart, !overflow else { return nil }
        at = p
        return negative ? 0 &- value : value
    }

    /// Reads `FIRST[-LAST]` with FIRST <= LAST < 65536 (0 is read; rules refuse it later).
    mutating func portRange() -> (first: Int, last: Int)? {
        var p = self
        guard let first = p.unsigned() else { return nil }
        var last = first
        if p.literal("-") {
            guard let l = p.unsigned() else { return nil }
            last = l
        }
        guard last >= first, last < 65536 else { return nil }
        self = p
        return (Int(first), Int(last))
    }

    /// Reads an address of `family`: optionally in brackets; without them, the longest run of
    /// the family's characters (IPv6: hex digits, ":" and "."; IPv4: digits and "."), which
    /// inet_pton(3) must accept whole.
    mutating func address(_ family: AddressFamily) -> IPAddress? {
        var p = self
        let bracket = p.literal("[")
        var end = p.at
        if bracket {
            while end < bytes.count, bytes[end] != UInt8(ascii: "]") { end += 1 }
        } else {
            let allowed = family == .ipv6 ? Self.ipv6Characters : Self.ipv4Characters
            while end < bytes.count, allowed.contains(bytes[end]) { end += 1 }
        }
        let limit = family == .ipv6 ? 46 : 16  // INET6_ADDRSTRLEN, INET_ADDRSTRLEN
        guard end - p.at < limit else { return nil }
        let text = String(decoding: bytes[p.at..<end], as: UTF8.self)
        let parsed: IPAddress?
        if family == .ipv6 {
            var a6 = in6_addr()
            parsed = inet_pton(AF_INET6, text, &a6) == 1 ? IPAddress(in6: a6) : nil
        } else {
            var a4 = in_addr()
            parsed = inet_pton(AF_INET, text, &a4) == 1 ? .v4(UInt32(bigEndian: a4.s_addr)) : nil
        }
        guard let parsed else { return nil }
        p.at = end
        if bracket && !p.literal("]") { return nil }
        self = p
        return parsed
    }

    /// The bytes an unbracketed IPv6 address is read from: hex digits, ":" and ".".
    static let ipv6Characters: Set<UInt8> = Set("0123456789aAbBcCdDeEfF:.".utf8)
    /// The bytes an unbracketed IPv4 address is read from.
    static let ipv4Characters: Set<UInt8> = Set("0123456789.".utf8)

    /// Reads an IPv6 address, else an IPv4 address.
    mutating func anyAddress() -> IPAddress? {
        address(.ipv6) ?? address(.ipv4)
    }

    /// Reads an optional `%IFNAME` (1-15 bytes, no "/" or white space); "" when absent.
    mutating func interfaceSpec() -> String? {
        var p = self
        guard p.literal("%") else { return "" }
        var end = p.at
        while end < bytes.count, ![0x2F, 0x20, 0x0C, 0x0A, 0x0D, 0x09, 0x0B].contains(bytes[end]) { end += 1 }
        guard end > p.at, end - p.at < 16 else { return nil }
        let name = String(decoding: bytes[p.at..<end], as: UTF8.self)
        p.at = end
        self = p
        return name
    }
}

/// One piece of the comma-separated port list.
private enum Chunk {
    /// `all`, with the target address of `all:ADDR` (nil: none).
    case all(IPAddress?)
    /// `auto`.
    case auto
    /// `~FIRST[-LAST]`.
    case exclude(first: Int, last: Int)
    /// `FIRST[-LAST][:TARGET]`.
    case include(first: Int, last: Int, target: IPAddress?, targetFirst: Int, targetLast: Int)
}

extension Cursor {
    /// Reads one chunk; the target forms are tried longest first.
    mutating func chunk() -> Chunk? {
        var p = self
        if p.literal("all") {
            var t = p
            if t.literal(":"), let address = t.anyAddress() {
                self = t
                return .all(address)
            }
            self = p
            return .all(nil)
        }
        if p.literal("auto") {
            self = p
            return .auto
        }
        if p.literal("~") {
            guard let range = p.portRange() else { return nil }
            self = p
            return .exclude(first: range.first, last: range.last)
        }
        guard let range = p.portRange() else { return nil }
        // The target, longest form first: ":ADDRESS/PORTS", ":ADDRESS", ":PORTS", or none.
        var target: IPAddress?
        var targets = range
        var t = p
        if t.literal(":") {
            if let address = t.anyAddress() {
                target = address
                var withPorts = t
                if withPorts.literal("/"), let ports = withPorts.portRange() {
                    targets = ports
                    t = withPorts
                }
            } else if let ports = t.portRange() {
                targets = ports
            } else {
                t = p
            }
        }
        self = t
        return .include(first: range.first, last: range.last, target: target, targetFirst: targets.first, targetLast: targets.last)
    }

    /// Reads the listening prefix `ADDR[%IF]/` or `[*][%IF]/`; nil address means dual stack.
    mutating func listenPrefix() -> (address: IPAddress?, interface: String)? {
        var p = self
        if let address = p.anyAddress(), let interface = p.interfaceSpec(), p.literal("/") {
            self = p
            return (address, interface)
        }
        p = self
        _ = p.literal("*")
        if let interface = p.interfaceSpec(), p.literal("/") {
            self = p
            return (nil, interface)
        }
        return nil
    }
}

// MARK: - Parser

/// Parses one spec; holds the inputs so every helper can build a `PortSpecError`.
private struct PortSpecParser {
    let spec: String
    let proto: TransportProtocol
    let table: TableKind
    let ephemeral: ClosedRange<UInt16>
    /// A listening prefix (`ADDR%IF/`) was read; when not, errors may be about the one meant.
    var prefixRead = false

    init(spec: String, proto: TransportProtocol, table: TableKind, ephemeral: ClosedRange<UInt16>) {
        self.spec = spec
        self.proto = proto
        self.table = table
        self.ephemeral = ephemeral
    }

    /// An error for `piece` of the spec.
    func fail(_ piece: some StringProtocol, _ message: String) -> PortSpecError {
        PortSpecError(spec: spec, piece: String(piece), message: message)
    }

    /// The option letter, for messages.
    var option: String {
        switch (table, proto) {
        case (.host, .tcp): return "-t"
        case (.host, .udp): return "-u"
        case (.splice, .tcp): return "-T"
        case (.splice, .udp): return "-U"
        }
    }

    /// Reads the whole argument as described at the top of the file.
    mutating func parse() throws(PortSpecError) -> PortSpec {
        // A C string ends at the first NUL; argv cannot hold one, tests might.
        let bytes = Array(spec.utf8.prefix { $0 != 0 })
        if bytes == Array("none".utf8) { return PortSpec(isNone: true) }

        var cursor = Cursor(bytes: bytes, at: 0)
        var address: IPAddress?
        var interface = ""
        if let prefix = cursor.listenPrefix() {
            if table == .splice {
                throw fail(spec, "\(option) takes no listening address: its rules listen on the namespace's loopback.")
            }
            if prefix.interface == "." || prefix.interface == ".." {
                throw fail(prefix.interface, "\"\(prefix.interface)\" is not a valid interface name.")
            }
            address = prefix.address
            interface = prefix.interface
            prefixRead = true
        }
        if table == .splice { interface = "lo" }
        return try ports(cursor, address: address, interface: interface)
    }

    /// The error for a port list that cannot be read at `cursor` (PortSpecDiagnosis words it):
    /// `after` is the kind of chunk read just before, when the bad text follows one.
    func bad(_ cursor: Cursor, after: String? = nil) -> PortSpecError {
        if cursor.bytes.isEmpty {
            return fail("", "the port spec is empty; give \"none\", \"all\", \"auto\" or a list of ports.")
        }
        if !prefixRead, let end = PortSpecDiagnosis.meantPrefixEnd(cursor.bytes), cursor.at <= end {
            let why = PortSpecDiagnosis.prefix(cursor.bytes, end: end) { text in
                var reader = Cursor(bytes: Array(text.utf8), at: 0)
                return reader.anyAddress() != nil && reader.atEnd
            }
            return fail(why.piece, why.message)
        }
        if cursor.atEnd {
            return fail("", "the spec ends where a port was expected; add a port after the last \",\" or \"-\".")
        }
        let why = PortSpecDiagnosis.chunk(cursor.bytes, at: cursor.at, after: after)
        return fail(why.piece, why.message)
    }

    /// Reads the chunk list after the listening prefix and makes the rules.
    func ports(_ start: Cursor, address: IPAddress?, interface: String) throws(PortSpecError) -> PortSpec {
        // First pass: exclusions and "auto".
        var excluded = [Bool](repeating: false, count: 65536)
        var scan = false
        var p = start
        repeat {
            guard let chunk = p.chunk() else { throw bad(p) }
            switch chunk {
            case .auto: scan = true
            case .exclude(let first, let last): for port in first...last { excluded[port] = true }
            default: break
            }
        } while p.literal(",")

        // Second pass: include ranges, then the end of the input.
        var rules: [Rule] = []
        var includesSeen = false
        var allTarget: IPAddress?
        var lastKind = "include"
        p = start
        repeat {
            let before = p
            guard let chunk = p.chunk() else { throw bad(p) }
            switch chunk {
            case .auto:
                lastKind = "auto"
                continue
            case .exclude:
                lastKind = "exclude"
                continue
            case .all(let target):
                lastKind = "all"
                allTarget = target
            case .include(let first, let last, let target, let targetFirst, let targetLast):
                lastKind = "include"
                includesSeen = true
                let piece = String(decoding: before.bytes[before.at..<p.at], as: UTF8.self)
                if targetLast - targetFirst != last - first {
                    throw fail(
                        piece,
                        "\"\(piece)\" maps \(last - first + 1) port\(last == first ? "" : "s") to "
                            + "\(targetLast - targetFirst + 1); the target range must be as long as the listening range.")
                }
                try addRuns(
                    &rules, first: first, last: last, excluded: excluded, address: address, interface: interface,
                    target: target, delta: targetFirst - first, scan: scan, piece: piece)
            }
        } while p.literal(",")
        if !p.atEnd { throw bad(p, after: lastKind) }

        if includesSeen { return PortSpec(rules: rules) }
        // "all", "auto" alone or exclusions only: everything else but the ephemeral range.
        for port in Int(ephemeral.lowerBound)...Int(ephemeral.upperBound) { excluded[port] = true }
        try addRuns(
            &rules, first: 1, last: 65535, excluded: excluded, address: address, interface: interface,
            target: allTarget, delta: 0, scan: scan, piece: spec)
        return PortSpec(rules: rules, bestEffort: true)
    }

    /// Adds a rule for every run of `first...last` not excluded, checking each as upstream's
    /// fwd_rule_add does.
    func addRuns(
        _ rules: inout [Rule], first: Int, last: Int, excluded: [Bool], address: IPAddress?, interface: String,
        target: IPAddress?, delta: Int, scan: Bool, piece: String
    ) throws(PortSpecError) {
        var base = first
        while base <= last {
            if excluded[base] {
                base += 1
                continue
            }
            var end = base
            while end < last && !excluded[end + 1] { end += 1 }
            let rule = Rule(
                proto: proto, address: address, interface: interface, firstPort: UInt16(base), lastPort: UInt16(end),
                targetAddress: target?.isUnspecified == true ? nil : target,
                targetPort: UInt16(truncatingIfNeeded: base + delta), scan: scan)
            try check(rule, against: rules, piece: piece)
            rules.append(rule)
            base = end + 1
        }
    }

    /// Upstream's checks of one new rule: ports, target address, overlap with the spec's others.
    func check(_ rule: Rule, against earlier: [Rule], piece: String) throws(PortSpecError) {
        if rule.firstPort == 0 { throw fail(piece, "\"\(piece)\" forwards from port 0; ports are 1-65535.") }
        if rule.targetPort == 0 { throw fail(piece, "\"\(piece)\" forwards to port 0; ports are 1-65535.") }
        if let target = rule.targetAddress {
            if target.isMulticast || target.isLimitedBroadcast {
                throw fail(piece, "\"\(piece)\": target address \(target) is a multicast or broadcast address.")
            }
            guard let address = rule.address else {
                let wildcard = target.family == .ipv4 ? "0.0.0.0" : "[::]"
                throw fail(
                    piece,
                    "\"\(piece)\" listens dual stack (no listening address) but forwards to \(target.family) "
                        + "address \(target); give \(wildcard)/... to listen on \(target.family) only.")
            }
            if address.family != target.family {
                throw fail(
                    piece,
                    "\"\(piece)\" forwards from \(address.family) address \(address) to \(target.family) "
                        + "address \(target); use one family for both.")
            }
        }
        for other in earlier where other.firstPort <= rule.lastPort && rule.firstPort <= other.lastPort {
            throw fail(
                piece,
                "\"\(piece)\" forwards port\(rule.portCount == 1 ? "" : "s") "
                    + "\(rule.firstPort)\(rule.portCount == 1 ? "" : "-\(rule.lastPort)") again; each port can be forwarded only once.")
        }
    }
}

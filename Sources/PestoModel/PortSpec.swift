// SPDX-License-Identifier: GPL-2.0-or-later

// PortSpec: pasta's -t/-u/-T/-U port forwarding specification syntax, parsed into rules.
//
// Theory of operation
// -------------------
// The syntax is the one passt(1) documents under "-t, --tcp-ports spec" (and, by reference,
// -u, -T and -U):
//
//     spec     := "none" | [listen "/"] items
//     listen   := "*" ["%" IFNAME] | "%" IFNAME | ADDR ["%" IFNAME] | "[" IPV6 "]" ["%" IFNAME]
//     items    := item ("," item)*
//     item     := "all" | "auto" | "~" range | range [":" target]
//     range    := PORT ["-" PORT]
//     target   := range | TADDR ["/" range]            (TADDR: IPv4, or IPv6 in brackets)
//
// The `target` address forms are a pesto extension: pasta itself only maps ports. IPv6 target
// addresses must be bracketed (`22:[::1]/22`) so they never read as a port or a listening address.
//
// Parsing happens in four steps, each of which may throw a `PortSpecError` naming the bad piece:
//
// 1. Split off the listening prefix (address, interface, or `*`) at the first `/`, unless that
//    `/` belongs to a target address in the first item (`22:10.0.0.1/22`).
// 2. Classify every comma-separated item: keywords (`all`, `auto`), exclusions (`~F-L`) and
//    include ranges (`F-L[:target]`), each turned into a *segment*: a run of listening ports
//    mapped to consecutive target ports on one (listening address, target address) pair.
// 3. Reject overlapping include segments (each port is forwarded at most once), then cut every
//    exclusion out of them. Exclusions win over includes whatever their order. When there is no
//    include range at all (`all`, `auto` alone, or only exclusions), the single include is
//    1-65535 with the host's ephemeral range excluded as well, and the result is best effort.
// 4. Merge: sort by listening port and join neighbours whose listening ports and target ports
//    both continue, with equal addresses, so `all` becomes two rules on a 32768-60999 host.
//
// Every resulting rule is checked once more with `Rule.validate` as a sanity net.

#if canImport(Glibc)
import Glibc
#endif

/// The result of parsing one -t/-u/-T/-U argument.
///
/// `rules` are in ascending listening-port order and as few as possible: a maximal run of
/// consecutive listening ports whose targets are also consecutive is one rule.
public struct PortSpec: Hashable, Sendable {
    /// The rules to insert; consecutive ports with contiguous targets are merged into one rule.
    public var rules: [Rule]
    /// `all`, `auto` alone or exclusions only: tolerate bind failures if at least one socket binds.
    public var bestEffort: Bool
    /// The spec was `none`: forward nothing.
    public var isNone: Bool

    /// Makes a spec result directly (parsing is `parse(_:proto:ephemeralPorts:)`).
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
    ///   - ephemeralPorts: the range `all`, `auto` alone and exclusion-only specs leave out.
    /// - Throws: `PortSpecError` naming the first bad piece of `text`.
    public static func parse(
        _ text: String,
        proto: TransportProtocol,
        ephemeralPorts: ClosedRange<UInt16>
    ) throws(PortSpecError) -> PortSpec {
        var parser = PortSpecParser(spec: text, proto: proto, ephemeral: ephemeralPorts)
        return try parser.parse()
    }
}

/// A port spec that could not be parsed.
public struct PortSpecError: Error, Hashable, Sendable, CustomStringConvertible {
    /// The whole argument.
    public let spec: String
    /// The bad piece, e.g. `70000`, `1-0` or `[::1`; empty only for an empty spec or item.
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

// MARK: - Parser

/// One run of listening ports mapped to consecutive target ports, before merging.
private struct Segment {
    /// First and last listening port (inclusive), as Int to keep arithmetic overflow-free.
    var first: Int
    var last: Int
    /// Target port of `first`.
    var to: Int
    /// Listening address; nil for dual stack.
    var address: IPAddress?
    /// Target address; nil for the table's default.
    var targetAddress: IPAddress?
    /// The item the segment came from, for error messages.
    var item: Substring
    /// The item's position in the spec, to report the later of two overlapping items.
    var index: Int
}

/// The listening side given before the first `/`.
private struct ListenPrefix {
    /// Nil for `*`, an interface alone, or no prefix: dual stack.
    var address: IPAddress?
    /// "" for none.
    var interface: String
}

/// Parses one spec; holds the inputs so every helper can build a `PortSpecError`.
private struct PortSpecParser {
    let spec: String
    let proto: TransportProtocol
    let ephemeral: ClosedRange<UInt16>

    init(spec: String, proto: TransportProtocol, ephemeral: ClosedRange<UInt16>) {
        self.spec = spec
        self.proto = proto
        self.ephemeral = ephemeral
    }

    /// An error for `piece` of the spec.
    func fail(_ piece: some StringProtocol, _ message: String) -> PortSpecError {
        PortSpecError(spec: spec, piece: String(piece), message: message)
    }

    /// Runs the four steps described at the top of the file.
    mutating func parse() throws(PortSpecError) -> PortSpec {
        if spec.isEmpty {
            throw fail("", "the port spec is empty; give \"none\", \"all\", \"auto\" or a list of ports.")
        }
        if spec == "none" { return PortSpec(isNone: true) }

        // Step 1: the listening prefix.
        let (prefix, body) = try splitPrefix(spec[...])
        if body.isEmpty {
            throw fail(spec, "no ports follow the listening address in \"\(spec)\".")
        }

        // Step 2: classify the items.
        var includes: [Segment] = []
        var exclusions: [(first: Int, last: Int)] = []
        var sawAll: Substring?
        var sawAuto: Substring?
        for (index, item) in body.split(separator: ",", omittingEmptySubsequences: false).enumerated() {
            switch item {
            case "":
                throw fail("", "\"\(body)\" has an empty item; separate ports with single commas.")
            case "none":
                throw fail(item, "\"none\" must be the whole spec; it cannot be combined with other items.")
            case "all", "auto":
                if sawAll == item || sawAuto == item {
                    throw fail(item, "\"\(item)\" is given twice.")
                }
                if item == "all" { sawAll = item } else { sawAuto = item }
            default:
                if item.hasPrefix("all:") || item.hasPrefix("auto:") {
                    throw fail(item, "\"\(item)\": the keywords \"all\" and \"auto\" take no target.")
                }
                if item.first == "~" {
                    let range = item.dropFirst()
                    if range.isEmpty {
                        throw fail(item, "exclusion \"~\" has no ports; give \"~FIRST[-LAST]\".")
                    }
                    if range.contains(":") {
                        throw fail(item, "exclusion \"\(item)\" cannot have a target; give \"~FIRST[-LAST]\".")
                    }
                    exclusions.append(try parseRange(range))
                } else {
                    includes.append(try parseInclude(item, index: index, prefix: prefix))
                }
            }
        }
        if let sawAll, !includes.isEmpty {
            throw fail(
                sawAll,
                "\"all\" already forwards every non-ephemeral port and cannot be combined with port ranges; "
                    + "leave ports out with \"~PORT\" instead.")
        }

        // Step 3: overlaps, then exclusions.
        try checkOverlaps(includes)
        let bestEffort = includes.isEmpty
        if bestEffort {
            includes = [Segment(first: 1, last: 65535, to: 1, address: prefix.address, targetAddress: nil,
                                item: body, index: 0)]
            exclusions.append((Int(ephemeral.lowerBound), Int(ephemeral.upperBound)))
        }
        let remaining = subtract(mergeRanges(exclusions), from: includes)
        if remaining.isEmpty {
            throw fail(body, "\"\(body)\" leaves no port to forward once exclusions"
                + (bestEffort ? " and the ephemeral ports \(ephemeral.lowerBound)-\(ephemeral.upperBound)" : "")
                + " are taken out.")
        }

        // Step 4: merge and build the rules.
        let scan = sawAuto != nil
        var rules: [Rule] = []
        for segment in merge(remaining) {
            let rule = Rule(
                proto: proto, address: segment.address, interface: prefix.interface,
                firstPort: UInt16(segment.first), lastPort: UInt16(segment.last),
                targetAddress: segment.targetAddress, targetPort: UInt16(segment.to), scan: scan)
            do {
                try rule.validate(capabilities: [.ipv4, .ipv6, .tcp, .udp, .scan, .ifname])
            } catch {
                throw fail(segment.item, "\"\(segment.item)\" gives an invalid rule: \(error.message)")
            }
            rules.append(rule)
        }
        return PortSpec(rules: rules, bestEffort: bestEffort)
    }

    // MARK: Step 1

    /// Splits `text` into the listening prefix and the item list.
    ///
    /// The prefix ends at the first `/` of the first item, unless that item is a port with a
    /// target address (`22:10.0.0.1/22`, `22:[::1]/22`): no valid IPv6 listening address starts
    /// with `PORT:` followed by `[` or an IPv4 address, so the two never collide.
    func splitPrefix(_ text: Substring) throws(PortSpecError) -> (ListenPrefix, Substring) {
        let firstItem = text.prefix { $0 != "," }
        guard let slash = firstItem.firstIndex(of: "/"), !Self.isPortWithTargetAddress(firstItem) else {
            if let first = firstItem.first, first == "[" || first == "*" || first == "%" {
                throw fail(firstItem, "listening address \"\(firstItem)\" must be followed by \"/\" and the ports.")
            }
            return (ListenPrefix(address: nil, interface: ""), text)
        }
        let prefix = try parsePrefix(text[..<slash])
        return (prefix, text[text.index(after: slash)...])
    }

    /// True for `PORT[-PORT]:[...` and `PORT[-PORT]:DIGITS.`, the start of a target address.
    static func isPortWithTargetAddress(_ item: Substring) -> Bool {
        var rest = item.drop { $0.isASCII && $0.isNumber }
        guard rest.startIndex != item.startIndex else { return false }
        if rest.first == "-" {
            let afterDash = rest.dropFirst()
            rest = afterDash.drop { $0.isASCII && $0.isNumber }
            guard rest.startIndex != afterDash.startIndex else { return false }
        }
        guard rest.first == ":" else { return false }
        let target = rest.dropFirst()
        if target.first == "[" { return true }
        let afterDigits = target.drop { $0.isASCII && $0.isNumber }
        return afterDigits.startIndex != target.startIndex && afterDigits.first == "."
    }

    /// Parses `*`, `%IF`, `*%IF`, `ADDR`, `ADDR%IF`, `[IPV6]` or `[IPV6]%IF`.
    func parsePrefix(_ text: Substring) throws(PortSpecError) -> ListenPrefix {
        if text.isEmpty {
            throw fail("/", "nothing comes before \"/\"; give a listening address, \"*\" or \"%INTERFACE\".")
        }
        let addressText: Substring
        let interfaceText: Substring?
        var bracketed = false
        if text.first == "[" {
            guard let close = text.firstIndex(of: "]") else {
                throw fail(text, "\"\(text)\" has no closing \"]\".")
            }
            addressText = text[text.index(after: text.startIndex)..<close]
            bracketed = true
            let after = text[text.index(after: close)...]
            if after.isEmpty {
                interfaceText = nil
            } else if after.first == "%" {
                interfaceText = after.dropFirst()
            } else {
                throw fail(text, "\"\(text)\" has \"\(after)\" after \"]\"; only \"%INTERFACE\" may follow.")
            }
        } else if let percent = text.firstIndex(of: "%") {
            addressText = text[..<percent]
            interfaceText = text[text.index(after: percent)...]
        } else {
            addressText = text
            interfaceText = nil
        }

        var address: IPAddress?
        if addressText == "*" && !bracketed {
            address = nil
        } else if addressText.isEmpty && interfaceText != nil && !bracketed {
            address = nil
        } else {
            guard let parsed = IPAddress(String(addressText)), !bracketed || addressText.contains(":") else {
                throw fail(addressText, "\"\(addressText)\" is not an IPv4 or IPv6 address"
                    + (bracketed ? " (brackets hold IPv6 addresses only)." : "."))
            }
            if parsed.isMulticast {
                throw fail(addressText, "\"\(addressText)\" is a multicast address; give a unicast or wildcard address to listen on.")
            }
            address = parsed
        }

        var interface = ""
        if let interfaceText {
            interface = String(interfaceText)
            try checkInterface(interface, in: text)
        }
        return ListenPrefix(address: address, interface: interface)
    }

    /// Applies the kernel's interface name rules (dev_valid_name, `Rule.interfaceNameProblem`).
    func checkInterface(_ name: String, in prefix: Substring) throws(PortSpecError) {
        if name.isEmpty {
            throw fail(prefix, "\"\(prefix)\" has no interface name after \"%\".")
        }
        if let problem = Rule.interfaceNameProblem(name) { throw fail(name, problem) }
    }

    // MARK: Step 2

    /// Parses `PORT[-PORT]` into a valid, non-reversed range of ports 1-65535.
    func parseRange(_ text: Substring) throws(PortSpecError) -> (first: Int, last: Int) {
        let dash = text.firstIndex(of: "-")
        let firstText = dash.map { text[..<$0] } ?? text
        let lastText = dash.map { text[text.index(after: $0)...] }
        let first = try parsePortNumber(firstText, in: text)
        var last = first
        if let lastText { last = try parsePortNumber(lastText, in: text) }
        if last < first {
            throw fail(text, "range \"\(text)\" is reversed; give the lower port first.")
        }
        if first == 0 { throw fail(firstText, "port \"0\" is out of range; ports are 1-65535.") }
        if last == 0 { throw fail(lastText ?? text, "port \"0\" is out of range; ports are 1-65535.") }
        return (first, last)
    }

    /// Parses one decimal port number 0-65535 (0 is rejected by the caller, after the reversed
    /// range check, so `1-0` is reported as reversed).
    func parsePortNumber(_ text: Substring, in range: Substring) throws(PortSpecError) -> Int {
        if text.isEmpty {
            throw fail(range, "\"\(range)\" is missing a port number.")
        }
        guard text.utf8.allSatisfy({ $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }) else {
            throw fail(text, "\"\(text)\" is not a port number; ports are 1-65535.")
        }
        let digits = text.drop { $0 == "0" }
        guard digits.count <= 5, let value = Int(digits.isEmpty ? "0" : digits), value <= 65535 else {
            throw fail(text, "port \"\(text)\" is out of range; ports are 1-65535.")
        }
        return value
    }

    /// Parses an include item `F[-L][:TARGET]` into a segment on the listening side `prefix`.
    func parseInclude(_ item: Substring, index: Int, prefix: ListenPrefix) throws(PortSpecError) -> Segment {
        if item.contains("/") && !Self.isPortWithTargetAddress(item) {
            throw fail(item, "\"\(item)\" is neither a port range nor a port with a target address; "
                + "a listening address can only be given once, before the first port.")
        }
        let colon = item.firstIndex(of: ":")
        let portText = colon.map { item[..<$0] } ?? item
        let (first, last) = try parseRange(portText)
        var segment = Segment(first: first, last: last, to: first, address: prefix.address,
                              targetAddress: nil, item: item, index: index)
        guard let colon else { return segment }

        let target = item[item.index(after: colon)...]
        if target.isEmpty {
            throw fail(item, "\"\(item)\" has nothing after \":\"; give a target port or address.")
        }
        var targetPorts: Substring?
        if target.first == "[" {
            guard let close = target.firstIndex(of: "]") else {
                throw fail(target, "\"\(target)\" has no closing \"]\".")
            }
            let addressText = target[target.index(after: target.startIndex)..<close]
            segment.targetAddress = try parseTargetAddress(addressText, bracketed: true)
            let after = target[target.index(after: close)...]
            if after.first == "/" {
                targetPorts = after.dropFirst()
            } else if !after.isEmpty {
                throw fail(target, "\"\(target)\" has \"\(after)\" after \"]\"; only \"/PORTS\" may follow.")
            }
        } else if let slash = target.firstIndex(of: "/") {
            segment.targetAddress = try parseTargetAddress(target[..<slash], bracketed: false)
            targetPorts = target[target.index(after: slash)...]
        } else if target.first?.isNumber == true && !target.contains(".") {
            targetPorts = target
        } else {
            segment.targetAddress = try parseTargetAddress(target, bracketed: false)
        }

        if let targetPorts {
            if targetPorts.isEmpty {
                throw fail(item, "\"\(item)\" has nothing after the target address's \"/\"; give a target port.")
            }
            let hasLast = targetPorts.contains("-")
            let (to, toLast) = try parseRange(targetPorts)
            if hasLast && toLast - to != last - first {
                throw fail(item, "\"\(item)\" maps \(last - first + 1) ports to \(toLast - to + 1); "
                    + "the target range must be as long as the listening range.")
            }
            if to + (last - first) > 65535 {
                throw fail(item, "\"\(item)\" maps ports \(first)-\(last) to \(to)-\(to + last - first), past 65535.")
            }
            segment.to = to
        }

        if let targetAddress = segment.targetAddress {
            if let address = prefix.address {
                if address.family != targetAddress.family {
                    throw fail(item, "\"\(item)\" forwards to \(targetAddress.family) address \(targetAddress) "
                        + "but listens on \(address.family) address \(address); use one family for both.")
                }
            } else {
                // A target address pins the family: listen on that family's wildcard address.
                segment.address = targetAddress.family == .ipv4 ? .anyIPv4 : .anyIPv6
            }
        }
        return segment
    }

    /// Parses a target address: IPv4, or IPv6 inside brackets; not a wildcard or multicast.
    func parseTargetAddress(_ text: Substring, bracketed: Bool) throws(PortSpecError) -> IPAddress {
        guard let address = IPAddress(String(text)) else {
            throw fail(text, "\"\(text)\" is not an IPv4 or IPv6 address.")
        }
        if bracketed != text.contains(":") {
            throw fail(text, bracketed
                ? "\"\(text)\" is in brackets, which are for IPv6 addresses only."
                : "IPv6 target address \"\(text)\" must be in brackets, as in \"22:[\(text)]/22\".")
        }
        if address.isUnspecified {
            throw fail(text, "target address \"\(text)\" is a wildcard; leave it out to use the default target.")
        }
        if address.isMulticast {
            throw fail(text, "target address \"\(text)\" is a multicast address.")
        }
        return address
    }

    // MARK: Step 3

    /// Rejects includes that share a listening port, naming the later of the two items.
    func checkOverlaps(_ includes: [Segment]) throws(PortSpecError) {
        let sorted = includes.sorted { ($0.first, $0.index) < ($1.first, $1.index) }
        guard var widest = sorted.first else { return }
        for segment in sorted.dropFirst() {
            if segment.first <= widest.last {
                let (earlier, later) = widest.index < segment.index ? (widest, segment) : (segment, widest)
                throw fail(later.item, "\"\(later.item)\" overlaps \"\(earlier.item)\"; each port can be forwarded only once.")
            }
            if segment.last > widest.last { widest = segment }
        }
    }

    /// Sorts ranges and joins those that overlap or touch.
    func mergeRanges(_ ranges: [(first: Int, last: Int)]) -> [(first: Int, last: Int)] {
        var merged: [(first: Int, last: Int)] = []
        for range in ranges.sorted(by: { $0.first < $1.first }) {
            if let top = merged.last, range.first <= top.last + 1 {
                merged[merged.count - 1].last = max(top.last, range.last)
            } else {
                merged.append(range)
            }
        }
        return merged
    }

    /// Cuts the sorted, disjoint `exclusions` out of every segment, keeping target offsets.
    func subtract(_ exclusions: [(first: Int, last: Int)], from segments: [Segment]) -> [Segment] {
        var result: [Segment] = []
        for segment in segments {
            var start = segment.first
            for exclusion in exclusions where exclusion.last >= start && exclusion.first <= segment.last {
                if exclusion.first > start {
                    result.append(segment.slice(start, exclusion.first - 1))
                }
                start = exclusion.last + 1
            }
            if start <= segment.last { result.append(segment.slice(start, segment.last)) }
        }
        return result
    }

    // MARK: Step 4

    /// Joins neighbouring segments whose listening and target ports both continue.
    func merge(_ segments: [Segment]) -> [Segment] {
        var merged: [Segment] = []
        for segment in segments.sorted(by: { $0.first < $1.first }) {
            if let top = merged.last, top.last + 1 == segment.first, top.to + (top.last - top.first) + 1 == segment.to,
                top.address == segment.address, top.targetAddress == segment.targetAddress
            {
                merged[merged.count - 1].last = segment.last
            } else {
                merged.append(segment)
            }
        }
        return merged
    }
}

extension Segment {
    /// The part of the segment listening on `first...last`, with its target shifted to match.
    fileprivate func slice(_ first: Int, _ last: Int) -> Segment {
        var copy = self
        copy.to = to + (first - self.first)
        copy.first = first
        copy.last = last
        return copy
    }
}

// SPDX-License-Identifier: GPL-2.0-or-later

// PortSpecDiagnosis: why a port spec that PortSpec refused cannot be read, in words a user
// can act on.
//
// Theory of operation
// -------------------
// PortSpec decides what is accepted, exactly as upstream pesto does; this file never changes
// a decision. Once the parser has given up at some position, it asks here for the sentence to
// print. Each sentence names the user's own text (quoted, as PortSpecError.piece), says what
// is wrong with it, and says what to write instead, using the user's own ports where it can:
//
// * a listening prefix that did not read (`1.2.3/35190`, `localhost/22`, `[::1/22`,
//   `%toolonginterface/22`): the greedy parser then read the whole argument as ports and
//   stopped somewhere inside the prefix, which used to produce "".2.3/35190" follows the
//   ports"; the text before the first "/" is named as the listening address instead;
// * a port past 65535, a reversed range, a range without its last port;
// * a target (after ":") with any of those, or after an exclusion or `auto`, which take none.
//
// The same sentences are the Cockpit page's (cockpit/port-spec.js), and
// Tests/port-spec-cases.json holds the cases both test suites check.

/// Explains a refused port spec; see the file header.
enum PortSpecDiagnosis {
    /// The text of `bytes[range]`.
    static func text(_ bytes: [UInt8], _ range: Range<Int>) -> String {
        String(decoding: bytes[range], as: UTF8.self)
    }

    /// The end of the listening prefix the user meant, when there is one: the position of the
    /// first "/", provided the text before it could be a prefix (it has no ":" outside
    /// brackets, so it is not `PORT:TARGET/...`, or it starts with "[" or holds "%").
    static func meantPrefixEnd(_ bytes: [UInt8]) -> Int? {
        guard let slash = bytes.firstIndex(of: UInt8(ascii: "/")), slash > 0 else { return nil }
        let before = bytes[..<slash]
        if before.first == UInt8(ascii: "[") || before.contains(UInt8(ascii: "%")) { return slash }
        return before.contains(UInt8(ascii: ":")) ? nil : slash
    }

    /// Why the listening prefix `bytes[..<end]` (the text before "/") cannot be read.
    /// `isAddress` says whether a text is an IP address PortSpec reads.
    static func prefix(_ bytes: [UInt8], end: Int, isAddress: (String) -> Bool) -> (piece: String, message: String) {
        let prefix = text(bytes, 0..<end)
        let ports = text(bytes, (end + 1)..<bytes.count)
        let example = ports.isEmpty ? "8080" : ports
        var address = prefix
        if let percent = prefix.firstIndex(of: "%") {
            address = String(prefix[..<percent])
            let interface = String(prefix[prefix.index(after: percent)...])
            if interface.isEmpty {
                return (prefix, "\"\(prefix)\" has \"%\" but no interface name after it; write e.g. \(address)%eth0/\(example).")
            }
            if interface.utf8.count > 15 {
                return (
                    interface,
                    "interface name \"\(interface)\" is \(interface.utf8.count) bytes long; Linux allows at most 15. "
                        + "Write the interface's real name, as `ip link` shows it."
                )
            }
            if address.isEmpty || address == "*" || isAddress(address) {
                return (
                    prefix, "cannot read \"\(prefix)\" as a listening address and interface; write ADDRESS%IFNAME/\(example)."
                )
            }
        }
        if address.hasPrefix("[") && !address.hasSuffix("]") {
            return (address, "\"\(address)\" lacks its closing \"]\"; write \(address)]/\(example).")
        }
        return (
            address,
            "\"\(address)\" before \"/\" is not an IP address, so it cannot be the listening address; "
                + "write a whole IPv4 address (127.0.0.1/\(example)), an IPv6 address ([::1]/\(example)), "
                + "or no address to listen on all (\(example))."
        )
    }

    /// A run of decimal digits at `at`: its value (capped) and where it ends; nil when none.
    static func number(_ bytes: [UInt8], at: Int) -> (value: Int, end: Int)? {
        var end = at
        var value = 0
        while end < bytes.count, bytes[end] >= UInt8(ascii: "0"), bytes[end] <= UInt8(ascii: "9") {
            value = min(value * 10 + Int(bytes[end] - UInt8(ascii: "0")), 1_000_000)
            end += 1
        }
        return end > at ? (value, end) : nil
    }

    /// A port number past 65535 (`number`, as typed) in the user's `quoted` piece.
    static func pastTop(_ number: String, quoted: String, role: String) -> String {
        if number == quoted { return "\"\(quoted)\" is past 65535, the highest port; give a port from 1 to 65535." }
        return "\(role) \(number) in \"\(quoted)\" is past 65535, the highest port; give ports from 1 to 65535."
    }

    /// Why the range at the start of `piece` (e.g. `70000`, `35100-35090`, `22-`) is wrong, or
    /// nil when it reads as a range. `role` is "port" or "target port".
    static func range(_ piece: [UInt8], quoted: String, role: String) -> String? {
        guard let first = number(piece, at: 0) else { return nil }
        if first.value > 65535 {
            return pastTop(text(piece, 0..<first.end), quoted: quoted, role: role)
        }
        guard first.end < piece.count, piece[first.end] == UInt8(ascii: "-") else { return nil }
        guard let last = number(piece, at: first.end + 1) else {
            let example = "\(first.value)-\(min(first.value + 9, 65535))"
            return "\"\(quoted)\" has a range without its last port; write \(first.value)-LAST, e.g. \(example)."
        }
        if last.value > 65535 {
            return pastTop(text(piece, (first.end + 1)..<last.end), quoted: quoted, role: role)
        }
        if last.value < first.value {
            return "\"\(quoted)\" is a reversed range: it ends (\(last.value)) before it starts (\(first.value)); "
                + "write \(last.value)-\(first.value)."
        }
        return nil
    }

    /// Why the chunk at `at` (up to the next ",") cannot be read; `after` is the kind of chunk
    /// read just before `at` when the error is text following it ("include", "exclude", "auto",
    /// "all"), else nil.
    static func chunk(_ bytes: [UInt8], at: Int, after: String?) -> (piece: String, message: String) {
        var end = at
        while end < bytes.count, bytes[end] != UInt8(ascii: ",") { end += 1 }
        let piece = text(bytes, at..<end)
        let pieceBytes = Array(bytes[at..<end])
        if pieceBytes.first == UInt8(ascii: ":") {
            if let after, after != "include" {
                let what = after == "exclude" ? "an exclusion (~)" : "\"\(after)\""
                return (piece, "\"\(piece)\" follows \(what), which takes no target; remove it.")
            }
            let target = Array(pieceBytes.dropFirst())
            if target.isEmpty {
                return (piece, "\"\(piece)\" names no target; give a target port (:8080) or address (:10.0.0.2), or leave out \":\".")
            }
            if let why = range(target, quoted: piece, role: "target port") { return (piece, why) }
            return (
                piece,
                "cannot read \"\(piece)\" as a target; write :PORT, :FIRST-LAST, :ADDRESS or :ADDRESS/PORT "
                    + "(IPv6 in brackets)."
            )
        }
        if after != nil {
            return (
                piece,
                "\"\(piece)\" follows the ports; separate ports with commas, as in 22,80, and give ranges as 8000-8010."
            )
        }
        if pieceBytes.isEmpty && at == 0 {
            return (",", "the spec starts with \",\"; remove it, or put a port before it.")
        }
        if pieceBytes.isEmpty {
            return (",,", "\",,\" leaves a port out; remove one \",\", or put a port between them.")
        }
        let body = pieceBytes.first == UInt8(ascii: "~") ? Array(pieceBytes.dropFirst()) : pieceBytes
        if let why = range(body, quoted: piece, role: "port") { return (piece, why) }
        return (
            piece,
            "cannot read \"\(piece)\" as ports; give a port (8080), a range (8080-8089), a list (22,80), "
                + "\"all\", \"auto\" or \"none\"."
        )
    }
}

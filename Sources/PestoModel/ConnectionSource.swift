// SPDX-License-Identifier: GPL-2.0-or-later

// ConnectionSource: the rule key `source`, which says whose address a relayed connection or
// flow comes from at the target.
//
// `pestod` (the default): the target sees pestod's own address, as it always did.
// `client`: the target sees the client's own address and port ("transparent source"): pestod
// makes its target-side socket inside the namespace it was given (`--netns`) with
// IP_TRANSPARENT, binds it to the client's address and port and connects from there; the
// policy routing that brings the target's replies back to that socket is pestod's own
// (doc/data-path.md, pestod(8)). It is therefore valid only where pestod makes its target
// sockets in that namespace: rules of the HOST table of a pestod started with `--netns`
// (RuleValidation.swift refuses it elsewhere, and together with `proxy-protocol`).

/// Whose address a relayed connection or flow comes from at its target.
public enum ConnectionSource: String, CaseIterable, Hashable, Sendable, CustomStringConvertible {
    /// pestod's own address (the default).
    case pestod
    /// The client's own address and port (IP_TRANSPARENT in the target namespace).
    case client

    /// Parses a rule description's value ("pestod" or "client"; "" means the default).
    /// - Throws: `PestoError` `.invalidRule` for anything else.
    public init(parsing text: String) throws(PestoError) {
        if text.isEmpty {
            self = .pestod
            return
        }
        guard let value = ConnectionSource(rawValue: text) else {
            throw PestoError(.invalidRule, "source \(ClientText.quote(text)) is not \"pestod\" or \"client\".")
        }
        self = value
    }

    public var description: String { rawValue }
}

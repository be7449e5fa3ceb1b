// SPDX-License-Identifier: GPL-2.0-or-later

// OverlapPolicy: what a table does with active rules that could claim the same packet
// (doc/overlap.md). "Pesto protocol proposals" names both ways: refuse the overlap at
// ACTIVATE, or allow it and let the first matching rule win.

/// How a table treats rules that overlap active ones.
public enum OverlapPolicy: String, Hashable, Sendable, CaseIterable, CustomStringConvertible {
    /// Activating a rule that overlaps an active one fails with `Conflict` (the default).
    case refuse
    /// Overlapping rules may be active together; a new connection or flow goes to the active
    /// rule with the lowest ID among those that match it. Rules share listening sockets.
    case firstMatch = "first-match"

    public var description: String { rawValue }
}

// SPDX-License-Identifier: GPL-2.0-or-later

// TableModel: what the contract says about a table and a rule's state in it: which table
// (HOST or SPLICE), its limits, and a rule's status as `Status` reports it. The engine's
// `ForwardingTable` (in PestoEngine) keeps these; clients decode them.

/// Which of the two tables of pasta's model a table is.
public enum TableKind: String, Hashable, Sendable, CaseIterable {
    /// Inbound: listen on the host, forward to the target (pasta's HOST pif, `-t/-u`).
    case host
    /// Outbound: listen inside the target namespace, forward to the host (SPLICE pif, `-T/-U`).
    case splice

    /// The contract's `Name` property (`HOST`, `SPLICE`).
    public var name: String { rawValue.uppercased() }
}

/// A table's configurable limits.
public struct TableLimits: Hashable, Sendable {
    /// Most rules the table holds (upstream stops at 255).
    public var maxRules: Int
    /// Most listening sockets the rules of the table may need together.
    public var maxSockets: Int

    /// The defaults: 65,535 rules and 5 × 65,536 sockets.
    public static let `default` = TableLimits(maxRules: 65_535, maxSockets: 5 * 65_536)

    /// Makes limits.
    public init(maxRules: Int, maxSockets: Int) {
        self.maxRules = maxRules
        self.maxSockets = maxSockets
    }
}

/// A rule's state as the contract's `Status` reports it.
public struct RuleStatus: Hashable, Sendable {
    /// Whether the rule is active.
    public var active: Bool
    /// Sockets currently bound (and listening, for TCP).
    public var bound: UInt32
    /// Sockets whose bind or listen failed and are waiting for a retry.
    public var failed: UInt32
    /// The errno of the latest failure, while any failure remains.
    public var lastError: Errno?

    /// Makes a status.
    public init(active: Bool, bound: UInt32, failed: UInt32, lastError: Errno?) {
        self.active = active
        self.bound = bound
        self.failed = failed
        self.lastError = lastError
    }

    /// The contract's `last_error`: the errno name, or "" without failures.
    public var lastErrorName: String { lastError?.name ?? "" }

    /// The state of an inactive rule.
    public static let inactive = RuleStatus(active: false, bound: 0, failed: 0, lastError: nil)
}

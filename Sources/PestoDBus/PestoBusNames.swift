// SPDX-License-Identifier: GPL-2.0-or-later

// PestoBusNames: the names and paths of the D-Bus contract, spelled once.

import PestoModel

/// The bus name, object paths and error names of the contract (doc/dbus-api.md).
public enum PestoBusNames {
    /// The well-known bus name.
    public static let busName = "top.passt.Pesto1"
    /// The Manager object's path.
    public static let managerPath = "/top/passt/Pesto1"
    /// The prefix of every error name.
    public static let errorPrefix = "top.passt.Pesto1.Error."
    /// The contract's version, the Manager's `Version`.
    public static let version = "1.0"

    /// The D-Bus error name for an engine error code.
    public static func errorName(_ code: PestoError.Code) -> String { errorPrefix + code.name }

    /// The object path of a table.
    public static func tablePath(_ kind: TableKind) -> String {
        switch kind {  // built once: every per-rule signal names its table's path
        case .host: return hostTablePath
        case .splice: return spliceTablePath
        }
    }
    private static let hostTablePath = managerPath + "/tables/" + TableKind.host.rawValue
    private static let spliceTablePath = managerPath + "/tables/" + TableKind.splice.rawValue

    /// The object path of a rule.
    public static func rulePath(_ kind: TableKind, _ id: UInt32) -> String { tablePath(kind) + "/rules/" + String(id) }
}

// PestoService: the D-Bus face of the engine (see DBUS-API.md). Built out in the D-Bus issue.

import PestoEngine

/// The bus name, interface prefix and object paths of the D-Bus contract (DBUS-API.md).
public enum PestoBusNames {
    /// The well-known bus name.
    public static let busName = "top.passt.Pesto1"
    /// The Manager object's path.
    public static let managerPath = "/top/passt/Pesto1"
    /// The prefix of every error name.
    public static let errorPrefix = "top.passt.Pesto1.Error."

    /// The D-Bus error name for an engine error code.
    public static func errorName(_ code: PestoError.Code) -> String { errorPrefix + code.name }

    /// The object path of a table.
    public static func tablePath(_ kind: TableKind) -> String { "\(managerPath)/tables/\(kind.rawValue)" }
}

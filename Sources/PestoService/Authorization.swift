// SPDX-License-Identifier: GPL-2.0-or-later

// Authorization: who may change the tables.
//
// doc/dbus-api.md, "Authorisation": on the system bus every mutating method and Lock is checked against the
// polkit action `top.passt.Pesto1.modify` for the caller before anything changes; without
// polkit only uid 0 is allowed; on the session bus nothing is checked (the bus is the
// user's own). The check is asynchronous (a round trip to the bus daemon or to polkit), so
// the server asks about each mutating call as it arrives and runs it after its answer, a
// sender's calls in that sender's order (AuthorizationQueue.swift).
//
// This file has the policy modes and the uid-0 check; the polkit CheckAuthorization call
// plugs in as another `Authorizer`.

import PestoDBus
import PestoEngine
import PestoModel
import PestoSystem

/// The polkit actions of `polkit/top.passt.Pesto1.policy`.
public enum PestoActions {
    public static let modify = "top.passt.Pesto1.modify"
}

/// Decides whether a caller may perform an action; answers asynchronously on the loop thread.
public protocol Authorizer: AnyObject {
    /// Calls `completion` with nil when `sender` may perform `action`, else with the error to
    /// send. Returns what withdraws the check (after which `completion` is never called), or
    /// nil when there is nothing worth withdrawing.
    @discardableResult
    func authorize(sender: String, action: String, interactive: Bool, completion: @escaping (DBusErrorReply?) -> Void)
        -> AuthorizationCancellation?
}

/// Withdraws one check in progress (its caller left the bus).
public struct AuthorizationCancellation {
    /// Called at most once, on the loop thread.
    public let cancel: () -> Void

    public init(_ cancel: @escaping () -> Void) { self.cancel = cancel }
}

/// How pestod authorises mutating calls.
public enum AuthorizationMode: String, CaseIterable, Sendable {
    /// Nobody is checked: the default only on the session bus, which is the user's own;
    /// chosen for any other bus (a private `--address` bus included), pestod logs a warning.
    case none
    /// Only uid 0 may change the tables (the contract's rule when polkit is missing).
    case root
    /// polkit decides (action top.passt.Pesto1.modify); without polkit, only uid 0.
    case polkit
}

/// Allows a caller whose connection belongs to uid 0, asking the bus daemon
/// (`GetConnectionUnixUser`); every other caller, and any failure to find out, is denied.
public final class RootOnlyAuthorizer: Authorizer {
    private unowned let connection: DBusConnection

    public init(connection: DBusConnection) { self.connection = connection }

    /// Asks the bus daemon, which answers at once: nothing to withdraw.
    @discardableResult
    public func authorize(sender: String, action: String, interactive: Bool, completion: @escaping (DBusErrorReply?) -> Void)
        -> AuthorizationCancellation?
    {
        let query = DBusMessage.methodCall(
            destination: "org.freedesktop.DBus", path: "/org/freedesktop/DBus", interface: "org.freedesktop.DBus",
            member: "GetConnectionUnixUser", arguments: [.string(sender)])
        connection.send(query, timeoutMilliseconds: 5_000) { reply in
            if let uid = reply.arguments?.first?.uint32Value, !reply.isError {
                completion(uid == 0 ? nil : Self.denied(action, "uid \(uid) is not root"))
            } else {
                completion(Self.denied(action, "cannot find out who the caller is (\(reply.asError?.message ?? "no answer"))"))
            }
        }
        return nil
    }

    static func denied(_ action: String, _ why: String) -> DBusErrorReply {
        DBusErrorReply(DBusErrorReply.accessDenied, "Not authorized to \(action): \(why).")
    }
}

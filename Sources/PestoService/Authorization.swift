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

    /// Forgets what it remembers about `sender`, which left the bus.
    func senderLeft(_ sender: String)
}

extension Authorizer {
    /// Nothing remembered by default.
    public func senderLeft(_ sender: String) {}
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

/// Allows a caller whose connection belongs to uid 0, as the bus daemon tells
/// (`GetConnectionUnixUser`, asked once per connection: CallerUIDs.swift); every other
/// caller, and any failure to find out, is denied.
public final class RootOnlyAuthorizer: Authorizer {
    /// The callers' uids, remembered while they are on the bus.
    public let uids: CallerUIDs

    public init(connection: DBusConnection) { uids = CallerUIDs(connection: connection) }

    /// Answers at once for a caller seen before, else once the bus daemon has: nothing to
    /// withdraw.
    @discardableResult
    public func authorize(sender: String, action: String, interactive: Bool, completion: @escaping (DBusErrorReply?) -> Void)
        -> AuthorizationCancellation?
    {
        uids.uid(of: sender) { answer in
            switch answer {
            case .success(let uid):
                completion(uid == 0 ? nil : Self.denied(action, "uid \(uid) is not root"))
            case .failure(let error):
                completion(Self.denied(action, "cannot find out who the caller is (\(error.message))"))
            }
        }
        return nil
    }

    public func senderLeft(_ sender: String) { uids.senderLeft(sender) }

    static func denied(_ action: String, _ why: String) -> DBusErrorReply {
        DBusErrorReply(DBusErrorReply.accessDenied, "Not authorized to \(action): \(why).")
    }
}

// SPDX-License-Identifier: GPL-2.0-or-later

// PolkitAuthorizer: asks polkit whether a caller may perform an action.
//
// doc/dbus-api.md "Authorisation" and systemd's src/shared/bus-polkit.c: the subject is the
// caller's bus name (`system-bus-name`), user interaction is allowed only when the method
// call carries the allow-interactive-authorization flag, a challenge becomes
// `InteractiveAuthorizationRequired`, and a polkit that is missing or fails means denied,
// except for uid 0 (checked with the bus daemon, as `RootOnlyAuthorizer` does).
//
// The call is asynchronous: pestod's loop keeps serving reads and traffic while polkit
// (and perhaps an authentication agent) answers. Each call carries a cancellation id, so a
// check whose caller left the bus is withdrawn with CancelCheckAuthorization: polkit drops
// it (and any authentication dialog), and answers the call at once, which frees pestod's
// slot among the calls the bus lets it have outstanding.

import PestoDBus
import PestoEngine
import PestoModel
import PestoSystem

/// Authorises callers with polkit's `CheckAuthorization`; without polkit, only uid 0.
public final class PolkitAuthorizer: Authorizer {
    private unowned let connection: DBusConnection
    /// The uid-0 rule used when polkit cannot answer.
    private let fallback: RootOnlyAuthorizer

    /// `org.freedesktop.DBus.Error.InteractiveAuthorizationRequired` (not in DBusErrorReply's list).
    public static let interactiveAuthorizationRequired = "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"

    static let busName = "org.freedesktop.PolicyKit1"
    static let authorityPath = "/org/freedesktop/PolicyKit1/Authority"
    static let authorityInterface = "org.freedesktop.PolicyKit1.Authority"
    /// `CheckAuthorizationFlags.AllowUserInteraction`.
    static let allowUserInteraction: UInt32 = 1

    /// How long polkit may take: a person answering an authentication agent needs longer.
    static let timeoutMilliseconds: Int32 = 25_000
    static let interactiveTimeoutMilliseconds: Int32 = 300_000

    public init(connection: DBusConnection) {
        self.connection = connection
        fallback = RootOnlyAuthorizer(connection: connection)
    }

    /// Numbers the cancellation ids of this authorizer's checks.
    private var checks: UInt64 = 0

    /// The `CheckAuthorization` call, signature `(sa{sv})sa{ss}us`; `cancellationID` names it
    /// for `CancelCheckAuthorization` (empty: not cancellable).
    static func checkAuthorization(sender: String, action: String, interactive: Bool, cancellationID: String = "") -> DBusMessage {
        let subject = DBusValue.structure([.string("system-bus-name"), .vardict([("name", .string(sender))])])
        return DBusMessage.methodCall(
            destination: busName, path: authorityPath, interface: authorityInterface, member: "CheckAuthorization",
            arguments: [
                subject, .string(action), .dictionary(key: "s", value: "s", []),
                .uint32(interactive ? allowUserInteraction : 0), .string(cancellationID),
            ])
    }

    /// The `CancelCheckAuthorization` call for the check named `cancellationID` (no reply wanted).
    static func cancelCheckAuthorization(_ cancellationID: String) -> DBusMessage {
        let m = DBusMessage.methodCall(
            destination: busName, path: authorityPath, interface: authorityInterface, member: "CancelCheckAuthorization",
            arguments: [.string(cancellationID)])
        m.noReply = true
        return m
    }

    /// Where one check is: answered by polkit, withdrawn (its answer is then ignored).
    private final class CheckState {
        var answered = false
        var withdrawn = false
    }

    /// What a `CheckAuthorization` reply means.
    enum Verdict: Equatable {
        case authorized
        /// polkit would ask the user (only possible when interaction was not allowed).
        case challenge
        /// polkit said no; `dismissed` when the user dismissed the authentication dialog.
        case denied(dismissed: Bool)
        /// The reply was an error or not `(bba{ss})`; the reason, for the message.
        case unavailable(String)
    }

    /// Reads a `CheckAuthorization` reply: `((bba{ss}))`, i.e. one struct of
    /// is_authorized, is_challenge and details.
    static func verdict(of reply: DBusMessage) -> Verdict {
        verdict(error: reply.asError, arguments: reply.arguments)
    }

    /// `verdict(of:)` from the reply's error (for an error message) and arguments.
    static func verdict(error: DBusErrorReply?, arguments: [DBusValue]?) -> Verdict {
        if let error {
            return .unavailable(error.message.isEmpty ? error.name : "\(error.name): \(error.message)")
        }
        guard let fields = arguments?.first?.structValue, fields.count == 3,
            let authorized = fields[0].boolValue, let challenge = fields[1].boolValue
        else { return .unavailable("unexpected reply: \((arguments ?? []).map(\.signature).joined())") }
        if authorized { return .authorized }
        if challenge { return .challenge }
        var dismissed = false
        if case .dictionary(_, _, let entries) = fields[2] {
            dismissed = entries.contains { $0.key == .string("polkit.dismissed") && $0.value == .string("true") }
        }
        return .denied(dismissed: dismissed)
    }

    public func senderLeft(_ sender: String) { fallback.senderLeft(sender) }

    /// Asks polkit; the result withdraws the check (CancelCheckAuthorization).
    @discardableResult
    public func authorize(sender: String, action: String, interactive: Bool, completion: @escaping (DBusErrorReply?) -> Void)
        -> AuthorizationCancellation?
    {
        checks += 1
        let cancellationID = "pestod-\(checks)"
        let query = Self.checkAuthorization(sender: sender, action: action, interactive: interactive, cancellationID: cancellationID)
        let timeout = interactive ? Self.interactiveTimeoutMilliseconds : Self.timeoutMilliseconds
        let state = CheckState()
        connection.send(query, timeoutMilliseconds: timeout) { [fallback] reply in
            state.answered = true
            if state.withdrawn { return }
            switch Self.verdict(of: reply) {
            case .authorized:
                completion(nil)
            case .challenge:
                completion(
                    DBusErrorReply(
                        Self.interactiveAuthorizationRequired,
                        "Authentication is required to \(action): call again allowing interactive authorization."))
            case .denied(let dismissed):
                completion(
                    RootOnlyAuthorizer.denied(
                        action, dismissed ? "the authentication dialog was dismissed" : "polkit refused it"))
            case .unavailable(let why):
                // A missing or failing polkit means denied, except for uid 0.
                fallback.authorize(sender: sender, action: action, interactive: interactive) { refusal in
                    if state.withdrawn { return }
                    completion(
                        refusal.map { r in
                            let text = r.message.hasSuffix(".") ? String(r.message.dropLast()) : r.message
                            return DBusErrorReply(r.name, "\(text), and polkit did not answer (\(why)).")
                        })
                }
            }
        }
        return AuthorizationCancellation { [connection] in
            guard !state.withdrawn else { return }
            state.withdrawn = true
            if !state.answered { connection.send(Self.cancelCheckAuthorization(cancellationID)) }
        }
    }
}

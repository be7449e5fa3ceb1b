// SPDX-License-Identifier: GPL-2.0-or-later

// ChangeGate: the check order of a change, in one place.
//
// doc/dbus-api.md lists the order in which every mutating call is checked, as systemd's
// hostnamed does in its method bodies. Steps 1–3 read the message (PestoServer.dispatch,
// TableMethods.swift); the gate takes the decoded change from there:
//
//   4. validate     the rules against their table (InvalidRule)          TablesEditor.validate
//   5. lock         another name holds the lock (Locked)                 TablesEditor.checkLock
//   6. authorise    the caller, asynchronously (AccessDenied, ...)       AuthorizationQueue
//   7. change       the lock again, then the engine (RuleExists, ...)    TablesEditor.execute
//                   (held back, in arrival order, while a large update is carried out
//                   over several loop turns: SlicedUpdate.swift, ChangeQueue.swift)
//   8. signals      reported by the editor to its observer as the change becomes final
//   9. save, 10. reply   the server, with the committed journal the gate hands back
//
// Steps 4 and 5 are pure and cheap, so nobody is asked for a password for a change that an
// invalid rule or the lock refuses. The lock is checked again in step 7 because it may have
// been taken while the authorisation was pending. The gate knows no D-Bus messages: it is
// tested in process with a scripted authorizer (Tests/PestoServiceTests/TablesEditorTests.swift).

import PestoDBus
import PestoEngine
import PestoModel
import PestoSystem

/// Why a change was not made.
enum ChangeRefusal: Error {
    /// Steps 4, 5 or 7: invalid, locked, or refused by the tables.
    case refused(PestoError)
    /// Step 6: the authorizer's refusal, as it gave it.
    case unauthorized(DBusErrorReply)
    /// Step 6: the caller has too much waiting for authorisation already.
    case tooManyWaiting(AuthorizationQueue.Limit)
    /// Step 7: the caller has too much held back behind a large update already (why).
    case tooManyHeldBack(String)
}

/// Checks and runs changes in the documented order.
final class ChangeGate {
    let editor: TablesEditor
    /// The changes waiting for authorisation; nil lets everyone change the tables.
    var authorization: AuthorizationQueue?

    /// A gate in front of `editor`, asking `authorization` (nobody when nil).
    init(editor: TablesEditor, authorization: AuthorizationQueue? = nil) {
        self.editor = editor
        self.authorization = authorization
    }

    /// Takes a decoded change of `sender` through steps 4 to 7. `done` is called exactly
    /// once — at once when a step before authorisation refuses it or nobody authorises, else
    /// once the authorizer has answered; later if the change is held back behind an update
    /// in progress or is itself one — unless `sender` leaves the bus while its change waits
    /// for authorisation (AuthorizationQueue drops it) or is held back. `bytes` is the size of the
    /// change's arguments, counted against the sender's limit.
    func submit(
        _ change: TableChange, sender: String, interactive: Bool = false, bytes: Int = 0,
        done: @escaping (Result<(result: ChangeResult, committed: Journal), ChangeRefusal>) -> Void
    ) {
        // 4. validate
        do { try editor.validate(change) } catch { return done(.failure(.refused(error))) }
        // 5. lock (a Lock by its holder is a no-op, so it passes too)
        do { try editor.checkLock(sender) } catch { return done(.failure(.refused(error))) }
        // 6. authorise
        guard let authorization else { return execute(change, sender: sender, bytes: bytes, done: done) }
        let limit = authorization.submit(sender: sender, interactive: interactive, bytes: bytes) { [unowned self] refusal in
            if let refusal { return done(.failure(.unauthorized(refusal))) }
            self.execute(change, sender: sender, bytes: bytes, done: done)
        }
        if let limit { done(.failure(.tooManyWaiting(limit))) }
    }

    /// 7. change (8. the editor reports it to its observer): now, or once the update in
    /// progress and the changes held back before this one are done. A change held back is
    /// dropped, unanswered, if `sender` leaves the bus first (`TablesEditor.dropWaiting`), and
    /// refused at once if `sender` has too much held back already (ChangeQueue's limits).
    private func execute(
        _ change: TableChange, sender: String, bytes: Int,
        done: @escaping (Result<(result: ChangeResult, committed: Journal), ChangeRefusal>) -> Void
    ) {
        if let why = editor.holdBackRefusal(sender: sender, bytes: bytes) { return done(.failure(.tooManyHeldBack(why))) }
        editor.whenIdle(sender: sender, bytes: bytes) { [unowned self] in
            self.editor.execute(change, sender: sender) { outcome in done(outcome.mapError { .refused($0) }) }
        }
    }
}

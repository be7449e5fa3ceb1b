// SPDX-License-Identifier: GPL-2.0-or-later

// PestoServer: the engine published on D-Bus as doc/dbus-api.md specifies.
//
// Theory of operation
// -------------------
// One connection, one thread: the server attaches its bus connection to the engine's event
// loop, so method calls, the bind-retry timer and (later) relay traffic are handled by the
// same thread, one at a time, with no locks. Every incoming message goes to `handle(_:)`:
//
//   signals       NameOwnerChanged of a name leaving the bus → its changes still waiting for
//                 authorisation are dropped, and if it holds the lock, its transaction is
//                 rolled back and the lock released; Disconnected → the loop stops (systemd
//                 restarts pestod).
//   method calls  resolved to an object (ObjectTree.swift), an interface and a member; the
//                 argument signature is checked against the contract before anything else
//                 (InvalidArgs), then Apply's array lengths (InvalidArgs, before any element
//                 is read), then the arguments are decoded and rules validated (InvalidArgs,
//                 InvalidRule); only then, for mutating calls, is the caller authorised
//                 (AuthorizationQueue.swift: one query per call, a sender's calls in its own
//                 order, at most 64 or 16 MiB waiting per sender, else LimitsExceeded;
//                 a waiting call keeps its ReplyAddress and decoded arguments, not the
//                 message, see ReplyAddress.swift), then the lock
//                 checked (Locked), then the change, then signals, then the reply — the order
//                 systemd's hostnamed uses. Everything before authorisation is linear in the
//                 size of the message.
//
// Every change to a rule goes through `perform(_:)`, which calls the engine, records the
// operation in the journal of the transaction it belongs to, and emits the ObjectManager
// signals. State changes reported by the engine (activation, deactivation, retries) arrive
// through the tables' `onStateChange` and become RuleStateChanged, BindFailuresChanged and
// PropertiesChanged. Table counters (RuleCount, ActiveCount, SocketCount) are not announced
// per change: a change marks its table's counters stale, and they are compared with what was
// last announced and only real changes emitted, once, before the next reply goes out (so a
// caller sees them before its reply) or at the end of the loop turn (`endOfTurn`), whichever
// comes first. A 65,535-rule Apply thus emits one counters' PropertiesChanged, not 131,070.
//
// The lock (Manager.Lock) makes the holder's calls one transaction: they are journaled, and
// Unlock, Rollback, or the holder leaving the bus undo them newest first. Without a lock,
// each call is its own committed transaction. The lock is only ever held by a name on the
// bus: a Lock runs either at once (no authorisation), before the caller's NameOwnerChanged
// can arrive, or from the authorisation queue, which drops the Lock when its caller leaves
// before the answer; either way the caller's departure is still to be seen, and releases it.
//
// With a state file (`persist(saving:)`), a committed change is answered only once it is
// saved: `finish` (or Commit) hands the call's journal to `answer`, which parks the reply in
// the turn's CommitBatch; the batch saves once before the loop sleeps, then sends every
// reply, or undoes every change of the turn and answers each with SaveFailed.

import Logging
import PestoDBus
import PestoEngine
import PestoModel

/// pestod's D-Bus service.
public final class PestoServer {
    let engine: ForwardingEngine
    let connection: DBusConnection
    let logger: Logger

    /// The unique name holding the lock, if any.
    private(set) var lockOwner: String?
    /// Operations made under the lock since Lock or the last Commit.
    var journal = Journal()
    /// The committed changes of this loop turn waiting for the save; nil without a state file.
    private var commits: CommitBatch?
    /// What the call being handled committed, for `answer` to hold its reply until saved.
    private var callCommit: Journal?
    /// Checks callers of mutating methods; nil lets everyone change the tables.
    public var authorizer: (any Authorizer)? {
        didSet { authorization = authorizer.map { AuthorizationQueue(authorizer: $0, action: PestoActions.modify) } }
    }
    /// The changes waiting for the authorizer's answers, per sender (nil without an authorizer).
    private(set) var authorization: AuthorizationQueue?
    /// Which refusals get a log line (one per sender every few seconds).
    private var refusalLog = RefusalLogLimiter()
    /// Set when the bus connection is lost.
    public private(set) var disconnected = false
    /// Table counters as last announced with PropertiesChanged.
    private var announcedCounters: [TableKind: TableCounters] = [:]
    /// Tables whose counters may have changed since last announced (`announceStaleCounters`).
    private var staleCounters: [TableKind] = []
    /// The retries of this loop turn that changed a rule's counts, logged at its end.
    private var retriesToLog = RetryLogSummary()

    /// The counters of a table that emit PropertiesChanged.
    struct TableCounters: Equatable {
        var ruleCount: UInt32
        var activeCount: UInt32
        var socketCount: UInt32

        init(_ t: ForwardingTable) {
            ruleCount = UInt32(t.ruleCount)
            activeCount = UInt32(t.activeCount)
            socketCount = UInt32(t.openSockets)
        }
    }

    /// Makes a server for `engine` on `connection`; call `start()` to go on the bus.
    public init(engine: ForwardingEngine, connection: DBusConnection, logger: Logger) {
        self.engine = engine
        self.connection = connection
        self.logger = logger
        for table in engine.tables {
            announcedCounters[table.kind] = TableCounters(table)
            let kind = table.kind
            table.onStateChange = { [unowned self] change in self.stateChanged(kind, change) }
        }
        engine.conditions.observer = { [logger] notice in Self.log(notice, to: logger) }
        engine.loop.endOfTurn = { [unowned self] in self.endOfTurn() }
    }

    /// What the server does once per loop turn, before the loop sleeps: saves the changes
    /// committed during the turn (with a state file), which sends their replies, then
    /// announces the table counters changed by whatever sent no reply (timers, uploads).
    private func endOfTurn() {
        saveCommitted()
        announceStaleCounters()
        logRetries()
    }

    /// Logs a data path condition: one line when it starts, one when it clears.
    static func log(_ notice: DataPathNotice, to logger: Logger) {
        switch notice {
        case .started(_, let detail):
            logger.warning("\(detail) (logged once; further occurrences are counted until it clears)")
        case .cleared(let condition, let suppressed):
            logger.notice("\(condition) cleared; \(suppressed) further occurrences were not logged one by one")
        }
    }

    /// Subscribes to NameOwnerChanged, attaches to the loop and takes the bus name.
    public func start() throws(DBusErrorReply) {
        try connection.addMatch(
            "type='signal',sender='org.freedesktop.DBus',path='/org/freedesktop/DBus',interface='org.freedesktop.DBus',member='NameOwnerChanged'")
        connection.messageHandler = { [unowned self] message in self.handle(message) }
        connection.attach(to: engine.loop, kind: EngineEventKind.dbus)
        try connection.requestName(PestoBusNames.busName)
        logger.info("on the bus as \(PestoBusNames.busName) (\(connection.uniqueName))")
    }

    // MARK: Incoming messages

    /// What a method call leads to.
    enum CallOutcome {
        /// Answer right away.
        case reply([DBusValue])
        /// A change: authorise the caller, then run it (it checks the lock itself) and answer.
        case change(() throws(DBusErrorReply) -> [DBusValue])
    }

    /// Handles one incoming message; false lets libdbus answer (unknown method).
    /// A change waiting for authorisation or for the save keeps the call's `ReplyAddress`
    /// and decoded arguments, never the message itself.
    func handle(_ message: DBusMessage) -> Bool {
        if message.isSignal {
            handleSignal(message)
            return false
        }
        guard message.isMethodCall, let path = message.path, let member = message.member else { return false }
        let address = ReplyAddress(message)
        do {
            switch try dispatch(message, path: path, member: member) {
            case .reply(let values):
                answer(address, values)
            case .change(let run):
                guard let authorization else {
                    answer(address, try run())
                    return true
                }
                let sender = message.sender ?? "", bytes = message.argumentBytes
                // The closure keeps `address` and `run` (the decoded arguments), not `message`.
                let limit = authorization.submit(sender: sender, interactive: message.allowsInteractiveAuthorization, bytes: bytes) {
                    [unowned self] refusal in self.authorized(address, run, refusal: refusal)
                }
                if let limit {
                    let refusal: DBusErrorReply
                    switch limit {
                    case .changes:
                        refusal = DBusErrorReply(
                            DBusErrorReply.limitsExceeded,
                            "You have \(authorization.maxPendingPerSender) changes waiting for authorization already; wait for their replies.")
                    case .bytes:
                        refusal = DBusErrorReply(
                            DBusErrorReply.limitsExceeded,
                            "Your changes waiting for authorization hold \(authorization.pendingBytes(of: sender)) bytes of arguments; "
                                + "this one (\(bytes) bytes) would exceed the \(authorization.maxPendingBytesPerSender) allowed; wait for their replies.")
                    }
                    logRefusal(address, refusal)
                    throw refusal
                }
            }
        } catch {
            // A change refused for an invalid rule, before authorisation, is logged as any
            // refused change is (rate-limited per sender, client strings quoted short).
            if let e = error as? DBusErrorReply, e.name == PestoBusNames.errorName(.invalidRule) { logRefusal(address, e) }
            if address.wantsReply { sendReply(.errorReply(to: address, error)) }
        }
        return true
    }

    /// Sends a method reply unless the caller asked for none. If the call committed a change
    /// and a state file is kept, the reply waits for the save at the end of the loop turn;
    /// should the save fail, the change is undone and the caller gets SaveFailed instead.
    private func answer(_ address: ReplyAddress, _ values: [DBusValue]) {
        guard let committed = callCommit.take(), let commits else {
            if address.wantsReply { sendReply(.methodReturn(to: address, values)) }
            return
        }
        commits.add(committed) { [unowned self] failure in
            if let failure {
                self.logger.error("\(address.member) by \(address.who) undone: it could not be saved")
                if address.wantsReply { self.sendReply(.errorReply(to: address, DBusErrorReply(failure))) }
            } else if address.wantsReply {
                self.sendReply(.methodReturn(to: address, values))
            }
        }
    }

    /// Keeps the committed tables with `save` (called once per loop turn in which something
    /// was committed); from now on a committed change is answered only once saved.
    public func persist(saving save: @escaping () throws(PestoError) -> Void) {
        commits = CommitBatch(logger: logger, save: save) { [unowned self] (op) throws(PestoError) in _ = try self.perform(op) }
    }

    /// Saves (or undoes) every change committed so far. A commit no answer took (its call
    /// failed afterwards, which no call does) is still saved or undone, only unannounced.
    private func saveCommitted() {
        if let unanswered = callCommit.take() { commits?.add(unanswered) { _ in } }
        commits?.flush()
    }

    /// Saves the changes committed so far in this turn now, before the lock holder's
    /// uncommitted changes go on top of them (so that undoing an unsaved batch only ever
    /// undoes the newest changes). Only a Lock, or the holder's first change after a Commit
    /// in the same turn, costs this extra save.
    func settleBeforeJournaling() {
        saveCommitted()
    }

    /// Runs an authorised change and answers it, or answers its refusal.
    private func authorized(_ address: ReplyAddress, _ run: () throws(DBusErrorReply) -> [DBusValue], refusal: DBusErrorReply?) {
        if let refusal {
            logRefusal(address, refusal)
            if address.wantsReply { sendReply(.errorReply(to: address, refusal)) }
            return
        }
        do { answer(address, try run()) } catch {
            if address.wantsReply { sendReply(.errorReply(to: address, error)) }
        }
    }

    /// Sends a method reply (or error), after the table counters its call changed: a caller
    /// sees every signal of its change before the reply, as when they were sent one by one.
    private func sendReply(_ reply: DBusMessage) {
        announceStaleCounters()
        connection.send(reply)
    }

    /// Logs a refused call, at most one line per sender every few seconds (RefusalLogLimiter).
    private func logRefusal(_ address: ReplyAddress, _ refusal: DBusErrorReply) {
        let sender = address.who
        guard let unlogged = refusalLog.admit(sender, now: .now) else { return }
        let more = unlogged > 0 ? " (\(unlogged) more refusals not logged since the last line)" : ""
        logger.notice("\(address.member) by \(sender) refused: \(refusal.message)\(more)")
    }

    private func handleSignal(_ message: DBusMessage) {
        if message.interface == "org.freedesktop.DBus.Local" && message.member == "Disconnected" {
            logger.error("lost the connection to the bus; stopping")
            disconnected = true
            engine.loop.stop()
            return
        }
        guard message.interface == "org.freedesktop.DBus", message.member == "NameOwnerChanged",
            message.sender == "org.freedesktop.DBus",
            let args = message.arguments, args.count == 3,
            let name = args[0].stringValue, let newOwner = args[2].stringValue
        else { return }
        guard newOwner.isEmpty else { return }
        if let dropped = authorization?.senderLeft(name), dropped > 0 {
            logger.info("\(name) left the bus with \(dropped) changes waiting for authorization; they are dropped")
        }
        let unlogged = refusalLog.forget(name)
        if unlogged > 0 { logger.notice("\(name) left the bus; \(unlogged) more of its refusals were not logged") }
        if let owner = lockOwner, name == owner {
            logger.notice("lock holder \(owner) left the bus; rolling back its \(journal.operations.count) uncommitted changes")
            rollback()
            setLockOwner(nil)
        }
    }

    /// Resolves the object and interface of a call, checks its arguments, and runs it (reads)
    /// or returns the change to run once the caller is authorised.
    private func dispatch(_ message: DBusMessage, path: String, member: String) throws(DBusErrorReply) -> CallOutcome {
        guard let object = ObjectTree.resolve(path, engine: engine) else {
            throw DBusErrorReply(DBusErrorReply.unknownObject, "No object at \(ClientText.quote(path)).")
        }
        let interfaces = object.interfaces
        let spec: DBusInterfaceSpec
        if let name = message.interface {
            guard let s = interfaces.first(where: { $0.name == name }) else {
                throw DBusErrorReply(DBusErrorReply.unknownInterface, "Object \(ClientText.quote(path)) has no interface \(ClientText.quote(name)).")
            }
            spec = s
        } else {
            guard let s = interfaces.first(where: { $0.method(member) != nil }) else {
                throw DBusErrorReply(DBusErrorReply.unknownMethod, "Object \(ClientText.quote(path)) has no method \(ClientText.quote(member)).")
            }
            spec = s
        }
        guard let method = spec.method(member) else {
            throw DBusErrorReply(DBusErrorReply.unknownMethod, "Interface \(spec.name) has no method \(ClientText.quote(member)).")
        }
        guard message.signature == method.inputSignature else {
            throw .invalidArgs(
                "\(spec.name).\(member) takes arguments of type \"\(method.inputSignature)\", not \(ClientText.quote(message.signature)).")
        }
        if case .table(let kind) = object, spec.name == PestoInterfaces.table.name, member == "Apply", let t = engine.table(kind) {
            // Refuse over-long arrays before reading a single element of them.
            let counts = message.argumentArrayCounts.map { $0 ?? 0 } + [0, 0]
            try ApplyRequest.checkLengths(inserts: counts[0], removes: counts[1], table: kind, limits: t.limits)
        }
        guard let args = message.arguments else { throw .invalidArgs("Arguments of an unsupported type.") }
        let sender = message.sender ?? ""

        switch (spec.name, object) {
        case (PestoInterfaces.introspectable.name, _):
            return .reply([.string(introspectionXML(interfaces: interfaces, children: object.children))])
        case (PestoInterfaces.properties.name, _):
            return .reply(try propertiesCall(object, member: member, args: args))
        case (PestoInterfaces.objectManager.name, _):
            return .reply([managedObjects()])
        case (PestoInterfaces.manager.name, _) where method.privileged:  // Lock
            return .change { () throws(DBusErrorReply) in
                try self.managerCall(member, sender: sender)
                return []
            }
        case (PestoInterfaces.manager.name, _):
            try managerCall(member, sender: sender)
            return .reply([])
        case (PestoInterfaces.table.name, .table(let kind)):
            let outcome = try tableCall(kind, member: member, args: args, sender: sender)
            if case .change = outcome {
                precondition(method.privileged, "\(member) changes the tables but the contract does not mark it privileged")
            } else {
                precondition(!method.privileged, "\(member) is marked privileged but changes nothing")
            }
            return outcome
        default:
            throw DBusErrorReply(DBusErrorReply.unknownMethod, "\(spec.name).\(member) is not implemented at \(ClientText.quote(path)).")
        }
    }

    // MARK: Lock and transactions

    /// Throws `Locked` unless `sender` may change the tables now.
    func checkMayModify(_ sender: String) throws(DBusErrorReply) {
        if let owner = lockOwner, owner != sender {
            throw DBusErrorReply(
                PestoBusNames.errorName(PestoBusNames.locked),
                "The tables are locked by \(owner); wait until it unlocks or leaves the bus.")
        }
    }

    /// Ends a call's transaction: journaled under the lock, committed otherwise (then its
    /// reply waits for the save, see `answer`). The last step of a change: nothing may throw
    /// after it.
    func finish(_ performed: Journal, sender: String) {
        if lockOwner == sender {
            journal.append(contentsOf: performed)
        } else if !performed.isEmpty {
            committed(performed)
        }
    }

    /// Commits a change that is not a D-Bus call's (a control socket upload): `completion`
    /// learns whether it was saved, at the end of the loop turn (at once without a state file).
    func commitUnanswered(_ operations: Journal, completion: @escaping (PestoError?) -> Void) {
        guard let commits, !operations.isEmpty else { return completion(nil) }
        commits.add(operations, completion: completion)
    }

    /// Hands a call's committed operations to `answer` (appended, should a call ever commit
    /// twice; `endOfTurn` saves any that no answer took).
    private func committed(_ operations: Journal) {
        guard commits != nil else { return }
        var all = callCommit ?? Journal()
        all.append(contentsOf: operations)
        callCommit = all
    }

    private func managerCall(_ member: String, sender: String) throws(DBusErrorReply) {
        func requireHolder() throws(DBusErrorReply) {
            guard lockOwner == sender else {
                let who = lockOwner.map { " (\($0) holds it)" } ?? ""
                throw DBusErrorReply(PestoBusNames.errorName(PestoBusNames.notLocked), "You do not hold the lock\(who).")
            }
        }
        switch member {
        case "Lock":
            // `sender` is on the bus: this runs while its message is handled, or from the
            // authorisation queue, which drops the changes of callers that left.
            if lockOwner == sender { return }  // already held by the caller: nothing changes
            try checkMayModify(sender)
            settleBeforeJournaling()
            journal = Journal()
            setLockOwner(sender)
            logger.info("lock taken by \(sender)")
        case "Unlock":
            try requireHolder()
            let uncommitted = journal.operations.count
            rollback()
            setLockOwner(nil)
            logger.info("lock released by \(sender)\(uncommitted > 0 ? "; rolled back its \(uncommitted) uncommitted changes" : "")")
        case "Commit":
            try requireHolder()
            let count = journal.operations.count
            let operations = journal
            journal = Journal()
            if count > 0 { committed(operations) }
            logger.info("\(sender) committed \(count) changes")
        case "Rollback":
            try requireHolder()
            rollback()
        default:
            throw DBusErrorReply(DBusErrorReply.unknownMethod, "No method \(member).")
        }
    }

    /// Undoes the lock holder's uncommitted changes.
    private func rollback() {
        var j = journal
        journal = Journal()
        j.undo(logger: logger) { (op) throws(PestoError) in _ = try perform(op) }
    }

    private func setLockOwner(_ owner: String?) {
        lockOwner = owner
        emitPropertiesChanged(PestoBusNames.managerPath, PestoInterfaces.manager, [("LockOwner", .string(owner ?? ""))])
    }

    // MARK: Performing changes

    /// Carries out one operation on the engine and announces the objects it adds or removes.
    @discardableResult
    func perform(_ op: TableOperation) throws(PestoError) -> ForwardingTable.BindCounts? {
        switch op {
        case .insert(let kind, let id, let rule):
            try table(kind).insert(id: id, rule: rule)
            emit(.signal(
                path: PestoBusNames.managerPath, interface: PestoInterfaces.objectManager.name, member: "InterfacesAdded",
                arguments: [.objectPath(PestoBusNames.rulePath(kind, id)), ObjectTree.interfacesAndProperties(.rule(kind, id), engine: engine)]))
            announceCounters(kind)
            return nil
        case .delete(let kind, let id, _):
            try table(kind).delete(id: id)
            emit(.signal(
                path: PestoBusNames.managerPath, interface: PestoInterfaces.objectManager.name, member: "InterfacesRemoved",
                arguments: [.objectPath(PestoBusNames.rulePath(kind, id)), .strings(ObjectTree.ruleInterfaceNames)]))
            announceCounters(kind)
            return nil
        case .activate(let kind, let id):
            return try table(kind).activate(id: id)
        case .deactivate(let kind, let id):
            try table(kind).deactivate(id: id)
            return nil
        }
    }

    func table(_ kind: TableKind) throws(PestoError) -> ForwardingTable {
        guard let t = engine.table(kind) else { throw PestoError(.noSuchRule, "There is no \(kind.name) table.") }
        return t
    }

    // MARK: Signals

    func emit(_ message: DBusMessage) { connection.send(message) }

    /// Emits PropertiesChanged for `changed` (in the contract's order) on the object at `path`.
    func emitPropertiesChanged(_ path: String, _ interface: DBusInterfaceSpec, _ changed: [(String, DBusValue)]) {
        emit(.signal(
            path: path, interface: PestoInterfaces.properties.name, member: "PropertiesChanged",
            arguments: [.string(interface.name), .vardict(changed), .strings([])]))
    }

    /// Marks the counters of a table as possibly changed; `announceStaleCounters` announces
    /// them before the next reply or at the end of the loop turn. Called on every change.
    func announceCounters(_ kind: TableKind) {
        if !staleCounters.contains(kind) { staleCounters.append(kind) }
    }

    /// Announces the counters of every table marked stale that changed since last announced:
    /// one PropertiesChanged per table with only the counters that differ, carrying their
    /// latest values.
    func announceStaleCounters() {
        guard !staleCounters.isEmpty else { return }
        for kind in staleCounters { announceChangedCounters(kind) }
        staleCounters.removeAll(keepingCapacity: true)
    }

    /// Announces the counters of one table that changed since last time.
    private func announceChangedCounters(_ kind: TableKind) {
        guard let t = engine.table(kind) else { return }
        let now = TableCounters(t)
        let before = announcedCounters[kind]
        guard now != before else { return }
        announcedCounters[kind] = now
        var changed: [(String, DBusValue)] = []
        if now.ruleCount != before?.ruleCount { changed.append(("RuleCount", .uint32(now.ruleCount))) }
        if now.activeCount != before?.activeCount { changed.append(("ActiveCount", .uint32(now.activeCount))) }
        if now.socketCount != before?.socketCount { changed.append(("SocketCount", .uint32(now.socketCount))) }
        emitPropertiesChanged(PestoBusNames.tablePath(kind), PestoInterfaces.table, changed)
    }

    /// A rule's state changed in the engine (activate, deactivate, retry).
    private func stateChanged(_ kind: TableKind, _ change: RuleStateChange) {
        let s = change.status
        let tablePath = PestoBusNames.tablePath(kind)
        emit(.signal(
            path: tablePath, interface: PestoInterfaces.table.name, member: "RuleStateChanged",
            arguments: [.uint32(change.id), .bool(s.active), .uint32(s.bound), .uint32(s.failed)]))
        if change.failuresChanged {
            emit(.signal(
                path: tablePath, interface: PestoInterfaces.table.name, member: "BindFailuresChanged",
                arguments: [.uint32(change.id), .uint32(s.failed), .string(s.lastErrorName)]))
        }
        emitPropertiesChanged(
            PestoBusNames.rulePath(kind, change.id), PestoInterfaces.rule,
            [("Active", .bool(s.active)), ("BoundSockets", .uint32(s.bound)), ("BindFailures", .uint32(s.failed)), ("LastError", .string(s.lastErrorName))])
        announceCounters(kind)
        if change.cause == .retried {
            // One info line per loop turn (`logRetries`), not one per rule of a large retry pass.
            logger.debug("\(kind.name) rule \(change.id): retry now \(s.bound) bound, \(s.failed) failed")
            retriesToLog.add(kind, change.id, s)
        }
    }

    /// Logs the rules whose counts a retry changed during this loop turn: the rule itself if
    /// there was one, else one summary line.
    private func logRetries() {
        guard let line = retriesToLog.take() else { return }
        logger.info("\(line)")
    }
}

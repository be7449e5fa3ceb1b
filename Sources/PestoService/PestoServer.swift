// PestoServer: the engine published on D-Bus as DBUS-API.md specifies.
//
// Theory of operation
// -------------------
// One connection, one thread: the server attaches its bus connection to the engine's event
// loop, so method calls, the bind-retry timer and (later) relay traffic are handled by the
// same thread, one at a time, with no locks. Every incoming message goes to `handle(_:)`:
//
//   signals       NameOwnerChanged of the lock holder → roll back and release the lock;
//                 Disconnected → the loop stops (systemd restarts pestod).
//   method calls  resolved to an object (ObjectTree.swift), an interface and a member; the
//                 argument signature is checked against the contract before anything else
//                 (InvalidArgs), then Apply's array lengths (InvalidArgs, before any element
//                 is read), then the arguments are decoded and rules validated (InvalidArgs,
//                 InvalidRule); only then, for mutating calls, is the caller authorised, then
//                 the lock checked (Locked), then the change, then signals, then the reply —
//                 the order systemd's hostnamed uses. Everything before authorisation is
//                 linear in the size of the message.
//
// Every change to a rule goes through `perform(_:)`, which calls the engine, records the
// operation in the journal of the transaction it belongs to, and emits the ObjectManager
// signals. State changes reported by the engine (activation, deactivation, retries) arrive
// through the tables' `onStateChange` and become RuleStateChanged, BindFailuresChanged and
// PropertiesChanged; table counters are compared with what was last announced and only
// real changes are emitted.
//
// The lock (Manager.Lock) makes the holder's calls one transaction: they are journaled, and
// Unlock, Rollback, or the holder leaving the bus undo them newest first. Without a lock,
// each call is its own committed transaction.

import Logging
import PestoEngine

/// pestod's D-Bus service.
public final class PestoServer {
    let engine: ForwardingEngine
    let connection: DBusConnection
    let logger: Logger

    /// The unique name holding the lock, if any.
    private(set) var lockOwner: String?
    /// Operations made under the lock since Lock or the last Commit.
    var journal = Journal()
    /// Called after every commit (explicit, or the implicit one of a call made without the lock).
    public var onCommit: (() -> Void)?
    /// Checks callers of mutating methods; nil lets everyone change the tables.
    public var authorizer: (any Authorizer)?
    /// Set when the bus connection is lost.
    public private(set) var disconnected = false
    /// Table counters as last announced with PropertiesChanged.
    private var announcedCounters: [TableKind: TableCounters] = [:]

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
    }

    /// Subscribes to NameOwnerChanged, attaches to the loop and takes the bus name.
    public func start() throws(DBusErrorReply) {
        try connection.addMatch(
            "type='signal',sender='org.freedesktop.DBus',path='/org/freedesktop/DBus',interface='org.freedesktop.DBus',member='NameOwnerChanged'")
        connection.messageHandler = { [unowned self] message in self.handle(message) }
        connection.attach(to: engine.loop, kind: EventLoop.Kind(1))
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

    /// A change waiting for its authorisation.
    private struct PendingChange {
        let message: DBusMessage
        let run: () throws(DBusErrorReply) -> [DBusValue]
    }

    /// Changes waiting for authorisation, oldest first; only the first is being checked.
    private var pendingChanges: [PendingChange] = []

    /// Handles one incoming message; false lets libdbus answer (unknown method).
    func handle(_ message: DBusMessage) -> Bool {
        if message.isSignal {
            handleSignal(message)
            return false
        }
        guard message.isMethodCall, let path = message.path, let member = message.member else { return false }
        do {
            switch try dispatch(message, path: path, member: member) {
            case .reply(let values):
                answer(message, values)
            case .change(let run):
                guard authorizer != nil else {
                    answer(message, try run())
                    return true
                }
                pendingChanges.append(PendingChange(message: message, run: run))
                if pendingChanges.count == 1 { authorizeNextChange() }
            }
        } catch {
            if !message.noReply { connection.send(message.errorReply(error)) }
        }
        return true
    }

    /// Sends a method reply unless the caller asked for none.
    private func answer(_ message: DBusMessage, _ values: [DBusValue]) {
        if !message.noReply { connection.send(message.reply(values)) }
    }

    /// Asks the authorizer about the oldest pending change; runs or refuses it, then the next.
    private func authorizeNextChange() {
        guard let first = pendingChanges.first, let authorizer else { return }
        let m = first.message
        authorizer.authorize(
            sender: m.sender ?? "", action: PestoActions.modify, interactive: m.allowsInteractiveAuthorization
        ) { [unowned self] refusal in
            let change = self.pendingChanges.removeFirst()
            if let refusal {
                self.logger.notice("\(m.member ?? "?") by \(m.sender ?? "?") refused: \(refusal.message)")
                if !m.noReply { self.connection.send(m.errorReply(refusal)) }
            } else {
                do { self.answer(m, try change.run()) } catch {
                    if !m.noReply { self.connection.send(m.errorReply(error)) }
                }
            }
            self.authorizeNextChange()
        }
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
        if let owner = lockOwner, name == owner, newOwner.isEmpty {
            logger.notice("lock holder \(owner) left the bus; rolling back its \(journal.operations.count) uncommitted changes")
            rollback()
            setLockOwner(nil)
        }
    }

    /// Resolves the object and interface of a call, checks its arguments, and runs it (reads)
    /// or returns the change to run once the caller is authorised.
    private func dispatch(_ message: DBusMessage, path: String, member: String) throws(DBusErrorReply) -> CallOutcome {
        guard let object = ObjectTree.resolve(path, engine: engine) else {
            throw DBusErrorReply(DBusErrorReply.unknownObject, "No object at \(path).")
        }
        let interfaces = object.interfaces
        let spec: DBusInterfaceSpec
        if let name = message.interface {
            guard let s = interfaces.first(where: { $0.name == name }) else {
                throw DBusErrorReply(DBusErrorReply.unknownInterface, "Object \(path) has no interface \(name).")
            }
            spec = s
        } else {
            guard let s = interfaces.first(where: { $0.method(member) != nil }) else {
                throw DBusErrorReply(DBusErrorReply.unknownMethod, "Object \(path) has no method \(member).")
            }
            spec = s
        }
        guard let method = spec.method(member) else {
            throw DBusErrorReply(DBusErrorReply.unknownMethod, "Interface \(spec.name) has no method \(member).")
        }
        guard message.signature == method.inputSignature else {
            throw .invalidArgs(
                "\(spec.name).\(member) takes arguments of type \"\(method.inputSignature)\", not \"\(message.signature)\".")
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
            return .reply([.string(introspectionXML(interfaces: interfaces, children: object.children(engine: engine)))])
        case (PestoInterfaces.properties.name, _):
            return .reply(try propertiesCall(object, member: member, args: args))
        case (PestoInterfaces.objectManager.name, _):
            return .reply([managedObjects()])
        case (PestoInterfaces.manager.name, _) where member == "Lock":
            return .change { () throws(DBusErrorReply) in
                try self.managerCall(member, sender: sender)
                return []
            }
        case (PestoInterfaces.manager.name, _):
            try managerCall(member, sender: sender)
            return .reply([])
        case (PestoInterfaces.table.name, .table(let kind)):
            return try tableCall(kind, member: member, args: args, sender: sender)
        default:
            throw DBusErrorReply(DBusErrorReply.unknownMethod, "\(spec.name).\(member) is not implemented at \(path).")
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

    /// Ends a call's transaction: journaled under the lock, committed otherwise.
    func finish(_ performed: Journal, sender: String) {
        if lockOwner == sender {
            journal.append(contentsOf: performed)
        } else if !performed.isEmpty {
            onCommit?()
        }
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
            if lockOwner == sender { return }  // already held by the caller: nothing changes
            try checkMayModify(sender)
            journal = Journal()
            setLockOwner(sender)
            logger.info("lock taken by \(sender)")
        case "Unlock":
            try requireHolder()
            rollback()
            setLockOwner(nil)
            logger.info("lock released by \(sender)")
        case "Commit":
            try requireHolder()
            let count = journal.operations.count
            journal = Journal()
            if count > 0 { onCommit?() }
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
        emitPropertiesChanged(PestoBusNames.managerPath, PestoInterfaces.manager, ["LockOwner": .string(owner ?? "")])
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
                arguments: [.objectPath(PestoBusNames.rulePath(kind, id)), .strings(ObjectTree.Object.rule(kind, id).interfaces.map(\.name))]))
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

    /// Emits PropertiesChanged for `changed` on the object at `path`.
    func emitPropertiesChanged(_ path: String, _ interface: DBusInterfaceSpec, _ changed: [String: DBusValue]) {
        let ordered = interface.properties.compactMap { p in changed[p.name].map { (p.name, $0) } }
        emit(.signal(
            path: path, interface: PestoInterfaces.properties.name, member: "PropertiesChanged",
            arguments: [.string(interface.name), .vardict(ordered), .strings([])]))
    }

    /// Announces the table counters that changed since last time.
    func announceCounters(_ kind: TableKind) {
        guard let t = engine.table(kind) else { return }
        let now = TableCounters(t)
        let before = announcedCounters[kind]
        guard now != before else { return }
        announcedCounters[kind] = now
        var changed: [String: DBusValue] = [:]
        if now.ruleCount != before?.ruleCount { changed["RuleCount"] = .uint32(now.ruleCount) }
        if now.activeCount != before?.activeCount { changed["ActiveCount"] = .uint32(now.activeCount) }
        if now.socketCount != before?.socketCount { changed["SocketCount"] = .uint32(now.socketCount) }
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
            ["Active": .bool(s.active), "BoundSockets": .uint32(s.bound), "BindFailures": .uint32(s.failed), "LastError": .string(s.lastErrorName)])
        announceCounters(kind)
        if change.cause == .retried {
            logger.info("\(kind.name) rule \(change.id): retry now \(s.bound) bound, \(s.failed) failed")
        }
    }
}

extension DBusMessage {
    /// An error reply from a thrown error.
    func errorReply(_ error: any Error) -> DBusMessage {
        if let e = error as? DBusErrorReply { return errorReply(e) }
        if let e = error as? PestoError { return errorReply(DBusErrorReply(e)) }
        return errorReply(DBusErrorReply(DBusErrorReply.failed, "\(error)"))
    }
}

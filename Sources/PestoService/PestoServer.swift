// SPDX-License-Identifier: GPL-2.0-or-later

// PestoServer: the engine published on D-Bus as doc/dbus-api.md specifies.
//
// Theory of operation
// -------------------
// One connection, one thread: the server attaches its bus connection to the engine's event
// loop, so method calls, the bind-retry timer and relay traffic are handled by the
// same thread, one at a time, with no locks. Every incoming message goes to `handle(_:)`:
//
//   signals       NameOwnerChanged of a name leaving the bus → its changes still waiting for
//                 authorisation are dropped, and if it holds the lock, its transaction is
//                 rolled back and the lock released; Disconnected → the loop stops (systemd
//                 restarts pestod).
//   method calls  resolved to an object (ObjectTree.swift), an interface and a member, then
//                 checked in the order of doc/dbus-api.md ("Check order"), the order
//                 systemd's hostnamed uses:
//                   1. the argument signature against the contract (InvalidArgs);
//                   2. Apply's array lengths (InvalidArgs, before any element is read);
//                   3. decoding (InvalidArgs, InvalidRule): reads are answered here; a
//                      change becomes a `TableChange` and goes to the ChangeGate for
//                   4. validation, 5. the lock, 6. authorisation (AuthorizationQueue.swift:
//                      one query per call, a sender's calls in its own order, at most 64 or
//                      16 MiB waiting per sender, else LimitsExceeded; a waiting call keeps
//                      its ReplyAddress and decoded change, not the message), 7. the change
//                      (TablesEditor.swift), 8. the signals (the editor's reports, below);
//                   9. with a state file, the save at the end of the loop turn, 10. the reply.
//                 Everything before authorisation is linear in the size of the message.
//
// Every change to a rule is made by the TablesEditor, which keeps the lock and its journal
// and reports each change once it is final to the server's Announcer (Announcer.swift),
// which turns the reports into signals and owns what was announced. A rolled-back Apply or
// upload reports nothing, so no signal shows a rule that never existed. Replies and signals
// go out on the server's BusPort (BusPort.swift): the bus connection in pestod, a recording
// port in tests, which drive `handle(_:)` in process.
//
// The lock (Manager.Lock, kept by the editor) makes the holder's calls one transaction: they
// are journaled, and Unlock, Rollback, or the holder leaving the bus undo them newest first.
// Without a lock, each call is its own committed transaction. The lock is only ever held by a name on the
// bus: a Lock runs either at once (no authorisation), before the caller's NameOwnerChanged
// can arrive, or from the authorisation queue, which drops the Lock when its caller leaves
// before the answer; either way the caller's departure is still to be seen, and releases it.
//
// A large Apply or upload is carried out by the editor over many loop turns
// (SlicedUpdate.swift): reads are answered meanwhile from the live tables; every other change
// (the gate's step 7, Unlock/Commit/Rollback, a holder's departure, the control socket) waits
// in the editor's ChangeQueue with `whenIdle`, and a departed caller's waiting changes are
// dropped. Table counters are not announced while it runs, only before its reply.
//
// With a state store (`persist(in:)`), a committed change is answered only once it is
// saved: the gate (or Commit) hands the call's committed journal to `answer`, which parks the
// reply in the CommitBatch; at the end of the turn the batch goes to the store's writer
// thread, and once it is saved every reply is sent, or every change of the batch is undone
// and answered with SaveFailed (CommitBatch.swift, StoreWriter.swift).

import Logging
import PestoDBus
import PestoEngine
import PestoModel
import PestoSystem

/// pestod's D-Bus service.
public final class PestoServer {
    let engine: ForwardingEngine
    /// Where replies and signals go (the bus connection; a recording port in tests).
    let port: any BusPort
    /// Turns the editor's reports into signals and remembers what it announced.
    let announcer: Announcer
    let logger: Logger
    /// Makes every change to the tables and keeps the lock; reports to this server.
    let editor: TablesEditor
    /// Steps 4–7 of the check order for every change.
    let gate: ChangeGate

    /// The unique name holding the lock, if any.
    var lockOwner: String? { editor.lockOwner }
    /// The committed changes of this loop turn waiting for the save; nil without a state file.
    private var commits: CommitBatch?
    /// Checks callers of mutating methods; nil lets everyone change the tables.
    public var authorizer: (any Authorizer)? {
        didSet {
            gate.authorization = authorizer.map { AuthorizationQueue(authorizer: $0, action: PestoActions.modify) }
            makeCallerWork()  // caller budget hook (CallerWorkBudget.swift)
        }
    }
    /// Each caller's messages in order, and its unauthorised work limited over time
    /// (CallerWorkBudget.swift, SlicedApplyDecoder.swift).
    var callerWork: CallerWorkBudget!
    /// The caller work budget's size and refill rate in argument bytes (`pestod --caller-budget`,
    /// a hidden option for tests): set before `start()`.
    public var callerBudget = (
        capacity: CallerWorkBudget.Settings.standard.capacity,
        refillPerSecond: CallerWorkBudget.Settings.standard.refillPerSecond
    ) {
        didSet { makeCallerWork() }
    }
    /// The changes waiting for the authorizer's answers, per sender (nil without an authorizer).
    var authorization: AuthorizationQueue? { gate.authorization }
    /// Which refusals get a log line (one per sender every few seconds).
    private var refusalLog = RefusalLogLimiter()
    /// Set once a takeover has handed everything over (Takeover.swift): the calls still
    /// routed here are answered if they read, and refused with Locked if they change.
    private(set) var handingOver = false

    /// Answers the calls the bus routed here before the bus name moved to the pestod that
    /// took over, up to this connection's NameLost for the name (the bus delivers it after
    /// them), or for `timeoutMilliseconds` at most: reads from the tables, which are the new
    /// pestod's too; changes refused with Locked, as the new pestod has the tables now.
    func answerCallsBeforeExit(timeoutMilliseconds: Int) {
        handingOver = true
        // Changes still waiting for polkit never ran: they are refused as a change arriving
        // now is, rather than left without an answer when this pestod exits.
        if let refused = authorization?.refuseAll(DBusErrorReply(Self.replacedRefusal)), refused > 0 {
            logger.info("refused \(refused) changes still waiting for authorisation: the new pestod has the tables")
        }
        // Caller budget hook: calls waiting behind their caller's work are answered now too.
        for message in callerWork.releaseAll(DBusErrorReply(Self.replacedRefusal)) { process(message) }
        let deadline = MonotonicInstant.now.adding(milliseconds: timeoutMilliseconds)
        while MonotonicInstant.now < deadline {
            let left = Int32(min(Int64(Int32.max), Int64((deadline.nanoseconds - MonotonicInstant.now.nanoseconds) / 1_000_000) + 1))
            guard let message = port.nextMessage(timeoutMilliseconds: left) else { break }
            if message.isSignal, message.member == "NameLost", message.arguments?.first?.stringValue == PestoBusNames.busName { break }
            _ = handle(message)
        }
        reads.finishAll()
        port.flush()
    }

    /// How many bytes of signals may wait unsent on the bus connection before a large change
    /// stops announcing until the bus daemon has taken them (SlicedUpdate.swift).
    static let unsentSignalBytes = 1 << 20

    /// The most operations (or signals) one loop turn spends on a large change (default
    /// 4,096, within 4 ms): set before `start(on:)`; tests make it small (`pestod --slice-operations`).
    public var sliceOperations: Int {
        get { editor.sliceBudget.operations }
        set { editor.sliceBudget.operations = max(1, newValue) }
    }

    /// No change is being carried out or held back (a takeover waits for this).
    var changesIdle: Bool { editor.isIdle }

    /// pestod stops: a change in progress is rolled back and its caller told so; the changes
    /// held back behind it are dropped (their callers see the connection close).
    public func abandonChanges() {
        editor.abandonUpdate()
        saveCommitted()
    }

    /// Whether a pestod taking over (Takeover.swift) may take the bus name: set before `start(on:)`.
    public var allowsReplacement = false
    /// Set when the bus connection is lost.
    public private(set) var disconnected = false
    /// The largest reply pestod sends; larger ones are refused (ReplySizeLimit.swift).
    var maxMessageBytes = ReplySizeLimit.standard
    /// Large reads answered over several loop turns, and the calls held behind them (SlicedRead.swift).
    private(set) lazy var reads = SlicedReads(server: self)
    /// Makes a server for `engine` sending on `port`; call `start(on:)` to go on the bus
    /// (tests call `handle(_:)` directly).
    public init(engine: ForwardingEngine, port: any BusPort, logger: Logger) {
        self.engine = engine
        self.port = port
        self.logger = logger
        let editor = TablesEditor(tables: engine.tables, logger: logger)
        self.editor = editor
        gate = ChangeGate(editor: editor)
        announcer = Announcer(engine: engine, port: port, logger: logger) { [unowned editor] in editor.running != nil }
        editor.observer = announcer
        // Large updates are carried out in slices, one per loop turn (SlicedUpdate.swift).
        editor.sliceBudget = .standard
        editor.host = self
        engine.conditions.observer = { [logger] notice in Self.log(notice, to: logger) }
        engine.loop.endOfTurn = { [unowned self] in self.endOfTurn() }
        makeCallerWork()
    }

    /// What the server does once per loop turn, before the loop sleeps: saves the changes
    /// committed during the turn (with a state file), which sends their replies, then
    /// announces the table counters changed by whatever sent no reply (timers, uploads).
    private func endOfTurn() {
        commits?.submit()
        announcer.announceStaleCounters()
        announcer.logRetries()
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

    /// Subscribes to NameOwnerChanged, attaches to the loop and takes the bus name;
    /// `connection` is the server's port.
    public func start(on connection: DBusConnection) throws(DBusErrorReply) {
        precondition(connection === port, "the server starts on the connection it sends on")
        try connection.addMatch(
            "type='signal',sender='org.freedesktop.DBus',path='/org/freedesktop/DBus',interface='org.freedesktop.DBus',member='NameOwnerChanged'"
        )
        connection.messageHandler = { [unowned self] message in self.handle(message) }
        maxMessageBytes = ReplySizeLimit.bound(for: connection)
        connection.attach(to: engine.loop, kind: EngineEventKind.dbus)
        try connection.requestName(PestoBusNames.busName, allowingReplacement: allowsReplacement)
        logger.info("on the bus as \(PestoBusNames.busName) (\(connection.uniqueName))")
    }

    // MARK: Incoming messages

    /// What a method call leads to.
    enum CallOutcome {
        /// Answer right away.
        case reply([DBusValue])
        /// A decoded change, for the ChangeGate (steps 4–7).
        case change(TableChange)
        /// Manager.Commit: answer once what it committed is saved.
        case committed(Journal)
        /// Unlock, Commit or Rollback: run once no change is in progress or held back.
        case holder(String)
        /// An Apply too large to decode in one loop turn (SlicedApplyDecoder.swift).
        case decodeInSlices(TableKind, inserts: Int, removes: Int)
        /// A large read, answered over several loop turns (SlicedRead.swift).
        case sliced(SlicedReply)
    }

    /// The refusal of a change that reaches a pestod handing over to its successor.
    static let replacedRefusal = PestoError(
        .locked, "pestod is being replaced by a new instance (pestod --replace); call again: the new one answers.")

    /// Handles one incoming message; false lets libdbus answer (a signal, or a message that
    /// is no method call). A change waiting for authorisation or for the save keeps the
    /// call's `ReplyAddress` and decoded change, never the message itself.
    func handle(_ message: DBusMessage) -> Bool {
        if message.isSignal {
            handleSignal(message)
            return false
        }
        // Caller order and work budget hook: a call may wait behind its caller's earlier work.
        if message.isMethodCall, !handingOver, !callerWork.admit(message) { return true }
        return process(message)
    }

    /// Steps 1 to 10 for a method call that may run now (`handle`, or CallerWorkBudget later).
    @discardableResult
    func process(_ message: DBusMessage) -> Bool {
        guard message.isMethodCall, let path = message.path, let member = message.member else { return false }
        let address = ReplyAddress(message)
        do throws(DBusErrorReply) {
            // A caller's calls wait behind its own large read, in order (SlicedRead.swift).
            if let sender = message.sender, reads.isHolding(sender) {
                guard reads.hold(message, from: sender) else {
                    throw DBusErrorReply(
                        DBusErrorReply.limitsExceeded,
                        "Your calls waiting behind a large read of yours would exceed \(SlicedReads.heldLimit) calls or \(SlicedReads.heldBytesLimit) bytes; wait for its reply."
                    )
                }
                return true
            }
            // Steps 1–3.
            let started = MonotonicInstant.now
            switch try dispatch(message, path: path, member: member) {
            case .reply(let values):
                answer(address, values, read: true)
                logLongRead(address, since: started)  // large reads (ReplySizeLimit.swift)
            case .sliced(let reply):
                reads.start(reply, for: address, sender: message.sender ?? "")
            case .change where handingOver:
                throw DBusErrorReply(Self.replacedRefusal)
            case .change(let change):
                if case .apply(_, let request) = change {
                    Self.logDecoding(request, since: started, to: logger)
                    if request.inserts.count + request.removes.count >= CommitBatch.largeBatch { engine.loop.markTurns() }
                }
                submit(change, of: message, address)
            case .decodeInSlices where handingOver:
                throw DBusErrorReply(Self.replacedRefusal)
            case .decodeInSlices(let kind, let inserts, let removes):
                // The loop's turns are measured from the first slice of a large change (TurnLog.swift).
                if inserts + removes >= CommitBatch.largeBatch { engine.loop.markTurns() }
                decodeInSlices(message, kind, inserts: inserts, removes: removes, address)
            case .committed(let journal):
                answer(address, [], committed: journal)
            case .holder(let member):
                let sender = message.sender ?? ""
                if let why = editor.holdBackRefusal(sender: sender, bytes: 0) {
                    throw DBusErrorReply(DBusErrorReply.limitsExceeded, why)
                }
                editor.whenIdle(sender: sender) { [unowned self] in self.holderCall(member, sender: sender, address) }
            }
        } catch {
            // A change refused for an invalid rule, before authorisation, is logged as any
            // refused change is (rate-limited per sender, client strings quoted short).
            if error.name == PestoBusNames.errorName(.invalidRule) { logRefusal(address, error) }
            if address.wantsReply { sendReply(.errorReply(to: address, error)) }
        }
        return true
    }

    /// Logs how long a large Apply took to decode (steps 1–3, done in one loop turn, unlike
    /// the change itself: SlicedUpdate.swift).
    static func logDecoding(_ request: ApplyRequest, since started: MonotonicInstant, to logger: Logger) {
        let rules = request.inserts.count + request.removes.count
        guard rules >= 1000 else { return }
        let ms = (MonotonicInstant.now.nanoseconds - started.nanoseconds) / 1_000_000
        logger.info("Apply of \(rules) rules decoded in \(ms) ms (one loop turn)")
    }

    /// Runs Unlock, Commit or Rollback and answers it.
    private func holderCall(_ member: String, sender: String, _ address: ReplyAddress) {
        do throws(DBusErrorReply) {
            switch try managerCall(member, sender: sender) {
            case .reply(let values): answer(address, values)
            case .committed(let journal): answer(address, [], committed: journal)
            case .change, .holder, .decodeInSlices, .sliced: preconditionFailure("\(member) is answered by the lock's holder methods")
            }
        } catch {
            if address.wantsReply { sendReply(.errorReply(to: address, error)) }
        }
    }

    /// Answers a change the gate made or refused (steps 9 and 10).
    func changed(
        _ address: ReplyAddress, sender: String, bytes: Int, _ outcome: Result<(result: ChangeResult, committed: Journal), ChangeRefusal>
    ) {
        // Caller budget hook: authorised work is given back (CallerWorkBudget.swift).
        switch outcome {
        case .success, .failure(.tooManyHeldBack): callerWork.refund(sender, bytes: bytes)
        default: break
        }
        switch outcome {
        case .success(let done):
            answer(address, Self.replyValues(done.result), committed: done.committed)
            // Without a store the reply went now: the loop's turns of the change are logged here.
            if commits == nil, done.committed.operations.count >= CommitBatch.largeBatch {
                logLargeSave(operations: done.committed.operations.count, milliseconds: nil)
            }
        case .failure(let refusal):
            let reply: DBusErrorReply
            switch refusal {
            case .refused(let e):
                reply = DBusErrorReply(e)
                if e.code == .invalidRule { logRefusal(address, reply) }
            case .unauthorized(let r):
                reply = r
                logRefusal(address, reply)
            case .tooManyWaiting(let limit):
                reply = limitRefusal(limit, sender: sender, bytes: bytes)
                logRefusal(address, reply)
            case .tooManyHeldBack(let why):
                reply = DBusErrorReply(DBusErrorReply.limitsExceeded, why)
                logRefusal(address, reply)
            }
            if address.wantsReply { sendReply(.errorReply(to: address, reply)) }
        }
    }

    /// A change's reply arguments: nothing; an activation's (bound, failed); Apply's a(uuu).
    static func replyValues(_ result: ChangeResult) -> [DBusValue] {
        switch result {
        case .done: return []
        case .counts(let c): return [.uint32(c.bound), .uint32(c.failed)]
        case .applied(let rules):
            return [
                .array(element: "(uuu)", rules.map { .structure([.uint32($0.id), .uint32($0.counts.bound), .uint32($0.counts.failed)]) })
            ]
        }
    }

    /// LimitsExceeded for a change refused by the per-sender limit of waiting changes.
    private func limitRefusal(_ limit: AuthorizationQueue.Limit, sender: String, bytes: Int) -> DBusErrorReply {
        let waiting = authorization
        switch limit {
        case .changes:
            return DBusErrorReply(
                DBusErrorReply.limitsExceeded,
                "You have \(waiting?.limits.changes ?? 0) changes waiting for authorization already; wait for their replies.")
        case .bytes:
            return DBusErrorReply(
                DBusErrorReply.limitsExceeded,
                "Your changes waiting for authorization hold \(waiting?.pendingBytes(of: sender) ?? 0) bytes of arguments; "
                    + "this one (\(bytes) bytes) would exceed the \(waiting?.limits.bytes ?? 0) allowed; wait for their replies."
            )
        }
    }

    /// Sends a method reply unless the caller asked for none. If the call committed a change
    /// and a state file is kept, the reply waits for the save at the end of the loop turn;
    /// should the save fail, the change is undone and the caller gets SaveFailed instead.
    private func answer(_ address: ReplyAddress, _ values: [DBusValue], committed: Journal = Journal(), read: Bool = false) {
        MemoryTrim.after(committed)
        // Replies over the bus's maximum message size become LimitsExceeded (ReplySizeLimit.swift).
        guard !committed.isEmpty, let commits else {
            if address.wantsReply { sendReply(boundedReturn(to: address, values, changed: !read)) }
            return
        }
        commits.add(committed) { [unowned self] failure in
            if let failure {
                self.logger.error("\(address.member) by \(address.who) undone: it could not be saved")
                if address.wantsReply { self.sendReply(.errorReply(to: address, DBusErrorReply(failure))) }
            } else if address.wantsReply {
                self.sendReply(self.boundedReturn(to: address, values, changed: true))
            }
        }
    }

    /// Keeps the committed tables in `store` (the changes of each loop turn in which something
    /// was committed are handed to it at the turn's end); from now on a committed change is
    /// answered only once saved.
    public func persist(in store: any TableStore) {
        let batch = CommitBatch(logger: logger, store: store) { [unowned self] (op) throws(PestoError) in _ = try self.editor.perform(op) }
        batch.largeBatchSaved = { [unowned self] operations, ms in self.logLargeSave(operations: operations, milliseconds: ms) }
        commits = batch
    }

    /// Saves (or undoes) every change committed so far. The editor also calls this before
    /// the lock holder's uncommitted changes go on top of committed ones (so that undoing an
    /// unsaved batch only ever undoes the newest changes): only a Lock, or the holder's first
    /// change after a Commit in the same turn, costs this extra save.
    func saveCommitted() {
        commits?.flush()
    }

    /// Saves and answers every change committed so far, and announces the table counters:
    /// before a takeover hands the tables over, nothing committed is left unsaved.
    func flushCommitted() {
        saveCommitted()
        announcer.announceStaleCounters()
    }

    /// Sends a method reply (or error), after the table counters its call changed: a caller
    /// sees every signal of its change before the reply, as when they were sent one by one.
    func sendReply(_ reply: DBusMessage) {
        announcer.announceStaleCounters()
        port.send(reply)
    }

    /// Logs a refused call, at most one line per sender every few seconds (RefusalLogLimiter).
    func logRefusal(_ address: ReplyAddress, _ refusal: DBusErrorReply) {
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
        // Caller budget hook: its work in progress and waiting calls go with it.
        if case let held = callerWork.senderLeft(name), held > 0 {
            logger.info("\(name) left the bus with \(held) calls waiting behind its work in progress or its work budget; they are dropped")
        }
        if reads.senderLeft(name) > 0 { logger.info("\(name) left the bus during a large read of its own; it is dropped") }
        let unlogged = refusalLog.forget(name)
        if unlogged > 0 { logger.notice("\(name) left the bus; \(unlogged) more of its refusals were not logged") }
        let dropped = editor.dropWaiting(of: name)
        if dropped > 0 {
            logger.info("\(name) left the bus with \(dropped) changes held back behind a change in progress; they are dropped")
        }
        // Its lock is released (and its transaction rolled back) after the change in progress,
        // in order. Only the holder matters: a Lock of its still waiting was dropped above.
        if lockOwner == name { editor.whenIdle(sender: nil) { [unowned self] in self.editor.holderLeft(name) } }
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
                throw DBusErrorReply(
                    DBusErrorReply.unknownInterface, "Object \(ClientText.quote(path)) has no interface \(ClientText.quote(name)).")
            }
            spec = s
        } else {
            guard let s = interfaces.first(where: { $0.method(member) != nil }) else {
                throw DBusErrorReply(
                    DBusErrorReply.unknownMethod, "Object \(ClientText.quote(path)) has no method \(ClientText.quote(member)).")
            }
            spec = s
        }
        guard let method = spec.method(member) else {
            throw DBusErrorReply(DBusErrorReply.unknownMethod, "Interface \(spec.name) has no method \(ClientText.quote(member)).")
        }
        // 1. the signature
        guard message.signature == method.inputSignature else {
            throw .invalidArgs(
                "\(spec.name).\(member) takes arguments of type \"\(method.inputSignature)\", not \(ClientText.quote(message.signature)).")
        }
        if case .table(let kind) = object, spec.name == PestoInterfaces.table.name, member == "Apply", let t = engine.table(kind) {
            // 2. Apply's array lengths: over-long arrays are refused before a single element is read.
            let counts = message.argumentArrayCounts.map { $0 ?? 0 } + [0, 0]
            try ApplyRequest.checkLengths(inserts: counts[0], removes: counts[1], table: kind, limits: t.limits)
            // 3. decoding over several loop turns when it is large (SlicedApplyDecoder.swift).
            if SlicedApplyDecoder.wanted(inserts: counts[0], removes: counts[1], budget: decodeBudget) {
                return .decodeInSlices(kind, inserts: counts[0], removes: counts[1])
            }
        }
        // 3. decoding: reads are answered from here; changes are decoded for the gate (4–7).
        guard let args = message.arguments else { throw .invalidArgs("Arguments of an unsupported type.") }
        let sender = message.sender ?? ""

        switch (spec.name, object) {
        case (PestoInterfaces.introspectable.name, _):
            return .reply([.string(introspectionXML(interfaces: interfaces, children: object.children))])
        case (PestoInterfaces.properties.name, _):
            return .reply(try propertiesCall(object, member: member, args: args))
        case (PestoInterfaces.objectManager.name, _):
            // Many rules: written over several loop turns (SlicedRead.swift).
            if engine.tables.reduce(0, { $0 + $1.ruleCount }) >= reads.elementsPerSlice { return .sliced(slicedManagedObjects()) }
            return .reply([managedObjects()])
        case (PestoInterfaces.manager.name, _) where method.privileged:
            precondition(member == "Lock", "\(member) is marked privileged but is not Lock")
            return .change(.lock)
        case (PestoInterfaces.manager.name, _):
            return .holder(member)
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

    /// Unlock, Commit and Rollback (not authorised: only the holder may call them).
    private func managerCall(_ member: String, sender: String) throws(DBusErrorReply) -> CallOutcome {
        do {
            switch member {
            case "Unlock": try editor.unlock(sender)
            case "Commit": return .committed(try editor.commit(sender))
            case "Rollback": try editor.rollback(sender)
            default: throw DBusErrorReply(DBusErrorReply.unknownMethod, "No method \(member).")
            }
        } catch {
            throw DBusErrorReply(replyingTo: error)
        }
        return .reply([])
    }

    /// Commits a change that is not a D-Bus call's (a control socket upload): `completion`
    /// learns whether it was saved, at the end of the loop turn (at once without a state file).
    func commitUnanswered(_ operations: Journal, completion: @escaping (PestoError?) -> Void) {
        MemoryTrim.after(operations)
        guard let commits, !operations.isEmpty else { return completion(nil) }
        commits.add(operations, completion: completion)
    }

    /// The table of `kind` (NoSuchRule when pestod has none).
    func table(_ kind: TableKind) throws(PestoError) -> ForwardingTable { try editor.table(kind) }
}

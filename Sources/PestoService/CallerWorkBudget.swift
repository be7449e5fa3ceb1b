// SPDX-License-Identifier: GPL-2.0-or-later

// CallerWorkBudget: each caller's messages in order, and the work pestod does for a caller
// before authorising it limited over time, not only per call.
//
// Theory of operation
// -------------------
// Every call is bounded (an Apply's arrays by MaxRules, its decoding in slices:
// SlicedApplyDecoder.swift), but a caller over time was not: three connections of an
// unprivileged user sending 65,535-rule Applies back to back, each refused only after its
// decoding, kept pestod busy for as long as they kept sending. So pestod keeps, per caller:
//
//   order    one queue per unique bus name. While a caller's Apply is being decoded over
//            several loop turns, or its earlier messages wait, its later messages (reads
//            too) wait behind them and are handled in the order it sent them. At most
//            `maxHeld` messages or `maxHeldBytes` of arguments wait (the authorisation
//            queue's 64 changes / 16 MiB; a lone larger message is let in); one more is
//            answered at once with LimitsExceeded, nothing changed.
//   budget   a token bucket of argument bytes per uid (all the connections of a user share
//            one): every change call (the contract's privileged methods) costs its argument
//            bytes plus `callCost`, charged when its decoding starts. A bucket may go into
//            debt by one call; while it is in debt, that user's next changes wait (their
//            messages, and everything its callers send after them, in order) until it has
//            refilled above zero, at `refillPerSecond`. A change that was authorised (it
//            ran, or was held back behind a change in progress) is refunded: authorised
//            clients keep their throughput, and only refused work (unauthorised, invalid,
//            over a limit) is spent. uid 0 is always authorised and never waits.
//
// The budget applies only with an authorizer (`--authorize polkit|root`); without one
// everyone is authorised and only the order is kept. The uid of a caller is asked of the
// bus daemon once per connection (CallerUIDs.swift); its first change waits for that answer.
// Nothing is dropped silently: a waiting message is handled, refused with LimitsExceeded on
// arrival, answered at a takeover (`releaseAll`), or dropped because its caller left the bus
// (no one to answer).

import Logging
import PestoDBus
import PestoEngine
import PestoModel
import PestoSystem

/// Keeps each caller's messages in order and limits the unauthorised work done per user.
final class CallerWorkBudget {
    /// The bucket's size and refill rate, in argument bytes.
    struct Settings: Equatable {
        /// The most a user may spend at once (the bucket's size).
        var capacity: Int
        /// What a user regains per second.
        var refillPerSecond: Int
        /// What every change costs besides its arguments (a flood of small calls costs too).
        var callCost = 1024

        /// 16 MiB at once, 2 MiB a second: a 65,535-rule Apply (about 5.5 MiB) refused every
        /// 2.8 s, about a tenth of one core spent decoding it, however many connections.
        static let standard = Settings(capacity: 16 << 20, refillPerSecond: 2 << 20)
    }

    /// One user's bucket.
    private struct Bucket {
        var level: Int
        var at: MonotonicInstant
        /// The timer that looks again once the bucket is out of debt.
        var timer: EventLoop.TimerID?
    }

    /// One caller's queue.
    private struct Caller {
        var held: [DBusMessage] = []
        var heldBytes = 0
        /// The work in progress over several loop turns (a sliced decoding), and how to
        /// abandon it: with a reply, or (nil) silently because its caller left.
        var abandon: ((DBusErrorReply?) -> Void)?
        /// The caller's uid, once the bus daemon has said.
        var uid: UInt32?
        /// Its uid has been asked.
        var asked = false
        /// What it spends until its uid is known.
        var own: Bucket?
    }

    let settings: Settings
    /// Asks the bus daemon who a caller is; nil: no budget (no authorizer), only the order.
    private let uids: CallerUIDs?
    private unowned let loop: EventLoop
    private let logger: Logger
    /// Handles a message now (the server's steps 1 to 10).
    var process: (DBusMessage) -> Void = { _ in }
    /// Answers a method call with an error.
    var refuse: (DBusMessage, DBusErrorReply) -> Void = { _, _ in }

    private var callers: [String: Caller] = [:]
    private var buckets: [UInt32: Bucket] = [:]
    /// The names of each uid with a queue, for the bucket's timer.
    private var namesOf: [UInt32: Set<String>] = [:]
    /// Messages that waited for the budget since the last log line (one line per 5 s).
    private var waitedSinceLog = 0
    private var lastLog: MonotonicInstant?

    /// The most messages and argument bytes one caller may have waiting.
    static let maxHeld = SenderLimits.standard.changes
    static let maxHeldBytes = SenderLimits.standard.bytes
    /// The bucket of a caller whose uid the bus daemon would not tell.
    static let unknownUID = UInt32.max

    /// Keeps order; with `uids`, also the budget per uid.
    init(settings: Settings, uids: CallerUIDs?, loop: EventLoop, logger: Logger) {
        self.settings = settings
        self.uids = uids
        self.loop = loop
        self.logger = logger
    }

    /// Whether `message` is a change, charged to the budget: a privileged method of the contract.
    static func isChange(_ message: DBusMessage) -> Bool {
        guard let member = message.member else { return false }
        for spec in [PestoInterfaces.table, PestoInterfaces.manager] where message.interface == nil || message.interface == spec.name {
            if spec.method(member)?.privileged == true { return true }
        }
        return false
    }

    /// Whether any caller has work in progress or calls waiting.
    var busy: Bool { callers.values.contains { $0.abandon != nil || !$0.held.isEmpty } }

    /// Called for every method call as it arrives: true when it is to be handled now (and
    /// its cost has been charged), false when it waits (it is handled later, in order, by
    /// `process`) or was refused with LimitsExceeded.
    func admit(_ message: DBusMessage) -> Bool {
        guard let sender = message.sender, !sender.isEmpty else { return true }
        if let c = callers[sender], c.abandon != nil || !c.held.isEmpty {
            hold(message, sender)
            return false
        }
        if mayRun(message, sender) { return true }
        hold(message, sender)
        return false
    }

    /// Whether `message` of `sender`, first in its queue, may run now (charging it if so);
    /// asks for the caller's uid or sets the bucket's timer when not.
    private func mayRun(_ message: DBusMessage, _ sender: String) -> Bool {
        guard let uids, Self.isChange(message) else { return true }
        if callers[sender]?.asked != true {
            callers[sender, default: Caller()].asked = true
            uids.uid(of: sender) { [weak self] answer in self?.learned(sender, (try? answer.get()) ?? Self.unknownUID) }
        }
        // The answer may have come at once (a uid remembered by the authorizer).
        if let uid = callers[sender]?.uid { return charge(message, uid: uid) }
        // Until the bus daemon answers, the caller spends from a bucket of its own, which is
        // charged to its uid's once that is known (`learned`): no change waits for the answer.
        let now = MonotonicInstant.now
        var own = callers[sender]?.own ?? Bucket(level: settings.capacity, at: now)
        refill(&own, now)
        defer { callers[sender]?.own = own }
        guard own.level > 0 else { return false }  // `learned` lets it go on
        own.level -= message.argumentBytes + settings.callCost
        return true
    }

    /// Charges `message` to `uid`'s bucket if it is not in debt.
    private func charge(_ message: DBusMessage, uid: UInt32) -> Bool {
        if uid == 0 { return true }
        let now = MonotonicInstant.now
        var b = buckets[uid] ?? Bucket(level: settings.capacity, at: now)
        refill(&b, now)
        if b.level <= 0 {
            if b.timer == nil, settings.refillPerSecond > 0 {
                let ms = (-b.level + 1) * 1000 / settings.refillPerSecond + 1
                b.timer = loop.after(milliseconds: ms) { [weak self] in self?.refilled(uid) }
            }
            buckets[uid] = b
            noteWait()
            return false
        }
        b.level -= message.argumentBytes + settings.callCost
        buckets[uid] = b
        return true
    }

    private func refill(_ b: inout Bucket, _ now: MonotonicInstant) {
        let elapsed = Int((now.nanoseconds - b.at.nanoseconds) / 1_000_000)
        guard elapsed > 0 else { return }
        b.level = min(settings.capacity, b.level + elapsed * settings.refillPerSecond / 1000)
        b.at = now
    }

    /// Logs, at most once per 5 s, that callers wait for their budget.
    private func noteWait() {
        waitedSinceLog += 1
        let now = MonotonicInstant.now
        if let lastLog, now.nanoseconds - lastLog.nanoseconds < 5_000_000_000 { return }
        logger.notice(
            "\(waitedSinceLog) changes wait for their caller's work budget (refused work of \(settings.refillPerSecond) bytes a second per user)"
        )
        waitedSinceLog = 0
        lastLog = now
    }

    /// Gives back what an authorised change of `sender` cost.
    func refund(_ sender: String, bytes: Int) {
        guard uids != nil, let c = callers[sender] else { return }
        if c.uid == nil, var own = c.own {
            own.level = min(settings.capacity, own.level + bytes + settings.callCost)
            callers[sender]!.own = own
        } else if let uid = c.uid, uid != 0, var b = buckets[uid] {
            b.level = min(settings.capacity, b.level + bytes + settings.callCost)
            buckets[uid] = b
        }
    }

    /// The bus daemon said who `sender` is: its waiting messages may go.
    private func learned(_ sender: String, _ uid: UInt32) {
        guard callers[sender] != nil else { return }
        callers[sender]!.uid = uid
        namesOf[uid, default: []].insert(sender)
        if var own = callers[sender]!.own {
            callers[sender]!.own = nil
            refill(&own, .now)
            if uid != 0 {
                var b = buckets[uid] ?? Bucket(level: settings.capacity, at: .now)
                refill(&b, .now)
                b.level -= settings.capacity - own.level
                buckets[uid] = b
            }
        }
        pump(sender)
    }

    /// `uid`'s bucket has refilled: its callers' waiting messages may go.
    private func refilled(_ uid: UInt32) {
        buckets[uid]?.timer = nil
        for name in namesOf[uid] ?? [] { pump(name) }
    }

    private func hold(_ message: DBusMessage, _ sender: String) {
        var c = callers[sender] ?? Caller()
        let bytes = message.argumentBytes
        if !c.held.isEmpty && (c.held.count >= Self.maxHeld || c.heldBytes + bytes > Self.maxHeldBytes) {
            refuse(
                message,
                DBusErrorReply(
                    DBusErrorReply.limitsExceeded,
                    "\(ClientText.counted(c.held.count, "call")) of this caller (\(c.heldBytes) bytes of arguments) wait already, behind its work in progress or its work budget; at most \(Self.maxHeld) calls or \(Self.maxHeldBytes) bytes of arguments may wait."
                ))
            return
        }
        c.held.append(message)
        c.heldBytes += bytes
        callers[sender] = c
    }

    /// Handles `sender`'s waiting messages in order, as long as nothing holds them.
    private func pump(_ sender: String) {
        while let c = callers[sender], c.abandon == nil, let first = c.held.first {
            guard mayRun(first, sender) else { return }
            callers[sender]!.held.removeFirst()
            callers[sender]!.heldBytes -= first.argumentBytes
            process(first)
        }
        forgetIfIdle(sender)
    }

    /// Drops the state of a caller with nothing waiting whose uid is not needed any more.
    private func forgetIfIdle(_ sender: String) {
        guard let c = callers[sender], c.held.isEmpty, c.abandon == nil, uids == nil else { return }
        callers[sender] = nil
    }

    /// `sender` starts work that takes several loop turns; its later messages wait until
    /// `finished`. `abandon` stops the work: with a reply to send, or nil when its caller left.
    func started(_ sender: String, abandon: @escaping (DBusErrorReply?) -> Void) {
        callers[sender, default: Caller()].abandon = abandon
    }

    /// `sender`'s work in progress is done: its waiting messages go on.
    func finished(_ sender: String) {
        guard callers[sender] != nil else { return }
        callers[sender]!.abandon = nil
        // On the next turn: the work's own reply and state are settled first.
        loop.nextTurn { [weak self] in self?.pump(sender) }
    }

    /// `name` left the bus: its work in progress is abandoned and its waiting messages
    /// dropped (no one is left to answer). Returns how many were dropped.
    func senderLeft(_ name: String) -> Int {
        uids?.senderLeft(name)
        guard let c = callers.removeValue(forKey: name) else { return 0 }
        c.abandon?(nil)
        if let uid = c.uid {
            namesOf[uid]?.remove(name)
            if namesOf[uid]?.isEmpty == true {
                namesOf[uid] = nil
                // A full bucket is the same as none; one in debt stays, so reconnecting does not clear it.
                if var b = buckets[uid] {
                    refill(&b, .now)
                    if b.level >= settings.capacity {
                        if let t = b.timer { loop.cancelTimer(t) }
                        buckets[uid] = nil
                    }
                }
            }
        }
        return c.held.count + (c.abandon == nil ? 0 : 1)
    }

    /// The pestod is being replaced: work in progress is abandoned with `refusal`, and every
    /// waiting message is returned, in order, to be answered now.
    func releaseAll(_ refusal: DBusErrorReply) -> [DBusMessage] {
        var messages: [DBusMessage] = []
        for (_, c) in callers {
            c.abandon?(refusal)
            messages += c.held
        }
        callers = [:]
        for (_, b) in buckets { if let t = b.timer { loop.cancelTimer(t) } }
        buckets = [:]
        return messages
    }
}

extension PestoServer {
    /// Makes the caller queues and budget for the authorizer set (a budget only with one).
    func makeCallerWork() {
        precondition(callerWork == nil || !callerWork.busy, "the caller budget is set before start()")
        // The uids come from the bus daemon: no budget on a port that is not a bus connection.
        let uids = authorizer.flatMap { authorizer -> CallerUIDs? in
            (authorizer as? RootOnlyAuthorizer)?.uids ?? (port as? DBusConnection).map { CallerUIDs(connection: $0) }
        }
        let settings = CallerWorkBudget.Settings(capacity: callerBudget.capacity, refillPerSecond: callerBudget.refillPerSecond)
        let work = CallerWorkBudget(settings: settings, uids: uids, loop: engine.loop, logger: logger)
        work.process = { [unowned self] message in self.process(message) }
        work.refuse = { [unowned self] message, refusal in
            let address = ReplyAddress(message)
            if address.wantsReply { self.sendReply(.errorReply(to: address, refusal)) }
        }
        callerWork = work
    }
}

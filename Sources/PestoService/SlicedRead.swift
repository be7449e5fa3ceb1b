// SPDX-License-Identifier: GPL-2.0-or-later

// SlicedRead: the reply of a large read (List, GetManagedObjects) built over several loop
// turns, so that other clients' calls and relayed traffic are served between the slices.
//
// Theory of operation
// -------------------
// A read whose reply is one array with more elements than a slice holds is not answered in
// the turn it arrives. Its rows are copied from the tables at once (a snapshot: the reply
// shows the tables as they were when the call arrived, whatever changes meanwhile), and a
// `SlicedReads` job writes them in the wire format (DBusWireMessage.Writer), at most
// `elementsPerSlice` elements and about 4 ms per loop turn (`EventLoop.nextTurn`). When the
// last element is written the message is assembled and sent, unless it is over the bus's
// limit (ReplySizeLimit.swift): then LimitsExceeded, and as soon as the body written so far
// passes the limit the job stops writing, so a refused reply costs no more than the limit.
//
// Order: while a caller has a sliced read in progress or waiting, its later method calls
// (reads and changes alike) are held, in order, and handed to the server again once its read
// is answered: a caller sees its replies in the order it called. At most `heldLimit` calls
// (and 16 MiB of their arguments) are held per caller; one more is refused with LimitsExceeded. Jobs run one at a time, in
// arrival order. A caller that leaves the bus has its jobs and held calls dropped.

import CDBus
import Logging
import PestoDBus
import PestoEngine
import PestoModel
import PestoSystem

/// A read's reply as one array, to be written element by element.
struct SlicedReply {
    /// The signature of the whole reply (one array).
    let signature: String
    /// The alignment of the array's elements (8 for structs and dict entries).
    let elementAlignment: Int
    /// How many elements the array has.
    let count: Int
    /// Writes element `i` (from a snapshot the closure holds).
    let write: (Int, inout DBusWireMessage.Writer) -> Void
}

/// The large reads in progress, one at a time, and the calls held behind them.
final class SlicedReads {
    /// One read being written.
    private struct Job {
        let address: ReplyAddress
        let sender: String
        let reply: SlicedReply
        var next = 0
        var writer = DBusWireMessage.Writer()
        var lengthAt = 0
        var start = 0
    }

    /// Most elements written per loop turn; a reply with no more is answered at once.
    var elementsPerSlice = 2048
    /// Most calls held per caller behind its large reads, and most bytes of their arguments
    /// (one larger call alone is let in), as for changes held back (SenderLimits.swift): a
    /// held call is the message itself, which counts against libdbus's limit on live
    /// incoming messages, past which the connection stops reading.
    static let heldLimit = 64
    static let heldBytesLimit = 16 << 20
    /// Time budget of one slice.
    static let sliceNanoseconds: UInt64 = 4_000_000

    private var jobs: [Job] = []
    /// The calls held per caller (present, perhaps empty, while the caller has a job).
    private var held: [String: [DBusMessage]] = [:]
    /// The bytes of arguments of the calls held, per caller.
    private var heldBytes: [String: Int] = [:]
    private var scheduled = false
    /// Whether the loop's turn times are being watched for the reads (not for a large change).
    private var watchingTurns = false
    private unowned let server: PestoServer

    init(server: PestoServer) { self.server = server }

    /// Whether `sender`'s calls wait behind a large read of its own.
    func isHolding(_ sender: String) -> Bool { held[sender] != nil }

    /// Holds `message` of `sender` until its reads are answered; false when too many are held.
    func hold(_ message: DBusMessage, from sender: String) -> Bool {
        let count = held[sender]?.count ?? 0
        let bytes = message.argumentBytes
        let total = (heldBytes[sender] ?? 0) + bytes
        guard count < Self.heldLimit, count == 0 || total <= Self.heldBytesLimit else { return false }
        held[sender, default: []].append(message)
        heldBytes[sender] = total
        return true
    }

    /// Whether `reply` is large enough to be written over several turns.
    func isLarge(_ reply: SlicedReply) -> Bool { reply.count > elementsPerSlice }

    /// Starts writing `reply` for the call at `address` of `sender`.
    func start(_ reply: SlicedReply, for address: ReplyAddress, sender: String) {
        var job = Job(address: address, sender: sender, reply: reply)
        job.writer.bytes.reserveCapacity(min(reply.count * 128, server.maxMessageBytes))
        job.writer.uint32(0)
        job.lengthAt = job.writer.bytes.count - 4
        job.writer.pad(to: reply.elementAlignment)
        job.start = job.writer.bytes.count
        if held[sender] == nil { held[sender] = [] }
        if jobs.isEmpty, !server.engine.loop.turnTimes.watching {
            // The loop's longest turns while the reads run, for the log (TurnLog.swift's measure).
            server.engine.loop.markTurns()
            watchingTurns = true
        }
        jobs.append(job)
        schedule()
    }

    /// Drops the jobs and held calls of a caller that left the bus; returns how many.
    func senderLeft(_ name: String) -> Int {
        let before = jobs.count
        jobs.removeAll { $0.sender == name }
        heldBytes[name] = nil
        return before - jobs.count + (held.removeValue(forKey: name)?.count ?? 0)
    }

    /// Writes every job to the end now (a pestod handing over answers before it exits).
    func finishAll() {
        while !jobs.isEmpty { slice(budget: .max) }
    }

    private func schedule() {
        guard !scheduled, !jobs.isEmpty else { return }
        scheduled = true
        server.engine.loop.nextTurn { [unowned self] in
            self.scheduled = false
            self.slice(budget: Self.sliceNanoseconds)
            self.schedule()
        }
    }

    /// Writes one slice of the first job; answers it when done, or when over the limit.
    private func slice(budget: UInt64) {
        guard !jobs.isEmpty else { return }
        let started = MonotonicInstant.now
        let limit = server.maxMessageBytes
        var job = jobs.removeFirst()
        let end = min(job.reply.count, job.next + (budget == .max ? Int.max - job.next : elementsPerSlice))
        while job.next < end {
            job.reply.write(job.next, &job.writer)
            job.next += 1
            if job.writer.bytes.count > limit { break }
            if job.next % 64 == 0, MonotonicInstant.now.nanoseconds - started.nanoseconds >= budget { break }
        }
        if job.writer.bytes.count > limit {
            // Over the limit already: the size the whole reply would have, estimated.
            let estimate = job.writer.bytes.count / max(1, job.next) * job.reply.count
            answer(job, server.tooLarge(job.address, bytes: estimate))
        } else if job.next == job.reply.count {
            job.writer.patch(uint32: UInt32(job.writer.bytes.count - job.start), at: job.lengthAt)
            answer(job, server.assembledReturn(to: job.address, signature: job.reply.signature, body: job.writer.bytes))
        } else {
            jobs.insert(job, at: 0)
        }
    }

    /// Sends `reply` for `job`, then hands the caller's held calls to the server again, in
    /// order, until one of them starts another large read of its own.
    private func answer(_ job: Job, _ reply: DBusMessage) {
        if job.address.wantsReply { server.sendReply(reply) }
        server.logLargeRead(job.address, elements: job.reply.count, turns: watchingTurns ? server.engine.loop.turnTimes : nil)
        if jobs.isEmpty && watchingTurns {
            server.engine.loop.endTurnWatch()
            watchingTurns = false
        }
        guard !jobs.contains(where: { $0.sender == job.sender }) else { return }
        var waiting = held.removeValue(forKey: job.sender) ?? []
        heldBytes[job.sender] = nil
        while !waiting.isEmpty {
            let message = waiting.removeFirst()
            // `process`, not `handle`: the caller work budget admitted this call already.
            _ = server.process(message)
            if let more = held[job.sender] {
                // Another large read of its own: the rest waits behind it too.
                held[job.sender] = more + waiting
                heldBytes[job.sender] = (more + waiting).reduce(0) { $0 + $1.argumentBytes }
                return
            }
        }
    }
}

extension PestoServer {
    /// `List`'s reply as a sliced reply, from a snapshot of table `t`.
    static func slicedList(_ t: ForwardingTable) -> SlicedReply {
        let rows = t.list().map { r in (r.id, r.rule, r.status, (try? t.portsWon(r.id)) ?? 0) }
        return SlicedReply(signature: "a(ua{sv}(buusu))", elementAlignment: 8, count: rows.count) { i, w in
            let (id, rule, status, won) = rows[i]
            w.write(.structure([.uint32(id), RuleCodec.encode(rule), RuleCodec.encode(status, portsWon: won)]))
        }
    }

    /// `GetManagedObjects`' reply as a sliced reply, from a snapshot of every table.
    func slicedManagedObjects() -> SlicedReply {
        var entries: [(path: String, kind: TableKind, row: (UInt32, Rule, RuleStatus, UInt32)?)] = []
        for t in engine.tables {
            entries.append((PestoBusNames.tablePath(t.kind), t.kind, nil))
            for r in t.list() {
                entries.append((PestoBusNames.rulePath(t.kind, r.id), t.kind, (r.id, r.rule, r.status, (try? t.portsWon(r.id)) ?? 0)))
            }
        }
        // The tables' own properties, as they are now (the rows are the snapshot).
        let tables = Dictionary(
            uniqueKeysWithValues: engine.tables.map { ($0.kind, ObjectTree.interfacesAndProperties(.table($0.kind), engine: engine)) })
        return SlicedReply(signature: "a{oa{sa{sv}}}", elementAlignment: 8, count: entries.count) { i, w in
            let e = entries[i]
            w.pad(to: 8)
            w.write(.objectPath(e.path))
            if let (id, rule, status, won) = e.row {
                w.write(ObjectTree.ruleInterfacesAndProperties(e.kind, id, rule, status, portsWon: won))
            } else {
                w.write(tables[e.kind]!)
            }
        }
    }

    /// The method return for `address` around a body written by a `SlicedReads` job, or
    /// LimitsExceeded when it is over `maxMessageBytes`.
    func assembledReturn(to address: ReplyAddress, signature: String, body: [UInt8]) -> DBusMessage {
        var fields: [(DBusWireMessage.Field, DBusValue)] = [(.replySerial, .uint32(address.serial))]
        if let sender = address.sender { fields.append((.destination, .string(sender))) }
        let sized = DBusWireMessage.assemble(
            type: DBUS_MESSAGE_TYPE_METHOD_RETURN, noReply: true, fields: fields, signature: signature, body: body,
            maxBytes: maxMessageBytes)
        if let message = sized.message { return message }
        return tooLarge(address, bytes: sized.bytes)
    }

    /// Logs a large read answered over several loop turns, with the loop's longest turns
    /// since the first read began (the first turn took the snapshot), when they were watched.
    func logLargeRead(_ address: ReplyAddress, elements: Int, turns t: TurnTimes?) {
        func ms(_ ns: UInt64) -> String { "\(ns / 1_000_000).\(ns / 100_000 % 10)" }
        let times =
            t.map {
                "; loop turns: \($0.turns), the first \(ms($0.first)) ms (CPU \(ms($0.firstCPU)) ms), longest after it \(ms($0.longestLater)) ms (CPU \(ms($0.longestLaterCPU)) ms)"
            } ?? ""
        logger.info("\(address.member) by \(address.who): \(elements) elements answered over several loop turns\(times)")
    }
}

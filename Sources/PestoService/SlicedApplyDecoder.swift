// SPDX-License-Identifier: GPL-2.0-or-later

// SlicedApplyDecoder: a large Apply message decoded over several loop turns (step 3 of the
// check order).
//
// Theory of operation
// -------------------
// Decoding an `Apply` of 65,535 rules (libdbus values, then rules) took one loop turn of
// 0.3 to 3 s, during which no other client was answered and no relayed byte moved. The
// decoder instead keeps a `DBusArgumentCursor` (libdbus's iterators into the message, which
// it holds) and decodes at most `Budget.elements` elements, and for at most
// `Budget.milliseconds`, per call; the server calls it once per loop turn
// (`EventLoop.nextTurn`) until it returns the request. The checks and messages are exactly
// `ApplyRequest.init`'s (the same `addInsert` and `addRemove`), in the same order, so a
// client cannot tell a sliced decoding from one in a single turn except by its latency.
//
// While a caller's Apply is being decoded, its later messages wait, in order
// (CallerWorkBudget.swift): a client pipelining Apply, Status sees them answered in the
// order it sent them.

import PestoDBus
import PestoEngine
import PestoModel
import PestoSystem

/// Decodes one Apply message a bounded slice at a time.
final class SlicedApplyDecoder {
    /// How much one call may decode.
    struct Budget {
        /// Elements (inserted rules or removed IDs) per call.
        var elements: Int
        /// Milliseconds per call, checked every 32 elements.
        var milliseconds: Int

        /// 512 elements or 2 ms: a slice of a 65,535-rule Apply measured about 1 ms.
        static let standard = Budget(elements: 512, milliseconds: 2)
    }

    /// Which argument is being read.
    private enum Phase {
        case inserts, removes, options
        /// Step 4, in slices too: the rule at this index of the inserts is validated next.
        case validate(Int)
    }

    private let cursor: DBusArgumentCursor
    private var phase = Phase.inserts
    private var request = ApplyRequest()
    private var insertedIDs: Set<UInt32>
    private var removedIDs: Set<UInt32>
    /// When decoding started, for the log.
    let started = MonotonicInstant.now
    /// How many calls (loop turns) it has taken so far.
    private(set) var slices = 0
    /// Set when its caller left or pestod is being replaced: no more slices are decoded.
    var abandoned = false

    /// A decoder for `message`, an Apply whose signature and array lengths (`inserts`,
    /// `removes`) have been checked (steps 1 and 2).
    /// Validates one rule against its table (step 4).
    private let validate: (Rule) throws(PestoError) -> Void

    init(_ message: DBusMessage, inserts: Int, removes: Int, validate: @escaping (Rule) throws(PestoError) -> Void) {
        self.validate = validate
        cursor = DBusArgumentCursor(message)
        insertedIDs = Set(minimumCapacity: inserts)
        removedIDs = Set(minimumCapacity: removes)
        request.inserts.reserveCapacity(inserts)
        precondition(cursor.enterArray(), "Apply's first argument is an array (its signature was checked)")
    }

    /// Whether an Apply with these array lengths is worth slicing: more elements than one
    /// slice decodes.
    static func wanted(inserts: Int, removes: Int, budget: Budget) -> Bool {
        inserts + removes > budget.elements
    }

    /// Decodes (step 3), then validates (step 4, in array order) the next slice: the request
    /// once it is complete and valid (`validated` set), nil when there is more to do. Throws
    /// the reply of the first element that is refused (nothing was changed).
    func step(_ budget: Budget) throws(DBusErrorReply) -> ApplyRequest? {
        slices += 1
        let deadline = MonotonicInstant.now.adding(milliseconds: budget.milliseconds)
        var done = 0
        while done < budget.elements {
            if done & 31 == 31, !(MonotonicInstant.now < deadline) { return nil }
            done += 1
            switch phase {
            case .inserts:
                switch cursor.nextElement() {
                case .value(let item): try request.addInsert(item, seen: &insertedIDs)
                case .end:
                    phase = .removes
                    precondition(cursor.enterArray(), "Apply's second argument is an array (its signature was checked)")
                case .unsupported: throw .invalidArgs("Arguments of an unsupported type.")
                }
            case .removes:
                switch cursor.nextElement() {
                case .value(let item): try request.addRemove(item, inserted: insertedIDs, seen: &removedIDs)
                case .end: phase = .options
                case .unsupported: throw .invalidArgs("Arguments of an unsupported type.")
                }
            case .options:
                guard let options = cursor.nextArgument() else { throw .invalidArgs("Arguments of an unsupported type.") }
                request.tolerance = try BindTolerance(applyOptions: options)
                phase = .validate(0)
            case .validate(let index):
                guard index < request.inserts.count else {
                    request.validated = true
                    return request
                }
                do throws(PestoError) { try validate(request.inserts[index].1) } catch { throw DBusErrorReply(error) }
                phase = .validate(index + 1)
            }
        }
        return nil
    }
}

extension PestoServer {
    /// A slice of decoding: at most `sliceOperations` elements (tests make it small), 512 and
    /// 2 ms by default.
    var decodeBudget: SlicedApplyDecoder.Budget {
        var b = SlicedApplyDecoder.Budget.standard
        b.elements = min(b.elements, sliceOperations)
        return b
    }

    /// Steps 4–7 for a decoded change of `message`; the closure keeps `address` and the
    /// decoded change, not `message`.
    func submit(_ change: TableChange, of message: DBusMessage, _ address: ReplyAddress) {
        if handingOver {
            if address.wantsReply { sendReply(.errorReply(to: address, DBusErrorReply(Self.replacedRefusal))) }
            return
        }
        let sender = message.sender ?? ""
        let bytes = message.argumentBytes
        gate.submit(change, sender: sender, interactive: message.allowsInteractiveAuthorization, bytes: bytes) {
            [unowned self] outcome in self.changed(address, sender: sender, bytes: bytes, outcome)
        }
    }

    /// Step 3 for a large Apply: decodes it a slice per loop turn, its caller's later calls
    /// waiting meanwhile, then steps 4–7 as for any change.
    func decodeInSlices(_ message: DBusMessage, _ kind: TableKind, inserts: Int, removes: Int, _ address: ReplyAddress) {
        let sender = message.sender ?? ""
        let table = engine.table(kind)
        let decoder = SlicedApplyDecoder(message, inserts: inserts, removes: removes) { rule throws(PestoError) in
            try table?.validate(rule)
        }
        callerWork.started(sender) { [unowned self] refusal in
            decoder.abandoned = true
            if let refusal, address.wantsReply { self.sendReply(.errorReply(to: address, refusal)) }
        }
        func slice() {
            guard !decoder.abandoned else { return }
            do throws(DBusErrorReply) {
                guard let request = try decoder.step(decodeBudget) else { return engine.loop.nextTurn(slice) }
                let ms = (MonotonicInstant.now.nanoseconds - decoder.started.nanoseconds) / 1_000_000
                logger.info(
                    "Apply of \(request.inserts.count + request.removes.count) rules decoded and validated in \(ms) ms over \(decoder.slices) loop turns"
                )
                submit(.apply(kind, request), of: message, address)
            } catch {
                if error.name == PestoBusNames.errorName(.invalidRule) { logRefusal(address, error) }
                if address.wantsReply { sendReply(.errorReply(to: address, error)) }
            }
            callerWork.finished(sender)
        }
        slice()
    }
}

// SPDX-License-Identifier: GPL-2.0-or-later

// TableMethods: the methods of top.passt.Pesto1.Table, including Apply.

import PestoDBus
import PestoEngine
import PestoModel

extension PestoServer {
    /// Runs a Table read, or decodes a Table change and returns it to run once authorised;
    /// the arguments' signature has been checked already.
    func tableCall(_ kind: TableKind, member: String, args: [DBusValue], sender: String) throws(DBusErrorReply) -> CallOutcome {
        let t: ForwardingTable
        do { t = try table(kind) } catch { throw DBusErrorReply(error) }
        let id = args.first?.uint32Value ?? 0
        do {
            switch member {
            case "Status":
                let s = try t.status(id)
                return .reply([.bool(s.active), .uint32(s.bound), .uint32(s.failed), .string(s.lastErrorName)])
            case "Read":
                return .reply([RuleCodec.encode(try t.read(id))])
            case "ReadIndex":
                let (ruleID, rule) = try t.read(atIndex: Int(id))
                return .reply([.uint32(ruleID), RuleCodec.encode(rule)])
            case "List":
                return .reply([.array(element: "(ua{sv}(buus))", t.list().map { .structure([.uint32($0.id), RuleCodec.encode($0.rule), RuleCodec.encode($0.status)]) })])
            case "Apply":
                let request = try ApplyRequest(args, table: kind, limits: t.limits, capabilities: t.capabilities)
                return .change { () throws(DBusErrorReply) in [try self.apply(kind, request, sender: sender)] }
            default:
                break
            }
        } catch let e as DBusErrorReply {
            throw e
        } catch let e as PestoError {
            throw DBusErrorReply(e)
        } catch {
            throw DBusErrorReply(DBusErrorReply.failed, "\(error)")
        }

        // Single changes: decode (and validate) now; check the lock, perform and record once authorised.
        let op: TableOperation
        switch member {
        case "Insert": op = .insert(kind, id, try RuleCodec.decodeValid(args[1], capabilities: t.capabilities))
        case "Delete": op = .delete(kind, id, Rule(proto: .tcp, firstPort: 1))  // the stored rule is read when it runs
        case "Activate": op = .activate(kind, id)
        case "Deactivate": op = .deactivate(kind, id)
        default: throw DBusErrorReply(DBusErrorReply.unknownMethod, "No method \(member).")
        }
        return .change { () throws(DBusErrorReply) in try self.change(op, sender: sender) }
    }

    /// Performs one single-rule change for `sender`, journaled under the lock.
    private func change(_ requested: TableOperation, sender: String) throws(DBusErrorReply) -> [DBusValue] {
        try checkMayModify(sender)
        if lockOwner == sender { settleBeforeJournaling() }
        var op = requested
        if case .delete(let kind, let id, _) = op, let rule = try? table(kind).read(id) {
            op = .delete(kind, id, rule)  // the journal needs the rule to undo the delete
        }
        let counts: ForwardingTable.BindCounts?
        do { counts = try perform(op) } catch {
            logger.info("\(op) by \(sender) refused: \(error.message)")
            throw DBusErrorReply(error)
        }
        var performed = Journal()
        performed.record(op)
        finish(performed, sender: sender)
        logger.info("\(op) by \(sender)\(counts.map { ": \($0.bound) bound, \($0.failed) failed" } ?? "")")
        if let counts { return [.uint32(counts.bound), .uint32(counts.failed)] }
        return []
    }

    /// A decoded and validated Apply call.
    ///
    /// Everything here runs before the caller is authorised, so it is linear in the request:
    /// array lengths are capped at the table's MaxRules before any element is read, duplicate
    /// IDs are found with sets, and every rule is validated against the table's capabilities
    /// (pure work), so an invalid rule is refused without asking anyone for a password.
    struct ApplyRequest {
        var inserts: [(UInt32, Rule)] = []
        var removes: [UInt32] = []
        /// The options `max-failures` and `best-effort`, as the tolerance of every new rule.
        var tolerance: BindTolerance

        /// Refuses (InvalidArgs) an insert or remove array longer than the table's MaxRules.
        static func checkLengths(inserts: Int, removes: Int, table: TableKind, limits: TableLimits) throws(DBusErrorReply) {
            for (what, count) in [("inserts", inserts), ("removes", removes)] where count > limits.maxRules {
                throw .invalidArgs(
                    "Apply \(what) \(count) rules; the \(table.name) table holds at most \(limits.maxRules) (MaxRules).")
            }
        }

        /// Decodes Apply's arguments (signature `a(ua{sv})aua{sv}`, already checked) for a
        /// table with these limits and capabilities.
        init(_ args: [DBusValue], table: TableKind, limits: TableLimits, capabilities: Capabilities) throws(DBusErrorReply) {
            let insertItems = args[0].arrayValue ?? []
            let removeItems = args[1].arrayValue ?? []
            try Self.checkLengths(inserts: insertItems.count, removes: removeItems.count, table: table, limits: limits)
            var insertedIDs = Set<UInt32>(minimumCapacity: insertItems.count)
            inserts.reserveCapacity(insertItems.count)
            for item in insertItems {
                guard let fields = item.structValue, fields.count == 2, let id = fields[0].uint32Value else {
                    throw .invalidArgs("Each inserted rule must be (ua{sv}).")
                }
                if !insertedIDs.insert(id).inserted {
                    throw DBusErrorReply(PestoBusNames.errorName(.ruleExists), "Apply inserts rule \(id) twice.")
                }
                inserts.append((id, try RuleCodec.decode(fields[1])))
            }
            var removedIDs = Set<UInt32>(minimumCapacity: removeItems.count)
            for item in removeItems {
                guard let id = item.uint32Value else { throw .invalidArgs("remove must be au.") }
                if insertedIDs.contains(id) {
                    throw .invalidArgs("Apply both inserts and removes rule \(id); give the new rule another ID.")
                }
                if removedIDs.insert(id).inserted { removes.append(id) }
            }
            tolerance = try BindTolerance(applyOptions: args[2])
            // Last, so every InvalidArgs of the message comes first, as it always did; the
            // first invalid rule in array order is the one reported, as when inserting.
            for (_, rule) in inserts {
                do { try rule.validate(capabilities: capabilities) } catch { throw DBusErrorReply(error) }
            }
        }
    }

    /// `Apply`: the proposals' whole client workflow, atomically (see Update.swift).
    private func apply(_ kind: TableKind, _ request: ApplyRequest, sender: String) throws(DBusErrorReply) -> DBusValue {
        try checkMayModify(sender)
        if lockOwner == sender { settleBeforeJournaling() }
        let update = TableUpdate(kind: kind, inserts: request.inserts.map { ($0.0, $0.1, request.tolerance) }, removes: request.removes)
        let results: [(kind: TableKind, id: UInt32, counts: ForwardingTable.BindCounts)]
        let performed: Journal
        do {
            (results, performed) = try applyUpdate([update])
        } catch {
            logger.info("Apply on \(kind.rawValue) by \(sender) rolled back: \(error.message)")
            throw DBusErrorReply(error)
        }
        finish(performed, sender: sender)
        logger.info("Apply on \(kind.rawValue) by \(sender): \(update.inserts.count) inserted and activated, \(update.removes.count) removed")
        return .array(element: "(uuu)", results.map { .structure([.uint32($0.id), .uint32($0.counts.bound), .uint32($0.counts.failed)]) })
    }
}

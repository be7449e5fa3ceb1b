// SPDX-License-Identifier: GPL-2.0-or-later

// TableMethods: the methods of top.passt.Pesto1.Table, including Apply: reads are answered
// here; changes are decoded (steps 2 and 3 of the check order) into a `TableChange` for the
// ChangeGate, which validates, checks the lock, authorises and runs them.

import PestoDBus
import PestoEngine
import PestoModel
import PestoSystem

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
                return .reply([.bool(s.active), .uint32(s.bound), .uint32(s.failed), .string(s.lastErrorName), .uint32(try t.portsWon(id))])
            case "Read":
                return .reply([RuleCodec.encode(try t.read(id))])
            case "ReadIndex":
                let (ruleID, rule) = try t.read(atIndex: Int(id))
                return .reply([.uint32(ruleID), RuleCodec.encode(rule)])
            case "List":
                // A large table's List is written over several loop turns (SlicedRead.swift).
                if t.ruleCount > reads.elementsPerSlice { return .sliced(Self.slicedList(t)) }
                return .reply([
                    .array(
                        element: "(ua{sv}(buusu))",
                        t.list().map { r in
                            .structure([
                                .uint32(r.id), RuleCodec.encode(r.rule), RuleCodec.encode(r.status, portsWon: (try? t.portsWon(r.id)) ?? 0),
                            ])
                        })
                ])
            case "Apply":
                return .change(.apply(kind, try ApplyRequest(args, table: kind, limits: t.limits)))
            default:
                break
            }
        } catch {
            throw DBusErrorReply(replyingTo: error)
        }

        // Single changes: decode now; validated, lock-checked, authorised and run by the gate.
        switch member {
        case "Insert": return .change(.insert(kind, id, try RuleCodec.decode(args[1])))
        case "Delete": return .change(.delete(kind, id))
        case "Activate": return .change(.activate(kind, id))
        case "Deactivate": return .change(.deactivate(kind, id))
        default: throw DBusErrorReply(DBusErrorReply.unknownMethod, "No method \(member).")
        }
    }
}

extension ApplyRequest {
    /// Refuses (InvalidArgs) an insert or remove array longer than the table's MaxRules.
    static func checkLengths(inserts: Int, removes: Int, table: TableKind, limits: TableLimits) throws(DBusErrorReply) {
        for (what, count) in [("inserts", inserts), ("removes", removes)] where count > limits.maxRules {
            throw .invalidArgs(
                "Apply \(what) \(ClientText.counted(count, "rule")); the \(table.name) table holds at most \(limits.maxRules) (MaxRules).")
        }
    }

    /// Decodes Apply's arguments (signature `a(ua{sv})aua{sv}`, already checked) for a table
    /// with these limits (steps 2 and 3 of the check order; the rules are validated in step 4).
    ///
    /// Everything here runs before the caller is authorised, so it is linear in the request:
    /// array lengths are capped at the table's MaxRules before any element is read and
    /// duplicate IDs are found with sets.
    init(_ args: [DBusValue], table: TableKind, limits: TableLimits) throws(DBusErrorReply) {
        let insertItems = args[0].arrayValue ?? []
        let removeItems = args[1].arrayValue ?? []
        try Self.checkLengths(inserts: insertItems.count, removes: removeItems.count, table: table, limits: limits)
        var insertedIDs = Set<UInt32>(minimumCapacity: insertItems.count)
        inserts.reserveCapacity(insertItems.count)
        for item in insertItems { try addInsert(item, seen: &insertedIDs) }
        var removedIDs = Set<UInt32>(minimumCapacity: removeItems.count)
        for item in removeItems { try addRemove(item, inserted: insertedIDs, seen: &removedIDs) }
        tolerance = try BindTolerance(applyOptions: args[2])
    }
}

extension ApplyRequest {
    /// Decodes one element of Apply's inserts, `(ua{sv})`, refusing an ID given twice
    /// (`seen`: the IDs inserted so far). One step of `init`, and of SlicedApplyDecoder.
    mutating func addInsert(_ item: DBusValue, seen insertedIDs: inout Set<UInt32>) throws(DBusErrorReply) {
        guard let fields = item.structValue, fields.count == 2, let id = fields[0].uint32Value else {
            throw .invalidArgs("Each inserted rule must be (ua{sv}).")
        }
        if !insertedIDs.insert(id).inserted {
            throw DBusErrorReply(PestoBusNames.errorName(.ruleExists), "Apply inserts rule \(id) twice.")
        }
        inserts.append((id, try RuleCodec.decode(fields[1])))
    }

    /// Decodes one element of Apply's removes (`u`): refused when the same Apply inserts that
    /// ID; an ID given twice is removed once (`seen`: the IDs removed so far).
    mutating func addRemove(_ item: DBusValue, inserted insertedIDs: Set<UInt32>, seen removedIDs: inout Set<UInt32>)
        throws(DBusErrorReply)
    {
        guard let id = item.uint32Value else { throw .invalidArgs("remove must be au.") }
        if insertedIDs.contains(id) {
            throw .invalidArgs("Apply both inserts and removes rule \(id); give the new rule another ID.")
        }
        if removedIDs.insert(id).inserted { removes.append(id) }
    }
}

extension BindTolerance {
    /// Apply's options (`max-failures` u, default 0; `best-effort` b, default false).
    init(applyOptions value: DBusValue) throws(DBusErrorReply) {
        self = .none
        for (key, v) in value.vardictValue ?? [] {
            switch (key, v) {
            case ("max-failures", .uint32(let n)): maxFailures = n
            case ("best-effort", .bool(let b)): bestEffort = b
            case ("max-failures", _), ("best-effort", _):
                throw .invalidArgs(
                    "Apply option \(ClientText.quote(key)) must have type \(key == "best-effort" ? "b" : "u"), not \(ClientText.quote(v.signature))."
                )
            default:
                throw .invalidArgs("Unknown Apply option \(ClientText.quote(key)); known options: max-failures, best-effort.")
            }
        }
    }
}

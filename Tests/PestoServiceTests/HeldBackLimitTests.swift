// SPDX-License-Identifier: GPL-2.0-or-later

// The bound on what one caller may have held back behind a large update (ChangeQueue.swift),
// in process: the editor's slices are run by the test, one at a time, so the update is in
// progress for exactly as long as the test wants, with no timing involved.

import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoService

@Suite("changes held back behind a large update are bounded per caller (in process)", .timeLimit(.minutes(10)))
struct HeldBackLimitTests {
    typealias Outcome = Result<(result: ChangeResult, committed: Journal), ChangeRefusal>

    /// A rig whose editor carries out updates one operation per slice, each slice run only
    /// when the test says so (`runSlices`).
    final class SlicedRig: TablesEditorHost {
        let rig = EditorRig()
        let gate: ChangeGate
        var pending: [() -> Void] = []

        init() {
            rig.editor.sliceBudget = SliceBudget(operations: 1, milliseconds: .max)
            gate = ChangeGate(editor: rig.editor)
            rig.editor.host = self
        }

        // The editor's host: slices wait for `runSlices`; nothing to save or hold.
        func nextTurn(_ work: @escaping () -> Void) { pending.append(work) }
        func shortly(_ work: @escaping () -> Void) { pending.append(work) }
        var mayAnnounce: Bool { true }
        func updateInProgress(_ busy: Bool) {}
        func saveCommitted() {}

        /// Runs slices until no more are asked for.
        func runSlices() {
            while !pending.isEmpty { pending.removeFirst()() }
        }
    }

    @Test(
        "during a large update a caller may have 64 changes and 16 MiB held back: the next is refused at once with LimitsExceeded and nothing changes; other callers are not affected; the held-back ones run after the update"
    )
    func heldBackChangesAreBounded() throws {
        let s = SlicedRig()
        let ports = TestSockets.freePorts(80)
        var request = ApplyRequest()
        request.inserts = (0..<3).map { (UInt32(1 + $0), EditorRig.tcp(ports.lowerBound + UInt16($0))) }
        var applied: Outcome?
        s.gate.submit(.apply(.host, request), sender: "large") { applied = $0 }
        #expect(applied == nil && !s.rig.editor.isIdle, "the Apply goes on in later slices")

        // 64 inserts of one caller are held back; the 65th is refused at once.
        var outcomes: [Outcome?] = Array(repeating: nil, count: 65)
        for k in 0..<65 {
            s.gate.submit(.insert(.host, UInt32(100 + k), EditorRig.tcp(ports.lowerBound + 10)), sender: "flood", bytes: 100) {
                outcomes[k] = $0
            }
        }
        #expect(outcomes[0..<64].allSatisfy { $0 == nil }, "held back")
        #expect(TablesEditorTests.code(outcomes[64]) == "LimitsExceeded")
        // The byte bound: a caller's lone change of more than 16 MiB waits (as in the
        // authorisation queue), but nothing more of that caller does.
        var huge: Outcome?
        var big: Outcome?
        s.gate.submit(.insert(.host, 301, EditorRig.tcp(ports.lowerBound + 13)), sender: "bytes", bytes: (16 << 20) + 1) {
            huge = $0
        }
        s.gate.submit(.insert(.host, 300, EditorRig.tcp(ports.lowerBound + 11)), sender: "bytes", bytes: 1) { big = $0 }
        #expect(huge == nil, "held back")
        #expect(TablesEditorTests.code(big) == "LimitsExceeded")
        // Another caller still may wait.
        var other: Outcome?
        s.gate.submit(.insert(.host, 200, EditorRig.tcp(ports.lowerBound + 12)), sender: "other", bytes: 100) { other = $0 }
        #expect(other == nil)

        s.runSlices()
        #expect(TablesEditorTests.code(applied) == "success")
        #expect(outcomes[0..<64].allSatisfy { TablesEditorTests.code($0) == "success" })
        #expect(TablesEditorTests.code(other) == "success")
        #expect(TablesEditorTests.code(huge) == "success")
        let ids = Set(s.rig.table.list().map(\.id))
        #expect(ids.isSuperset(of: (0..<64).map { UInt32(100 + $0) }) && ids.contains(200) && ids.contains(301))
        #expect(!ids.contains(164) && !ids.contains(300), "the refused changes changed nothing")
        // Once idle, the caller's count starts again from nothing.
        #expect(s.rig.editor.holdBackRefusal(sender: "flood", bytes: 100) == nil)
    }
}

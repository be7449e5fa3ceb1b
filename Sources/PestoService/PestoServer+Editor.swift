// SPDX-License-Identifier: GPL-2.0-or-later

// PestoServer's two faces toward the editor's other callers: the control socket's entry
// points (ControlSocket.swift → here → UpstreamUpdate.swift), and the server as the editor's
// host (TablesEditorHost: slices on the loop's turns, announcing while the bus keeps up, the
// retry and scan passes held during a long update).

import PestoEngine
import PestoModel

extension PestoServer {
    /// The active rules of every table, as upstream's dump lists them.
    func upstreamDump() -> [(kind: TableKind, capabilities: Capabilities, rules: [(rule: Rule, bestEffort: Bool)])] {
        editor.upstreamDump()
    }

    /// The most rules an upload may give one table.
    var upstreamRuleLimit: Int { editor.upstreamRuleLimit }

    /// Applies an upload as a difference, over several loop turns if it is large (call it
    /// once the editor is idle, `editor.whenIdle`); `saved` is called with what changed once
    /// it is saved (nil; at once without a state file or when nothing changed) or was undone
    /// because it could not be (the SaveFailed error). A refused upload changes nothing and
    /// is told to `refused`.
    func applyUpstream(
        _ upload: [(kind: TableKind, rules: [(rule: Rule, bestEffort: Bool)])],
        refused: @escaping (PestoError) -> Void,
        saved: @escaping (TablesEditor.UpstreamSummary, PestoError?) -> Void
    ) {
        editor.startUpstream(upload) { [unowned self] outcome in
            switch outcome {
            case .failure(let error): refused(error)
            case .success(let done): self.commitUnanswered(done.committed) { failure in saved(done.summary, failure) }
            }
        }
    }
}

/// The server is the editor's host: slices on the loop's turns, announcing while the bus
/// keeps up, the retry and scan passes held during a long update, saves before journaling.
extension PestoServer: TablesEditorHost {
    func nextTurn(_ work: @escaping () -> Void) { engine.loop.nextTurn(work) }
    func shortly(_ work: @escaping () -> Void) { _ = engine.loop.after(milliseconds: 1, work) }
    var mayAnnounce: Bool { port.outgoingBytes < Self.unsentSignalBytes }
    func updateInProgress(_ busy: Bool) { engine.periodicWorkHeld = busy }
}

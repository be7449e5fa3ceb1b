// SPDX-License-Identifier: GPL-2.0-or-later

// TablesEditorHost: what the editor talks to: the observer it reports final changes to and
// the service it runs in (TablesEditor.swift).

import PestoEngine
import PestoModel
import PestoSystem

/// What the editor reports, once final. Called on the loop thread.
protocol TablesObserver: AnyObject {
    /// A rule was inserted (inactive); `rule` is what was stored.
    func ruleAdded(_ kind: TableKind, _ id: UInt32, _ rule: Rule)
    /// A rule was deleted.
    func ruleRemoved(_ kind: TableKind, _ id: UInt32)
    /// A rule's activity or socket counts changed: activation, deactivation, a retry, a scan,
    /// or the net effect of a rolled-back update on a rule that existed before it.
    func ruleStateChanged(_ kind: TableKind, _ id: UInt32, _ status: RuleStatus, failuresChanged: Bool, retried: Bool)
    /// First match (doc/overlap.md): a change to another rule changed how many ports rule
    /// `id` wins. (A rule's own changes come with `ruleStateChanged`.)
    func portsWonChanged(_ kind: TableKind, _ id: UInt32)
    /// The lock was taken or released.
    func lockOwnerChanged(_ owner: String?)
}

/// What the editor needs of the service it runs in (PestoServer in pestod). Called on the
/// loop thread.
protocol TablesEditorHost: AnyObject {
    /// Runs `work` on the next loop turn (`EventLoop.nextTurn`): the next slice of an update.
    func nextTurn(_ work: @escaping () -> Void)
    /// Runs `work` about a millisecond later: the next slice of an update waiting for the bus.
    func shortly(_ work: @escaping () -> Void)
    /// Whether an update may deliver more reports now: false while the bus has not taken the
    /// signals already sent.
    var mayAnnounce: Bool { get }
    /// An update started being carried out over several turns (true), or ended (false): the
    /// retry and scan passes are held meanwhile.
    func updateInProgress(_ busy: Bool)
    /// Saves (or undoes) the changes committed so far: before the lock holder's changes are
    /// journaled on top of committed ones, and before an update that takes several turns
    /// starts, so that the file never holds half an update.
    func saveCommitted()
}

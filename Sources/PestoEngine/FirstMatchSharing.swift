// SPDX-License-Identifier: GPL-2.0-or-later

// FirstMatchSharing: the listening sockets a table shares among overlapping rules under
// `pestod --overlap first-match`, and which rule each new connection or flow goes to.
//
// Theory of operation
// -------------------
// With `OverlapPolicy.firstMatch` (doc/overlap.md) activation checks no conflict, and the
// sockets are not the rules' own: each is shared by every active rule it serves on its
// port (SharedListeners.swift), opened when the first of them needs it and closed when the
// last one leaves, so the invariant "no operation on one rule opens, closes or moves a
// socket of another rule" becomes "no operation closes a socket another active rule uses".
// A rule's slot then holds the descriptor of the socket serving that port, and `bound`
// counts the ports some socket serves. Each rule's count of ports it wins (`portsWon`) is
// kept as sockets gain and lose users; a change to another rule's count than the one
// operated on is reported to `onPortsWonChange`.

import PestoModel
import PestoSystem

extension ForwardingTable {
    /// How many of rule `id`'s ports it wins: those where a new connection or flow can reach
    /// it. Under `refuse` that is every bound port of an active rule.
    /// - Throws: `NoSuchRule`.
    public func portsWon(_ id: UInt32) throws(PestoError) -> UInt32 {
        let i = try index(of: id)
        guard let sockets = entries[i].sockets else { return 0 }
        return overlapPolicy == .refuse ? sockets.bound : entries[i].won
    }

    /// First match: where a new connection or flow on listening socket `fd` goes: the lowest
    /// active rule the socket serves whose address matches the local address it arrived at.
    /// `localAddress` is asked only when the lowest rule does not take everything the socket
    /// receives. Nil when no rule matches (a socket kept open for a narrower rule) or `fd` is
    /// not one of the table's.
    public func firstMatchTarget(listener fd: Int32, localAddress: () -> IPAddress?) -> ForwardTarget? {
        guard let socket = shared.sockets[fd], let first = socket.users.first else { return nil }
        var local: IPAddress? = nil
        if !ListenBinding(entries[slots[first]!].rule.address).covers(socket.binding) { local = localAddress() }
        for u in socket.users {
            let rule = entries[slots[u]!].rule
            guard ListenBinding(rule.address).matches(local) else { continue }
            return ForwardTarget(
                table: kind, ruleID: u, proto: rule.proto, address: rule.targetAddress, port: rule.targetPort(for: socket.group.port),
                proxyProtocol: rule.proxyProtocol)
        }
        return nil
    }

    /// The descriptor of every listening socket (each once, shared or not).
    public var listeningDescriptors: [Int32] {
        if overlapPolicy == .firstMatch { return shared.sockets.keys.sorted() }
        return entries.flatMap { $0.sockets?.slots.filter { $0 >= 0 } ?? [] }
    }

    /// Makes a socket serve port `port` of rule `id` (being activated, retried or scanned):
    /// under `refuse` a socket of its own; under first match the open socket of its group
    /// that covers its binding, else a new one, bound in place of the narrower sockets it
    /// covers (the kernel refuses it beside them), whose users it then serves too. If that
    /// bind fails, the narrower sockets are opened again.
    func serve(_ id: UInt32, _ rule: Rule, _ port: UInt16) -> Result<Int32, Errno> {
        guard overlapPolicy == .firstMatch else { return openListener(id, rule, port) }
        let group = ListenGroup(rule, port: port)
        let binding = ListenBinding(rule.address)
        if let fd = shared.covering(group, binding) {
            var users = shared.sockets[fd]!.users
            users.insert(id, at: users.firstIndex { $0 > id } ?? users.count)
            setUsers(fd, users)
            return .success(fd)
        }
        var displaced: [SharedSocket] = []
        for fd in shared.covered(by: binding, in: group) {
            displaced.append(shared.sockets[fd]!)
            setUsers(fd, [])
            shared.remove(fd)
            closeListener(fd)
        }
        switch openListener(id, rule, port) {
        case .success(let fd):
            shared.insert(SharedSocket(fd: fd, group: group, binding: binding, opener: rule, openerID: id))
            var users = [id]
            for d in displaced {
                users += d.users
                for u in d.users { repoint(u, port: port, to: .success(fd)) }
            }
            setUsers(fd, users.sorted())
            return .success(fd)
        case .failure(let e):
            for d in displaced { reopen(d) }
            return .failure(e)
        }
    }

    /// Opens a displaced socket again for its users; if that fails, the port is their bind
    /// failure, retried like any other.
    private func reopen(_ d: SharedSocket) {
        let port = d.group.port
        let opened = openListener(d.openerID, d.opener, port)
        if case .success(let fd) = opened {
            shared.insert(SharedSocket(fd: fd, group: d.group, binding: d.binding, opener: d.opener, openerID: d.openerID))
            setUsers(fd, d.users)
        }
        for u in d.users { repoint(u, port: port, to: opened) }
    }

    /// Points port `port` of active rule `id` at a new socket, or counts it failed.
    private func repoint(_ id: UInt32, port: UInt16, to socket: Result<Int32, Errno>) {
        let i = slots[id]!
        let rule = entries[i].rule
        guard var sockets = entries[i].sockets else { preconditionFailure("a user of a shared socket is active") }
        let k = Int(port - rule.firstPort)
        switch socket {
        case .success(let fd):
            sockets.slots[k] = fd
            entries[i].sockets = sockets
        case .failure(let e):
            sockets.slots[k] = Self.failedSlot
            sockets.bound -= 1
            sockets.failed += 1
            sockets.lastError = e
            entries[i].sockets = sockets
            onStateChange?(RuleStateChange(id: id, status: sockets.status, cause: .retried, failuresChanged: true))
        }
    }

    /// First match: rule `id` no longer needs socket `fd` for `port`; the socket is closed
    /// when no other active rule uses it.
    func leave(_ id: UInt32, port: UInt16, _ fd: Int32) {
        var users = shared.sockets[fd]!.users
        users.removeAll { $0 == id }
        setUsers(fd, users)
        if users.isEmpty {
            shared.remove(fd)
            closeListener(fd)
        }
    }

    /// Replaces the users of shared socket `fd` and moves the won-port counts of the rules
    /// that gain or lose the port.
    private func setUsers(_ fd: Int32, _ users: [UInt32]) {
        let binding = { (u: UInt32) in ListenBinding(self.entries[self.slots[u]!].rule.address) }
        let old = SharedListeners.winners(shared.sockets[fd]!.users, binding: binding)
        let new = SharedListeners.winners(users, binding: binding)
        shared.setUsers(fd, users)
        for u in old where !new.contains(u) { adjustWon(u, by: -1) }
        for u in new where !old.contains(u) { adjustWon(u, by: 1) }
    }

    private func adjustWon(_ id: UInt32, by delta: Int) {
        let i = slots[id]!
        if wonBefore[id] == nil { wonBefore[id] = entries[i].won }
        entries[i].won = UInt32(Int(entries[i].won) + delta)
    }

    /// Reports to `onPortsWonChange` every rule but `id` whose won-port count the operation
    /// just done changed, in ID order.
    func reportPortsWon(except id: UInt32?) {
        guard !wonBefore.isEmpty else { return }
        let before = wonBefore
        wonBefore = [:]
        for (u, old) in before.sorted(by: { $0.key < $1.key }) where u != id {
            guard let i = slots[u], entries[i].won != old else { continue }
            onPortsWonChange?(u, entries[i].won)
        }
    }
}

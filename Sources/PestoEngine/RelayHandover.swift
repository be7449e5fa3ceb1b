// SPDX-License-Identifier: GPL-2.0-or-later

// RelayHandover: relayed TCP connections and UDP flows as a running pestod hands them to the
// one taking over from it (doc/takeover.md), and as the new one installs them.
//
// Theory of operation
// -------------------
// A takeover sends, besides the listeners (ListenerAdoption.swift), every relayed
// connection and flow with its descriptors over SCM_RIGHTS. Nothing is closed, drained or
// reopened: the kernel objects (both sockets of a connection, the pipes holding bytes in
// flight, a flow's connected socket with its queued replies) simply get a second owner.
//
// The old instance takes its snapshot (`TCPRelay.handoverSnapshot()`,
// `ForwardingEngine.udpFlowsForHandover()`) inside the one call that holds its event loop
// for the whole handover, and never turns that loop again once the new instance has taken
// over: no byte is read by the old one after the snapshot, so none can be lost or
// reordered. Bytes spliced into a pipe but not yet out of it stay in that pipe, whose two
// ends are handed over with the count (`pending`); the new instance splices them out first,
// exactly as the old one would have. A direction whose pipe is empty holds none.
//
// The new instance installs the connections (`TCPRelay.adopt`) while it restores the
// tables, but does no I/O on them until the old one has said bye (`startAdopted()`): until
// then the old instance may still resume (a failed takeover), and the two must never both
// read. Starting an adopted connection is one turn of its state (TCPConnectionState.swift):
// pending bytes out, then reading, then the epoll interest. A connection still connecting
// waits for its target's EPOLLOUT, as it did in the old instance.
//
// UDP flows are registered at once (`UDPRelay.adopt`): epoll only reports, and the new
// instance's loop does not run before the old one has said bye. Each keeps its client
// address, the local address its replies leave from (pktinfo), its listener (found by
// table, rule and port among the handed-over listeners) and how long it has been idle, so
// its idle timer goes on where it was.
//
// Adopted descriptors are charged to the new instance's `DescriptorBudget` like any others,
// up to its engine limit (they were admitted once already); beyond it a connection or flow
// is refused, and its descriptors are closed here (the old instance's copies end with it).

import CPestoSys
import PestoModel
import PestoSystem

#if canImport(Glibc)
    import Glibc
#endif

/// One relayed TCP connection as it is handed over.
public struct TCPConnectionHandover: Equatable, Sendable {
    /// One direction's progress.
    public struct Direction: Equatable, Sendable {
        /// Bytes in the direction's pipe, not yet written to its destination; the pipe is
        /// handed over exactly when this is positive.
        public var pending: Int
        /// The source reached end of file.
        public var sourceEnded: Bool
        /// shutdown(destination, SHUT_WR) was done: the direction is over.
        public var finished: Bool

        public init(pending: Int = 0, sourceEnded: Bool = false, finished: Bool = false) {
            self.pending = pending
            self.sourceEnded = sourceEnded
            self.finished = finished
        }
    }

    /// The table of the rule whose listener accepted it.
    public var table: TableKind
    /// That rule's ID (the rule may be gone since: the connection lives on).
    public var ruleID: UInt32
    /// The target's connect() has not completed yet.
    public var connecting: Bool
    /// Client → target.
    public var up: Direction
    /// Target → client.
    public var down: Direction
    /// The target's address (getpeername), nil while connecting.
    public var target: SocketAddress?
    /// The bytes of the PROXY protocol header not yet written to the target.
    public var preamble: [UInt8]
    /// The descriptors, in this order: client, target, then the up pipe's read and write
    /// ends if `up.pending > 0`, then the down pipe's likewise. Empty in a decoded record
    /// until the receiver fills them in.
    public var descriptors: [Int32]

    public init(
        table: TableKind, ruleID: UInt32, connecting: Bool, up: Direction, down: Direction, target: SocketAddress?,
        preamble: [UInt8], descriptors: [Int32] = []
    ) {
        self.table = table
        self.ruleID = ruleID
        self.connecting = connecting
        self.up = up
        self.down = down
        self.target = target
        self.preamble = preamble
        self.descriptors = descriptors
    }

    /// How many descriptors the connection carries: its two sockets and two per pipe.
    public var descriptorCount: Int { 2 + (up.pending > 0 ? 2 : 0) + (down.pending > 0 ? 2 : 0) }
}

/// One UDP flow as it is handed over.
public struct UDPFlowHandover: Equatable, Sendable {
    /// The table of the listener's rule.
    public var table: TableKind
    /// The listener's rule.
    public var ruleID: UInt32
    /// The listener's port.
    public var port: UInt16
    /// The client's address as recvmsg() gave it.
    public var client: SocketAddress
    /// Where the client's datagrams arrive; replies leave from there.
    public var local: PacketInfo
    /// How long the flow has been idle, in milliseconds.
    public var idleMilliseconds: UInt32
    /// The flow's connected socket towards the target (-1 in a decoded record until filled in).
    public var socket: Int32

    public init(
        table: TableKind, ruleID: UInt32, port: UInt16, client: SocketAddress, local: PacketInfo, idleMilliseconds: UInt32,
        socket: Int32 = -1
    ) {
        self.table = table
        self.ruleID = ruleID
        self.port = port
        self.client = client
        self.local = local
        self.idleMilliseconds = idleMilliseconds
        self.socket = socket
    }
}

extension ForwardingEngine {
    /// Every UDP flow, with its listener's table, rule and port (old instance, loop held).
    public func udpFlowsForHandover() -> [UDPFlowHandover] {
        udp.handoverSnapshot { [self] listener in
            guard let entry = listenerEntry(fd: listener) else { return nil }
            return (entry.target.table, entry.target.ruleID, entry.listenPort)
        }
    }

    /// Installs a handed-over UDP flow on its listener, which the tables' restore installed;
    /// false (the socket is closed) when there is no such listener, the socket is not a UDP
    /// socket, or the budget is spent.
    public func adopt(_ flow: UDPFlowHandover) -> Bool {
        let listener = table(flow.table).flatMap { t in
            (try? t.listeners(of: flow.ruleID))?.first { $0.port == flow.port }?.fd
        }
        guard let listener, case .success(Int32(SOCK_DGRAM.rawValue)) = Sys.option(flow.socket, level: SOL_SOCKET, name: SO_TYPE),
            udp.adopt(flow, listener: listener)
        else {
            Sys.close(flow.socket)
            return false
        }
        return true
    }

    /// Installs a handed-over TCP connection (no I/O until `tcp.startAdopted()`); false (its
    /// descriptors are closed) when they are not what the record says or the budget is spent.
    public func adopt(_ connection: TCPConnectionHandover) -> Bool {
        guard connection.descriptors.count == connection.descriptorCount, tcp.adopt(connection) else {
            for fd in connection.descriptors { Sys.close(fd) }
            return false
        }
        return true
    }
}

// MARK: - The TCP relay

extension TCPRelay {
    /// Every relayed connection as it is to be handed over, with its descriptors (which stay
    /// open here). Called with the loop held for the whole handover: nothing is read from
    /// these sockets afterwards, unless the takeover fails and this instance carries on.
    public func handoverSnapshot() -> [TCPConnectionHandover] {
        var out: [TCPConnectionHandover] = []
        out.reserveCapacity(activeConnections)
        for i in slots.indices where slots[i].inUse {
            let c = slots[i]
            let state = c.state
            func direction(_ f: TCPConnectionState.Flow) -> TCPConnectionHandover.Direction {
                .init(pending: f.pending, sourceEnded: f.sourceEnded, finished: f.finished)
            }
            var fds = [c.client, c.target]
            if state.up.pending > 0 { fds += [c.upPipe.read, c.upPipe.write] }
            if state.down.pending > 0 { fds += [c.downPipe.read, c.downPipe.write] }
            let peer: SocketAddress?
            if state.phase == .relaying, case .success(let a) = Sys.peerAddress(c.target) { peer = a } else { peer = nil }
            out.append(
                TCPConnectionHandover(
                    table: c.table, ruleID: c.ruleID, connecting: state.phase == .connecting, up: direction(state.up),
                    down: direction(state.down), target: peer, preamble: Array(headers[i].suffix(state.preambleLeft)),
                    descriptors: fds))
        }
        return out
    }

    /// Installs a connection handed over by the pestod this one takes over from, without any
    /// I/O (`startAdopted()` starts it); false when the budget cannot take its descriptors,
    /// which the caller then closes. `connection.descriptors` must match its record.
    func adopt(_ connection: TCPConnectionHandover) -> Bool {
        precondition(connection.descriptors.count == connection.descriptorCount, "descriptors do not match the record")
        let fds = connection.descriptors
        let stream = Int32(SOCK_STREAM.rawValue)
        guard case .success(stream) = Sys.option(fds[0], level: SOL_SOCKET, name: SO_TYPE),
            case .success(stream) = Sys.option(fds[1], level: SOL_SOCKET, name: SO_TYPE),
            connection.preamble.count <= ProxyProtocolHeader.maxLength,
            !(connection.up.finished && connection.down.finished),
            budget.adopt(.tcp)
        else { return false }
        var next = 2
        func flow(_ d: TCPConnectionHandover.Direction) -> (TCPConnectionState.Flow, Pipe) {
            var f = TCPConnectionState.Flow()
            f.sourceEnded = d.sourceEnded || d.finished
            f.finished = d.finished
            guard d.pending > 0 else { return (f, Pipe()) }
            f.pending = d.pending
            f.hasPipe = true
            defer { next += 2 }
            return (f, Pipe(read: fds[next], write: fds[next + 1]))
        }
        let (up, upPipe) = flow(connection.up)
        let (down, downPipe) = flow(connection.down)
        // A connection from its client's address uses the routing its predecessor left
        // installed: counted here, so it stays while the connection lives.
        var transparent = false
        if TransparentSource.isTransparent(fds[1]), let routing = sides[connection.table].transparent,
            case .success = routing.retain()
        {
            transparent = true
        }
        // The pipes are charged with the connection above.
        pipesOpen += (connection.descriptorCount - 2) / DescriptorPlan.perPipe
        let index = allocateSlot()
        if !connection.preamble.isEmpty {
            headers[Int(index)].removeAll(keepingCapacity: true)
            headers[Int(index)].reserveCapacity(ProxyProtocolHeader.maxLength)
            headers[Int(index)] += connection.preamble
        }
        slots[Int(index)] = Connection(
            client: fds[0], target: fds[1],
            state: TCPConnectionState(adoptedConnecting: connection.connecting, up: up, down: down, preamble: connection.preamble.count),
            upPipe: upPipe, downPipe: downPipe, inUse: true, transparent: transparent, table: connection.table,
            ruleID: connection.ruleID)
        activeConnections += 1
        counters.relayed += 1
        adoptedWaiting.append(index)
        settlePipes()
        return true
    }

    /// Starts the adopted connections: once the old pestod has let go of them (said bye).
    public func startAdopted() {
        let waiting = adoptedWaiting
        adoptedWaiting = []
        for index in waiting where slots[Int(index)].inUse {
            if slots[Int(index)].state.phase == .connecting {
                drive(index, .connect(.inProgress))
            } else {
                drive(index, .ready(.client))
            }
        }
    }
}

// MARK: - The UDP relay

extension UDPRelay {
    /// Every flow as it is to be handed over (sockets stay open here); `identify` names a
    /// listener descriptor's (table, rule, port), nil for none (its flows are left out).
    func handoverSnapshot(identify: (Int32) -> (TableKind, UInt32, UInt16)?) -> [UDPFlowHandover] {
        let now = MonotonicInstant.now
        var out: [UDPFlowHandover] = []
        out.reserveCapacity(flowCount)
        for flow in flows where flow.inUse {
            guard let (table, ruleID, port) = identify(flow.listener) else { continue }
            let idle = now.nanoseconds >= flow.lastActive.nanoseconds ? (now.nanoseconds - flow.lastActive.nanoseconds) / 1_000_000 : 0
            out.append(
                UDPFlowHandover(
                    table: table, ruleID: ruleID, port: port, client: flow.client, local: flow.local,
                    idleMilliseconds: UInt32(min(idle, UInt64(UInt32.max))), socket: flow.socket))
        }
        return out
    }

    /// Installs a flow handed over by the pestod this one takes over from, on `listener`,
    /// with its idle time; false (the caller closes the socket) when the flow table or the
    /// budget is full, the flow exists already, or epoll cannot watch the socket.
    func adopt(_ handed: UDPFlowHandover, listener: Int32) -> Bool {
        let key = FlowKey(listener: listener, client: handed.client, local: handed.local.address)
        guard flowsByKey[key] == nil, flowCount < limits.maxFlows, budget.adopt(.udp) else { return false }
        // A flow from its client's address uses the routing (and the client address's route)
        // its predecessor left installed: counted here, so they stay while the flow lives.
        var transparent = false
        if TransparentSource.isTransparent(handed.socket), let routing = sides.host.transparent,
            let client = handed.client.endpoint?.address, case .success(let peer) = Sys.peerAddress(handed.socket),
            let target = peer.endpoint?.address, case .success = routing.retainFlow(client: client, target: target)
        {
            transparent = true
        }
        let now = MonotonicInstant.now
        let idle = UInt64(handed.idleMilliseconds) * 1_000_000
        let lastActive = MonotonicInstant(nanoseconds: now.nanoseconds > idle ? now.nanoseconds - idle : 0)
        let flow = Flow(
            socket: handed.socket, listener: listener, client: handed.client, local: handed.local, lastActive: lastActive,
            transparent: transparent)
        guard install(flow, key: key) != nil else {
            if transparent, let client = handed.client.endpoint?.address { sides.host.transparent?.releaseFlow(client: client) }
            budget.release(.udp)
            return false
        }
        return true
    }
}

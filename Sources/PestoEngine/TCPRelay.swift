// SPDX-License-Identifier: GPL-2.0-or-later

// TCPRelay: accepted TCP connections relayed to their target with splice(2).
//
// Theory of operation
// -------------------
// Each relayed connection is a slot holding two sockets — the accepted `client` and the
// `target` we connected to — and two half-duplex pumps, client→target and target→client.
// Both sockets are registered with the loop under kind `tcpConnection` and the slot's index,
// level-triggered, so the event says which slot and the fd says which side.
//
// States of a slot:
//   CONNECTING   the non-blocking connect() to the target is in progress; only the target
//                is watched, for EPOLLOUT. SO_ERROR then decides: success → RELAYING;
//                failure → the client is closed with a plain close() (FIN), nothing relayed.
//   RELAYING     both pumps run; a pump moves bytes src → pipe → dst with splice(2)
//                (SPLICE_F_MOVE | SPLICE_F_NONBLOCK), never copying through user space.
//   (closed)     both pumps have delivered their source's EOF as shutdown(SHUT_WR) on the
//                other side, or an error happened: both sockets are closed, the slot freed.
//
// A pump (HalfDuplex):
//   - while its pipe holds bytes, it splices them to dst; EAGAIN means dst's buffer is full:
//     the pump stops reading src and waits for EPOLLOUT on dst (back-pressure);
//   - with the pipe empty, it splices from src into the pipe; 0 means EOF: it sends
//     shutdown(dst, SHUT_WR) once (half-close propagates) and is done;
//   - any other error (ECONNRESET, EPIPE, ...) aborts the connection: the *other* socket
//     gets SO_LINGER {1, 0} before close, so its peer sees a reset as well.
// Pipes are taken from a small pool when a pump has something to move and returned when it
// is drained, so an idle connection holds two descriptors, not six.
//
// Capacity: `maxConnections` slots. When they are all in use, or accept4() fails with
// EMFILE/ENFILE, or the target socket cannot be made for lack of descriptors, the relay
// reports it and the engine pauses its listeners for a moment (the kernel keeps the
// connections in the backlog); nothing spins and nothing crashes.
//
// Descriptors: each connection is charged its two sockets to the engine's `DescriptorBudget`
// when accepted, and each pipe two more while it exists (in use or pooled; see
// DescriptorBudget.swift for why a pipe may use the listeners' headroom and a connection may
// not). A connection the budget cannot take is accepted and reset at once (counted in
// `refusedBudget`), so its client learns at once instead of hanging in the backlog, and the
// descriptors pestod keeps for D-Bus, its state and new listeners stay free. A socket
// epoll cannot watch (ENOSPC at `fs.epoll.max_user_watches`, ENOMEM) ends that connection
// with a reset (counted in `watchFailures`); the relay carries on.
//
// A connection only ever refers to its own descriptors and a copy of its target, so it
// survives the deactivation or deletion of the rule whose listener accepted it.

import PestoModel
import CPestoSys

#if canImport(Glibc)
import Glibc
#endif

/// Limits and tuning of the TCP relay.
public struct TCPRelayLimits: Sendable {
    /// Most connections relayed at once.
    public var maxConnections = 8192
    /// Requested pipe capacity (F_SETPIPE_SZ); the kernel may cap it.
    public var pipeSize: Int32 = 1 << 20
    /// Pipes kept open for reuse.
    public var pipePoolSize = 64
    /// Accepts per listener wake-up, for fairness between listeners.
    public var acceptBatch = 64
    /// Connect to an IPv4 loopback target from a rotating source address in 127.0.0.2–254
    /// instead of always 127.0.0.1, so that the ephemeral ports of one source address do not
    /// fill up with TIME_WAIT sockets under connection churn (upstream pasta's
    /// connection rate collapses to zero that way after a minute of churn). The target still sees a loopback peer.
    public var spreadLoopbackSources = true

    public init() {}
}

/// What happened when a listener was serviced.
public enum AcceptOutcome: Equatable, Sendable {
    /// Everything pending was accepted (or the batch ended).
    case accepted
    /// Out of descriptors or slots: pause listeners until capacity returns.
    case exhausted
}

/// Relays TCP connections; belongs to the loop thread.
public final class TCPRelay: EventHandler {
    /// Counters, for logs and the benchmark.
    public struct Counters: Sendable {
        public var accepted: UInt64 = 0
        public var connectFailures: UInt64 = 0
        public var refusedLoops: UInt64 = 0
        public var resets: UInt64 = 0
        public var closed: UInt64 = 0
        public var bytes: UInt64 = 0
        /// Connections given a slot (relayed, or at least connecting).
        public var relayed: UInt64 = 0
        /// Connections reset at once because the descriptor budget was spent.
        public var refusedBudget: UInt64 = 0
        /// Connections reset because epoll could not watch one of their sockets.
        public var watchFailures: UInt64 = 0
    }

    /// One direction of a connection.
    struct HalfDuplex {
        var pipeRead: Int32 = -1
        var pipeWrite: Int32 = -1
        /// Bytes in the pipe, not yet written to dst.
        var pending = 0
        /// dst refused more (EAGAIN): wait for EPOLLOUT on it.
        var dstBlocked = false
        /// src reached end of file.
        var eof = false
        /// shutdown(dst, SHUT_WR) was sent: this direction is finished.
        var done = false
    }

    /// One relayed connection.
    struct Connection {
        var client: Int32 = -1
        var target: Int32 = -1
        var connecting = false
        var up = HalfDuplex()  // client → target
        var down = HalfDuplex()  // target → client
        var clientEvents: UInt32 = 0
        var targetEvents: UInt32 = 0
        var inUse = false
    }

    private let loop: EventLoop
    private let targetSide: (TableKind) -> TargetSide
    private let wouldLoop: (ForwardTarget, SocketAddress) -> Bool
    public let limits: TCPRelayLimits
    /// The engine's descriptor budget, shared with the listeners and the UDP relay.
    private let budget: DescriptorBudget
    private var slots: [Connection] = []
    private var freeSlots: [UInt32] = []
    private var pipePool: [(Int32, Int32)] = []
    /// The next loopback source address's last byte (see `spreadLoopbackSources`).
    private var nextLoopbackSource: UInt32 = 2
    public private(set) var activeConnections = 0
    public private(set) var counters = Counters()
    /// Called when a connection closes, so paused listeners can resume.
    public var onCapacityAvailable: (() -> Void)?

    /// Makes a relay. `targetSide` gives the side where a table's targets are reached;
    /// `wouldLoop` says whether a destination is one of pestod's own listeners there;
    /// `budget` is charged for every connection and pipe.
    public init(
        loop: EventLoop, targetSide: @escaping (TableKind) -> TargetSide, limits: TCPRelayLimits = TCPRelayLimits(),
        budget: DescriptorBudget = DescriptorBudget(plan: .current),
        wouldLoop: @escaping (ForwardTarget, SocketAddress) -> Bool = { _, _ in false }
    ) {
        self.loop = loop
        self.budget = budget
        self.targetSide = targetSide
        self.limits = limits
        self.wouldLoop = wouldLoop
        slots.reserveCapacity(min(limits.maxConnections, 1024))
        loop.setHandler(self, for: EngineEventKind.tcpConnection)
    }

    deinit { closeAll() }

    /// Closes every connection and pooled pipe.
    public func closeAll() {
        for i in slots.indices where slots[i].inUse { close(slot: UInt32(i), reset: false) }
        for (r, w) in pipePool {
            Sys.close(r)
            Sys.close(w)
            budget.release(DescriptorPlan.perPipe)
        }
        pipePool.removeAll()
    }

    // MARK: Accepting

    /// Accepts the connections waiting on `listener` and starts relaying them to `target`.
    public func listenerReadable(fd listener: Int32, target: ForwardTarget) -> AcceptOutcome {
        for _ in 0..<limits.acceptBatch {
            if activeConnections >= limits.maxConnections { return .exhausted }
            var peer = SocketAddress()
            let client = peer.withMutableSockaddr { sa, len in
                pesto_accept4(listener, sa, len, Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue))
            }
            if client < 0 {
                let e = Errno.current
                if e == .wouldBlock || e == .interrupted { return .accepted }
                if e.isDescriptorExhaustion || e.rawValue == ENOBUFS || e.rawValue == ENOMEM { return .exhausted }
                // ECONNABORTED and the like: that one connection is gone; keep accepting.
                precondition(e != .badFileDescriptor, "accept4 on a closed listener \(listener)")
                continue
            }
            counters.accepted += 1
            guard budget.admit(DescriptorPlan.perConnection, for: .tcp) else {
                counters.refusedBudget += 1
                closeWithReset(client)
                continue
            }
            // start() either gives the connection a slot, whose close gives the charge back,
            // or closes the client: then the charge goes back here.
            let relayedBefore = counters.relayed
            let started = start(client: client, peer: peer, target: target)
            if counters.relayed == relayedBefore { budget.release(DescriptorPlan.perConnection) }
            if !started { return .exhausted }
        }
        return .accepted
    }

    /// Closes `fd` with a reset (SO_LINGER 0), so its peer learns at once that it was refused.
    private func closeWithReset(_ fd: Int32) {
        var linger = Glibc.linger(l_onoff: 1, l_linger: 0)
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &linger, socklen_t(MemoryLayout<Glibc.linger>.size))
        Sys.close(fd)
    }

    /// Connects the target side for a new client; false when out of descriptors.
    private func start(client: Int32, peer: SocketAddress, target: ForwardTarget) -> Bool {
        let family: AddressFamily = peer.endpoint?.address.family ?? .ipv4
        let destination = target.destination(peerFamily: family)
        if wouldLoop(target, destination) {
            counters.refusedLoops += 1
            resetAndClose(client)
            return true
        }
        let out: Int32
        switch targetSide(target.table).socket(domain: destination.family, type: Int32(SOCK_STREAM.rawValue)) {
        case .success(let fd): out = fd
        case .failure(let e):
            resetAndClose(client)
            counters.connectFailures += 1
            return !e.isDescriptorExhaustion
        }
        setNoDelay(client)
        setNoDelay(out)
        if limits.spreadLoopbackSources, case .v4(let a)? = destination.endpoint?.address, a >> 24 == 127 {
            bindLoopbackSource(out)
        }
        let r = destination.withSockaddr { sa, len in Glibc.connect(out, sa, len) }
        let connecting: Bool
        if r == 0 {
            connecting = false
        } else if errno == EINPROGRESS || errno == EINTR {
            connecting = true
        } else {
            counters.connectFailures += 1
            Sys.close(out)
            resetAndClose(client)
            return true
        }
        let index = allocateSlot()
        slots[Int(index)] = Connection(client: client, target: out, connecting: connecting, inUse: true)
        activeConnections += 1
        counters.relayed += 1
        if connecting {
            guard setInterest(out, from: 0, to: EventLoop.Events.writable, index: index) else {
                counters.watchFailures += 1
                close(slot: index, reset: true)
                return true
            }
            slots[Int(index)].targetEvents = EventLoop.Events.writable
        } else {
            relay(index)
        }
        return true
    }

    /// Binds `fd` to the next source address of 127.0.0.2–254, leaving the port to connect()
    /// (IP_BIND_ADDRESS_NO_PORT), so the kernel picks it for the whole 4-tuple. A failure only
    /// means the connection comes from 127.0.0.1 as usual.
    private func bindLoopbackSource(_ fd: Int32) {
        let source = IPAddress.v4(0x7F00_0000 | nextLoopbackSource)
        nextLoopbackSource = nextLoopbackSource >= 254 ? 2 : nextLoopbackSource + 1
        _ = Sys.setOption(fd, level: Int32(IPPROTO_IP), name: Int32(PESTO_IP_BIND_ADDRESS_NO_PORT), value: 1)
        _ = SocketAddress(source, port: 0).withSockaddr { Glibc.bind(fd, $0, $1) }
    }

    private func setNoDelay(_ fd: Int32) {
        _ = Sys.setOption(fd, level: Int32(IPPROTO_TCP), name: TCP_NODELAY, value: 1)
    }

    private func allocateSlot() -> UInt32 {
        if let i = freeSlots.popLast() { return i }
        slots.append(Connection())
        return UInt32(slots.count - 1)
    }

    // MARK: Events

    public func handleEvent(_ events: UInt32, index: UInt32, fd: Int32) {
        let i = Int(index)
        guard i < slots.count, slots[i].inUse, fd == slots[i].client || fd == slots[i].target else { return }
        if slots[i].connecting {
            guard fd == slots[i].target else { return }
            var err: Int32 = 0
            var len = socklen_t(4)
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len)
            if err != 0 {
                counters.connectFailures += 1
                close(slot: index, reset: true)  // the client sees the refusal as a reset (ECONNRESET)
                return
            }
            slots[i].connecting = false
        }
        relay(index)
    }

    /// Runs both pumps of a connection and updates what the loop watches; closes it when done.
    private func relay(_ index: UInt32) {
        let i = Int(index)
        let client = slots[i].client
        let target = slots[i].target
        let upOK = pump(&slots[i].up, from: client, to: target)
        let downOK = upOK && pump(&slots[i].down, from: target, to: client)
        if !upOK || !downOK {
            counters.resets += 1
            close(slot: index, reset: true)
            return
        }
        if slots[i].up.done && slots[i].down.done {
            close(slot: index, reset: false)
            return
        }
        let up = slots[i].up
        let down = slots[i].down
        var clientEvents: UInt32 = 0
        var targetEvents: UInt32 = 0
        if !up.eof && !up.dstBlocked { clientEvents |= EventLoop.Events.readable }
        if up.dstBlocked { targetEvents |= EventLoop.Events.writable }
        if !down.eof && !down.dstBlocked { targetEvents |= EventLoop.Events.readable }
        if down.dstBlocked { clientEvents |= EventLoop.Events.writable }
        guard setInterest(client, from: slots[i].clientEvents, to: clientEvents, index: index),
            setInterest(target, from: slots[i].targetEvents, to: targetEvents, index: index)
        else {
            counters.watchFailures += 1
            close(slot: index, reset: true)
            return
        }
        slots[i].clientEvents = clientEvents
        slots[i].targetEvents = targetEvents
    }

    /// Changes the epoll interest of `fd` from `old` to `new`, where 0 means "not in epoll":
    /// a socket with nothing to wait for is removed, because epoll reports HUP and ERR even
    /// for an empty interest and that would spin the loop.
    /// - Returns: false when epoll refused (ENOSPC, ENOMEM): the caller ends the connection.
    private func setInterest(_ fd: Int32, from old: UInt32, to new: UInt32, index: UInt32) -> Bool {
        guard old != new else { return true }
        do throws(PestoError) {
            if new == 0 {
                loop.remove(fd: fd)
            } else if old == 0 {
                try loop.add(fd: fd, events: new, kind: EngineEventKind.tcpConnection, index: index)
            } else {
                try loop.modify(fd: fd, events: new, kind: EngineEventKind.tcpConnection, index: index)
            }
        } catch {
            return false
        }
        return true
    }

    /// Moves what can be moved from `src` to `dst`; false on an error that ends the connection.
    private func pump(_ h: inout HalfDuplex, from src: Int32, to dst: Int32) -> Bool {
        if h.done { return true }
        let flags = UInt32(PESTO_SPLICE_F_MOVE | PESTO_SPLICE_F_NONBLOCK)
        for _ in 0..<16 {
            if h.pending > 0 {
                let n = pesto_splice(h.pipeRead, dst, h.pending, flags)
                if n > 0 {
                    h.pending -= n
                    counters.bytes &+= UInt64(n)
                    continue
                }
                if n < 0 && (errno == EAGAIN || errno == EINTR) {
                    h.dstBlocked = true
                    return true
                }
                return false
            }
            h.dstBlocked = false
            if h.eof {
                shutdown(dst, Int32(SHUT_WR))
                h.done = true
                releasePipe(&h)
                return true
            }
            if h.pipeRead < 0 && !takePipe(&h) { return false }
            let n = pesto_splice(src, h.pipeWrite, Int(limits.pipeSize), flags)
            if n > 0 {
                h.pending = n
                continue
            }
            if n == 0 {
                h.eof = true
                continue
            }
            if errno == EAGAIN || errno == EINTR { break }
            return false
        }
        if h.pending == 0 { releasePipe(&h) }
        return true
    }

    // MARK: Pipes

    /// Gives a direction a pipe, from the pool (already charged) or new (charged here).
    private func takePipe(_ h: inout HalfDuplex) -> Bool {
        if let (r, w) = pipePool.popLast() {
            (h.pipeRead, h.pipeWrite) = (r, w)
            return true
        }
        guard budget.takePipe() else { return false }
        var fds: [Int32] = [-1, -1]
        guard pesto_pipe2(&fds, Int32(PESTO_O_NONBLOCK) | Int32(PESTO_O_CLOEXEC)) == 0 else {
            budget.release(DescriptorPlan.perPipe)
            return false
        }
        _ = fcntl(fds[1], Int32(PESTO_F_SETPIPE_SZ), limits.pipeSize)
        (h.pipeRead, h.pipeWrite) = (fds[0], fds[1])
        return true
    }

    /// Parks a direction's pipe in the pool (while relays are within their descriptor limit)
    /// or closes it.
    private func releasePipe(_ h: inout HalfDuplex) {
        guard h.pipeRead >= 0 else { return }
        if h.pending == 0 && pipePool.count < limits.pipePoolSize && budget.mayKeepIdlePipe {
            pipePool.append((h.pipeRead, h.pipeWrite))
        } else {
            Sys.close(h.pipeRead)
            Sys.close(h.pipeWrite)
            budget.release(DescriptorPlan.perPipe)
        }
        (h.pipeRead, h.pipeWrite, h.pending) = (-1, -1, 0)
    }

    // MARK: Closing

    /// Closes `fd` so that its peer gets a RST instead of a FIN (SO_LINGER with timeout 0):
    /// a client whose target refused, could not be reached or would loop reads ECONNRESET,
    /// as the target's refusal would have told it, not an orderly end of file.
    private func resetAndClose(_ fd: Int32) {
        var linger = Glibc.linger(l_onoff: 1, l_linger: 0)
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &linger, socklen_t(MemoryLayout<Glibc.linger>.size))
        Sys.close(fd)
    }

    /// Closes a connection; with `reset`, both peers get a RST instead of a FIN.
    private func close(slot index: UInt32, reset: Bool) {
        let i = Int(index)
        var c = slots[i]
        func closeSide(_ fd: Int32) {
            guard fd >= 0 else { return }
            if reset {
                resetAndClose(fd)  // also removes it from epoll
            } else {
                Sys.close(fd)  // also removes it from epoll
            }
        }
        closeSide(c.client)  // no array: nothing is allocated per connection here
        closeSide(c.target)
        releasePipe(&c.up)  // a pipe with data left in it is closed, never pooled
        releasePipe(&c.down)
        slots[i] = Connection()
        freeSlots.append(index)
        activeConnections -= 1
        budget.release(DescriptorPlan.perConnection)
        counters.closed += 1
        onCapacityAvailable?()
    }
}

// SPDX-License-Identifier: GPL-2.0-or-later

// TCPRelay: accepted TCP connections relayed to their target with splice(2).
//
// Theory of operation
// -------------------
// Each relayed connection is a slot: the accepted `client` socket, the `target` socket, a
// pipe per direction while that direction has bytes in flight, and a `TCPConnectionState`,
// the value that decides (TCPConnectionState.swift has the phases, half-closes and errors).
// The relay only executes: `drive` feeds the state an event, performs the action it returns
// through the `Sys` funnel (connect, SO_ERROR, splice with SPLICE_F_MOVE | SPLICE_F_NONBLOCK,
// shutdown, pipes, epoll interest) and feeds back the outcome, until `.wait` or `.close`.
//
// Events:
//   listener readable   accept4, up to `acceptBatch`; each connection is admitted (a slot of
//                       `maxConnections`, TCP's share of the descriptor budget; on a shared
//                       listener the context's first match picks the rule), then its target
//                       socket is made and connect()ed. Out of slots or descriptors the
//                       listener pauses (`.exhausted`) and its clients wait in the backlog;
//                       a connection refused (budget, loop, target) is reset at once.
//   socket readiness    kind `tcpConnection`, index = slot, level-triggered; the fd says
//                       the side; drives that slot's state.
//   connection closed   the context hears of it (`relayCapacityAvailable`): paused listeners
//                       resume.
//
// Invariants:
//   - `close(slot:)` is the only way a connection ends, and closes all it holds; one ended
//     by an error is closed with SO_LINGER {1, 0} on both sockets (both peers see a reset),
//     one whose directions were both half-closed with a FIN;
//   - each connection is charged `DescriptorPlan.perConnection` to TCP's share: its sockets
//     and a pipe each way (DescriptorBudget.swift). Open pipes, in use or pooled, are at most
//     two per connection plus `sparePipes`, pooled and charged apart and closed first when a
//     new connection needs the room: the relay never holds more than it was charged, and an
//     admitted connection's pipe is never refused for want of budget;
//   - an idle connection holds its two sockets only: pipes go back to the pool when drained;
//   - a connection refers only to its own descriptors and a copy of its target, so it
//     outlives its rule.
//
// Errors of the environment: accept4 EAGAIN ends the batch; EMFILE, ENFILE, ENOBUFS, ENOMEM
// pause the listener; other accept4 errors (ECONNABORTED) lose that one connection. A failed
// target socket, connect, splice, shutdown, pipe2 or epoll_ctl resets that connection alone,
// counted (`connectFailures`, `resets`, `watchFailures`); EINTR is retried by the funnel. No
// error leaves a descriptor behind.

import CPestoSys
import PestoModel
import PestoSystem

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
        /// `source` "client" connections made from the client's address.
        public var transparent: UInt64 = 0
        /// `source` "client" connections reset because their target-side socket could not take
        /// the client's address (EADDRINUSE: a socket of the namespace holds that address and
        /// port), or the routing could not be installed.
        public var transparentFailures: UInt64 = 0
        /// First match: connections reset because no active rule matches where they arrived.
        public var unmatched: UInt64 = 0
    }

    /// A pipe's two ends; -1 when the direction holds none.
    struct Pipe {
        var read: Int32 = -1
        var write: Int32 = -1
    }

    /// One relayed connection.
    struct Connection {
        var client: Int32 = -1
        var target: Int32 = -1
        var state = TCPConnectionState()
        var upPipe = Pipe()  // client → target
        var downPipe = Pipe()  // target → client
        var inUse = false
        /// From the client's address: holds a use of the target side's TransparentSource.
        var transparent = false
        /// The table of the rule whose listener accepted it (for a takeover).
        var table = TableKind.host
        /// That rule's ID (for a takeover; the rule may be gone since).
        var ruleID: UInt32 = 0

        /// The socket on `side`.
        func socket(_ side: TCPSide) -> Int32 { side == .client ? client : target }
    }

    private let loop: EventLoop
    /// Where each table's targets are reached.
    let sides: TargetSides
    /// The engine: loop checks, first match, capacity (RelayContext.swift).
    private weak var context: (any RelayContext)?
    public let limits: TCPRelayLimits
    /// The engine's descriptor budget, shared with the listeners and the UDP relay.
    let budget: DescriptorBudget
    var slots: [Connection] = []
    /// Each slot's PROXY protocol header, parallel to `slots`: empty (no storage) until the
    /// slot first serves a rule with `proxy-protocol`, then reserved once at
    /// `ProxyProtocolHeader.maxLength` and reused by every later connection of the slot, so
    /// a header costs no allocation per connection or event (v2), and slots of rules
    /// without it cost no memory for it (idle relayed connections stay small).
    var headers: [[UInt8]] = []
    private var freeSlots: [UInt32] = []
    /// Connections handed over by the pestod this one takes over from, installed but not
    /// started (`startAdopted()`).
    var adoptedWaiting: [UInt32] = []
    private var pipePool: [Pipe] = []
    /// Pipes open, in use or pooled: two per connection (charged with it) and `sparePipes`.
    var pipesOpen = 0
    /// Pooled pipes charged on their own, beyond two per connection.
    private var sparePipes = 0
    /// The next loopback source address's last byte (see `spreadLoopbackSources`).
    private var nextLoopbackSource: UInt32 = 2
    public internal(set) var activeConnections = 0
    public internal(set) var counters = Counters()
    /// Where recurring failures are reported once (transparent source).
    public var conditions: DataPathConditions?

    /// Makes a relay. `sides` are where the tables' targets are reached; `context` (held
    /// weakly) answers loop checks and first match and hears of closed connections; `budget`
    /// is charged for every connection.
    public init(
        loop: EventLoop, sides: TargetSides, context: (any RelayContext)?, limits: TCPRelayLimits = TCPRelayLimits(),
        budget: DescriptorBudget = DescriptorBudget(plan: .current)
    ) {
        self.loop = loop
        self.budget = budget
        self.sides = sides
        self.context = context
        self.limits = limits
        slots.reserveCapacity(min(limits.maxConnections, 1024))
        loop.setHandler(self, for: EngineEventKind.tcpConnection)
    }

    deinit { closeAll() }

    /// Closes every connection and pooled pipe.
    public func closeAll() {
        for i in slots.indices where slots[i].inUse { close(slot: UInt32(i), reset: false) }
        while !pipePool.isEmpty { closePooledPipe() }
        settlePipes()
    }

    // MARK: Accepting

    /// Accepts the connections waiting on `listener` and starts relaying them to `target`, or,
    /// on a `shared` listener, to the target the context's first match picks for each.
    public func listenerReadable(fd listener: Int32, target: ForwardTarget, shared: Bool = false) -> AcceptOutcome {
        for _ in 0..<limits.acceptBatch {
            if activeConnections >= limits.maxConnections { return .exhausted }
            var peer = SocketAddress()
            let client: Int32
            switch Sys.accept(listener, peer: &peer) {
            case .success(let fd): client = fd
            case .failure(.wouldBlock): return .accepted
            case .failure(let e) where e.isDescriptorExhaustion || e == .noBufferSpace || e == .noMemory:
                return .exhausted
            case .failure:
                continue  // ECONNABORTED and the like: that one connection is gone; keep accepting
            }
            counters.accepted += 1
            var target = target
            if shared {
                let winner = context?.firstMatchTarget(listener: listener) {
                    guard case .success(let local) = Sys.localAddress(client) else { return nil }
                    return local.endpoint?.address
                }
                guard let winner else {
                    counters.unmatched += 1
                    resetAndClose(client)
                    continue
                }
                target = winner
            }
            // A connection's charge covers two pipes, so up to two spares become its own;
            // beyond, spares make room for it (they are only kept for reuse).
            for _ in 0..<min(2, sparePipes) {
                sparePipes -= 1
                budget.releaseSparePipe()
            }
            while !budget.fits(.tcp) && sparePipes > 0 { dropSparePipe() }
            guard budget.admit(.tcp) else {
                counters.refusedBudget += 1
                resetAndClose(client)
                settlePipes()
                continue
            }
            // start() either gives the connection a slot, whose close gives the charge back,
            // or closes the client: then the charge goes back here.
            let relayedBefore = counters.relayed
            let started = start(client: client, peer: peer, target: target)
            if counters.relayed == relayedBefore { budget.release(.tcp) }
            settlePipes()
            if !started { return .exhausted }
        }
        return .accepted
    }

    /// Connects the target side for a new client; false when out of descriptors.
    private func start(client: Int32, peer: SocketAddress, target: ForwardTarget) -> Bool {
        let family: AddressFamily = peer.endpoint?.address.family ?? .ipv4
        let destination = target.destination(peerFamily: family)
        if context?.refusesLoop(target, to: destination) ?? false {
            counters.refusedLoops += 1
            resetAndClose(client)
            return true
        }
        let out: Int32
        switch sides[target.table].socket(domain: destination.family, type: Int32(SOCK_STREAM.rawValue)) {
        case .success(let fd): out = fd
        case .failure(let e):
            resetAndClose(client)
            counters.connectFailures += 1
            return !e.isDescriptorExhaustion
        }
        // The client has TCP_NODELAY from its listener (Listener.swift): only the target's is set.
        setNoDelay(out)
        var transparent = false
        if target.source == .client, let routing = sides[target.table].transparent {
            // The client's address of the destination's family (a dual-stack listener's
            // IPv4-mapped peer is IPv4, as is its default destination; families always match).
            guard let endpoint = peer.endpoint, endpoint.address.family == (destination.family == AF_INET ? .ipv4 : .ipv6),
                case .success = TransparentSource.prepare(out, client: SocketAddress(endpoint.address, port: endpoint.port)),
                case .success = routing.retain()
            else {
                counters.transparentFailures += 1
                noteTransparentFailure(target)
                Sys.close(out)
                resetAndClose(client)
                return true
            }
            transparent = true
            counters.transparent += 1
        } else if limits.spreadLoopbackSources, case .v4(let a)? = destination.endpoint?.address, a >> 24 == 127 {
            bindLoopbackSource(out)
        }
        let connected = Sys.connect(out, to: destination)
        if case .failed = connected {
            counters.connectFailures += 1
            if transparent { sides[target.table].transparent?.release() }
            Sys.close(out)
            resetAndClose(client)
            return true
        }
        let index = allocateSlot()
        let preamble = writeHeader(target.proxyProtocol, client: client, peer: peer, slot: Int(index))
        slots[Int(index)] = Connection(
            client: client, target: out, state: TCPConnectionState(preamble: preamble), inUse: true, transparent: transparent,
            table: target.table, ruleID: target.ruleID)
        activeConnections += 1
        counters.relayed += 1
        drive(index, .connect(connected), destination: destination)
        return true
    }

    /// Reports a `source` "client" connection that could not be made from the client's
    /// address, once while it recurs (DataPathConditions).
    private func noteTransparentFailure(_ target: ForwardTarget) {
        conditions?.occurred(
            .transparentSourceFailed,
            detail: "a connection of \(target.table.name) rule \(target.ruleID) could not be made from its client's address "
                + "(the address and port are taken in the namespace, or its policy routing could not be installed): reset")
    }

    /// Binds `fd` to the next source address of 127.0.0.2–254, leaving the port to connect()
    /// (IP_BIND_ADDRESS_NO_PORT), so the kernel picks it for the whole 4-tuple. A failure only
    /// means the connection comes from 127.0.0.1 as usual, so it is not checked.
    private func bindLoopbackSource(_ fd: Int32) {
        let source = IPAddress.v4(0x7F00_0000 | nextLoopbackSource)
        nextLoopbackSource = nextLoopbackSource >= 254 ? 2 : nextLoopbackSource + 1
        _ = Sys.setOption(fd, level: Int32(IPPROTO_IP), name: Int32(PESTO_IP_BIND_ADDRESS_NO_PORT), value: 1)
        _ = Sys.bind(fd, to: SocketAddress(source, port: 0))
    }

    /// Sets TCP_NODELAY: the relay forwards segments as they come. A failure (there is none
    /// for a TCP socket but ENOMEM) only costs latency, so it is not checked.
    private func setNoDelay(_ fd: Int32) {
        _ = Sys.setOption(fd, level: Int32(IPPROTO_TCP), name: TCP_NODELAY, value: 1)
    }

    func allocateSlot() -> UInt32 {
        if let i = freeSlots.popLast() { return i }
        slots.append(Connection())
        headers.append([])
        return UInt32(slots.count - 1)
    }

    /// Puts the PROXY protocol header of `version` for the connection of `client` (whose
    /// address is `peer`; the destination is where it connected to, from getsockname) in
    /// the slot's header buffer, and returns its length (0 for none).
    ///
    /// Should getsockname fail (ENOBUFS; nothing else for a connected socket), the header
    /// is version 1's "PROXY UNKNOWN\r\n" or version 2's LOCAL command, which the
    /// specification provides for a sender that does not know the addresses: the target
    /// then uses the connection's own, never a wrong one.
    private func writeHeader(_ version: ProxyProtocolVersion, client: Int32, peer: SocketAddress, slot: Int) -> Int {
        guard version != .none else { return 0 }
        headers[slot].removeAll(keepingCapacity: true)
        if headers[slot].capacity < ProxyProtocolHeader.maxLength { headers[slot].reserveCapacity(ProxyProtocolHeader.maxLength) }
        if let source = peer.endpoint, case .success(let local) = Sys.localAddress(client), let destination = local.endpoint {
            ProxyProtocolHeader.append(version, source: source, destination: destination, to: &headers[slot])
        } else {
            ProxyProtocolHeader.appendUnknown(version, to: &headers[slot])
        }
        return headers[slot].count
    }

    // MARK: Events

    public func handleEvent(_ events: UInt32, index: UInt32, fd: Int32) {
        let i = Int(index)
        // The connection may have been closed earlier in this epoll batch.
        guard i < slots.count, slots[i].inUse, fd == slots[i].client || fd == slots[i].target else { return }
        drive(index, .readiness(fd == slots[i].client ? .client : .target, events: events))
    }

    /// Feeds `event` to the connection's state and executes the actions it returns, feeding
    /// back each one's outcome, until it says to wait or to close. `destination` is the
    /// target's address, for connect() asked again (only just after the first connect()).
    func drive(_ index: UInt32, _ event: TCPConnectionState.Event, destination: SocketAddress? = nil) {
        let i = Int(index)
        var action = slots[i].state.handle(event)
        while true {
            let outcome: TCPConnectionState.Event
            switch action {
            case .wait:
                return
            case .close(let ending):
                end(slot: index, ending)
                return
            case .askConnectAgain:
                guard let destination else { preconditionFailure("connect asked again outside start()") }
                outcome = .connect(Sys.connect(slots[i].target, to: destination))
            case .readPendingError:
                switch Sys.pendingError(slots[i].target) {
                case .success(let error): outcome = .pendingError(error)
                case .failure(let e): outcome = .pendingError(e)  // getsockopt failed: the connect did too
                }
            case .takePipe(let d):
                outcome = .pipe(d, taken: takePipe(&slots[i], d))
            case .spliceIn(let d):
                let pipe = d == .up ? slots[i].upPipe : slots[i].downPipe
                outcome = .spliced(d, Sys.splice(from: slots[i].socket(d.source), to: pipe.write, count: Int(limits.pipeSize)))
            case .spliceOut(let d, let count):
                let pipe = d == .up ? slots[i].upPipe : slots[i].downPipe
                let result = Sys.splice(from: pipe.read, to: slots[i].socket(d.destination), count: count)
                if case .moved(let n) = result { counters.bytes &+= UInt64(n) }
                outcome = .spliced(d, result)
            case .shutdownWrite(let d):
                switch Sys.shutdown(slots[i].socket(d.destination), Int32(SHUT_WR)) {
                case .success: outcome = .shutDown(d, failure: nil)
                case .failure(let e): outcome = .shutDown(d, failure: e)
                }
            case .releasePipe(let d):
                if d == .up {
                    releasePipe(&slots[i].upPipe, pending: 0)
                } else {
                    releasePipe(&slots[i].downPipe, pending: 0)
                }
                outcome = .pipeReleased(d)
            case .writePreamble(let count):
                let header = headers[i]
                let result = header.withUnsafeBytes { raw in
                    Sys.send(slots[i].target, raw.baseAddress! + (raw.count - count), count, flags: Int32(MSG_DONTWAIT | MSG_NOSIGNAL))
                }
                switch result {
                case .success(let n): outcome = .preambleSent(n == 0 ? .endOfFile : .moved(n))
                case .failure(let e) where e == .wouldBlock: outcome = .preambleSent(.wouldBlock)
                case .failure(let e): outcome = .preambleSent(.failed(e))
                }
            case .watch(let client, let target):
                let state = slots[i].state
                let ok =
                    setInterest(slots[i].client, from: state.clientInterest, to: client, index: index)
                    && setInterest(slots[i].target, from: state.targetInterest, to: target, index: index)
                outcome = .watched(ok)
            }
            action = slots[i].state.handle(outcome)
        }
    }

    /// Changes the epoll interest of `fd` from `old` to `new`, where 0 means "not in epoll":
    /// a socket with nothing to wait for is removed, because epoll reports HUP and ERR even
    /// for an empty interest and that would spin the loop.
    /// - Returns: false when epoll refused (ENOSPC, ENOMEM): the state then ends the connection.
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

    // MARK: Pipes

    /// Gives direction `d` of a connection a pipe, from the pool or new (charged with the
    /// connection); false when none can be had (pipe2 failed).
    private func takePipe(_ c: inout Connection, _ d: TCPDirection) -> Bool {
        let pipe: Pipe
        if let pooled = pipePool.popLast() {
            pipe = pooled
        } else {
            // The pool is empty, so every open pipe is in use, and this direction holds none:
            // fewer than two per connection are open.
            switch Sys.pipe() {
            case .success(let fds): pipe = Pipe(read: fds.read, write: fds.write)
            case .failure: return false
            }
            pipesOpen += 1
            // The kernel may grant less than asked (or refuse, above /proc/sys/fs/pipe-max-size
            // without CAP_SYS_RESOURCE): the pipe then moves smaller chunks, which is all.
            _ = Sys.setPipeSize(pipe.write, limits.pipeSize)
        }
        if d == .up { c.upPipe = pipe } else { c.downPipe = pipe }
        return true
    }

    /// Parks a pipe in the pool (when it is empty and the pool has room) or closes it; then
    /// settles the charge of the open pipes.
    private func releasePipe(_ pipe: inout Pipe, pending: Int) {
        guard pipe.read >= 0 else { return }
        if pending == 0 && pipePool.count < limits.pipePoolSize {
            pipePool.append(pipe)
        } else {
            Sys.close(pipe.read)
            Sys.close(pipe.write)
            pipesOpen -= 1
        }
        pipe = Pipe()
        settlePipes()
    }

    /// Keeps the open pipes within what is charged for them: two per connection and the
    /// spares. Spare charges no longer needed are given back; pooled pipes beyond are charged
    /// as spares while TCP's share has room, and closed otherwise. (Pipes in use are at most
    /// two per connection, so the ones beyond are always in the pool.)
    func settlePipes() {
        while sparePipes > 0 && pipesOpen < 2 * activeConnections + sparePipes {
            sparePipes -= 1
            budget.releaseSparePipe()
        }
        while pipesOpen > 2 * activeConnections + sparePipes {
            if budget.takeSparePipe() {
                sparePipes += 1
            } else {
                closePooledPipe()
            }
        }
    }

    /// Closes a spare pipe of the pool and gives back its charge.
    private func dropSparePipe() {
        closePooledPipe()
        sparePipes -= 1
        budget.releaseSparePipe()
    }

    /// Closes a pipe of the pool.
    private func closePooledPipe() {
        let pipe = pipePool.removeLast()
        Sys.close(pipe.read)
        Sys.close(pipe.write)
        pipesOpen -= 1
    }

    // MARK: Closing

    /// Closes `fd` so that its peer gets a RST instead of a FIN (SO_LINGER with timeout 0):
    /// a client whose target refused, could not be reached or would loop reads ECONNRESET,
    /// as the target's refusal would have told it, not an orderly end of file. Should the
    /// option fail (ENOMEM), the peer gets a FIN instead: the socket is closed either way.
    private func resetAndClose(_ fd: Int32) {
        _ = Sys.setResetOnClose(fd)
        Sys.close(fd)
    }

    /// Ends a connection as its state decided, counting why.
    private func end(slot index: UInt32, _ ending: TCPConnectionState.Ending) {
        switch ending {
        case .finished: break
        case .connectFailed: counters.connectFailures += 1
        case .broken, .outOfPipes: counters.resets += 1
        case .unwatchable: counters.watchFailures += 1
        }
        close(slot: index, reset: ending.resets)
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
        // Only the HOST table's side has transparent connections.
        if c.transparent { sides.host.transparent?.release() }
        slots[i] = Connection()
        freeSlots.append(index)
        activeConnections -= 1
        budget.release(.tcp)
        // A pipe with data left in it is closed, never pooled; an empty one stays in the pool
        // as a spare while TCP's share has room.
        releasePipe(&c.upPipe, pending: c.state.up.pending)
        releasePipe(&c.downPipe, pending: c.state.down.pending)
        settlePipes()
        counters.closed += 1
        context?.relayCapacityAvailable()
    }

    // MARK: Inspection (tests)

    /// The state of the connection in slot `index`, if it is in use.
    func connectionState(_ index: Int) -> TCPConnectionState? {
        index < slots.count && slots[index].inUse ? slots[index].state : nil
    }
}

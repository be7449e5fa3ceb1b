// SPDX-License-Identifier: GPL-2.0-or-later

// UDPRelay: datagrams relayed per client flow, with idle expiry and a flow limit.
//
// Theory of operation
// -------------------
// UDP has no connections, so the relay makes them. A flow is one (listener, client address,
// local address the client wrote to) triple; the client's first datagram creates the flow's
// own socket on the target side, connect()ed to the destination, so only the target's
// replies reach it. Replies leave through the listener, from the very address the client
// wrote to (its IP_PKTINFO / IPV6_PKTINFO, kept with the flow), so the client sees them come
// from where it sent (doc/data-path.md, "UDP replies leave from the address the client asked"):
//
//   client ──datagram──▶ listener ──(find or create flow)──▶ flow socket ──send()──▶ target
//   client ◀─sendmmsg()─ listener ◀──── recvmmsg() ──────── flow socket ◀──reply── target
//
// Datagrams move `batch` (64) at a time through two `DatagramBatch`es allocated in init, so
// nothing is allocated per datagram (doc/data-path.md, "UDP in batches").
//
// Events:
//   listener readable   one recvmmsg; each datagram is matched to its flow (`flowsByKey`,
//                       no allocation; once per run of one flow's datagrams) or creates it,
//                       unless the flow table is full (`maxFlows`), the destination is one
//                       of pestod's listeners (`refusesLoop`) or UDP's share of the
//                       descriptor budget is spent: then it is dropped and counted. Each
//                       flow's datagrams then leave its socket in one sendmmsg.
//   flow readable       one recvmmsg into the reply batch (epoll index = slot: no lookup).
//   after the events    the gathered replies leave their listener in one sendmmsg
//                       (`flushReplies`); sooner when the batch is full, another listener's
//                       replies arrive, or the flow was the turn's only source.
//   expiry timer        every `expiryCheckMilliseconds`, flows idle for
//                       `idleTimeoutMilliseconds` close; armed only while flows exist.
//   listener closing    its pending replies are sent, then its flows closed.
//
// Invariants:
//   - a slot is free exactly when its `socket` is -1; `flowsByKey` maps the key of every
//     used slot to it and holds nothing else; `flowCount` counts the used slots;
//   - every flow is charged one descriptor to the engine's `DescriptorBudget` (UDP's share)
//     and is in epoll under kind `udpFlow` with its slot as index;
//   - `pendingReplies` replies wait in `replies`, all from `pendingListener`.
//
// Errors of the environment drop one datagram and are counted (`droppedErrors`); they never
// end a flow or the service. sendmmsg stops at the first datagram it cannot send: the rest
// are sent again and the failing one dropped (`sendAll`), so a stuck socket never spins. An
// ICMP "port unreachable" from the target shows as ECONNREFUSED on the flow's next call:
// counted, and a send is retried once (nothing was sent). The clock is read once per batch.
//
// The relay belongs to the loop thread.

import CPestoSys
import PestoModel
import PestoSystem

#if canImport(Glibc)
    import Glibc
#endif

/// Limits and timing of the UDP relay.
public struct UDPRelayLimits: Sendable {
    /// Most flows at once; datagrams from new clients beyond it are dropped. At most 2^24
    /// (a flow's slot is its epoll index).
    public var maxFlows = 4096
    /// A flow with no datagram in either direction for this long is closed.
    public var idleTimeoutMilliseconds = 180_000
    /// How often idle flows are looked for; a flow lives at most this much past its timeout.
    public var expiryCheckMilliseconds = 1000

    /// The defaults.
    public init() {}
}

/// Relays UDP datagrams per client flow; belongs to the loop thread.
///
/// See the theory of operation at the top of UDPRelay.swift.
public final class UDPRelay: EventHandler {
    /// What the relay has done, for logs, benchmarks and tests.
    public struct Counters: Sendable, Equatable {
        /// Datagrams received from clients on listeners.
        public var datagramsIn: UInt64 = 0
        /// Datagrams sent to targets on flow sockets.
        public var datagramsOut: UInt64 = 0
        /// Replies received from targets on flow sockets.
        public var repliesIn: UInt64 = 0
        /// Replies sent to clients from listeners.
        public var repliesOut: UInt64 = 0
        /// Datagrams from new clients dropped because `maxFlows` flows were open.
        public var droppedFlowLimit: UInt64 = 0
        /// Datagrams dropped because their destination is one of pestod's own listeners.
        public var droppedLoop: UInt64 = 0
        /// Datagrams from new clients dropped because the descriptor budget was spent.
        public var droppedDescriptorBudget: UInt64 = 0
        /// Datagrams lost to errors of the environment (no descriptors, unreachable target,
        /// ECONNREFUSED reported by the target, full socket buffers, ...).
        public var droppedErrors: UInt64 = 0
        /// Datagrams of new `source` "client" flows dropped because the flow could not be made
        /// from the client's address (EADDRINUSE in the namespace, the route refused).
        public var droppedTransparent: UInt64 = 0
        /// Flows opened.
        public var flowsCreated: UInt64 = 0
        /// Flows closed for being idle.
        public var flowsExpired: UInt64 = 0
        /// First match: datagrams from new clients dropped because no active rule matches
        /// the address they were sent to.
        public var droppedUnmatched: UInt64 = 0

        /// All zero.
        public init() {}
    }

    /// Datagrams handled per readiness event of one socket, so one busy client cannot starve
    /// the loop (the loop is level-triggered: what is left is handled on the next turn).
    static let batch = 64
    /// The datagram buffer's size: more than any UDP payload (65,507 bytes over IPv4,
    /// 65,527 over IPv6 without jumbograms), so nothing is ever truncated.
    static let bufferSize = 65_536
    /// ECONNREFUSED: on a connected UDP socket, the target answered an earlier datagram with
    /// ICMP "port unreachable".
    private static let connectionRefused = Errno(rawValue: ECONNREFUSED)

    /// A flow's identity: the listener the client wrote to, the client's address and the
    /// local address it wrote to (nil when the listener does not report it).
    struct FlowKey: Hashable {
        var listener: Int32
        var client: SocketAddress
        var local: IPAddress?
    }

    /// One slot of the flow table.
    struct Flow {
        /// The connected socket towards the target; -1 when the slot is free.
        var socket: Int32 = -1
        /// The listener the client wrote to; replies leave from it.
        var listener: Int32 = -1
        /// The client's address exactly as recvfrom() gave it (IPv4-mapped on a dual-stack
        /// listener), so sendto() on the listener reaches it.
        var client = SocketAddress()
        /// Where the client's first datagram arrived (address and interface); replies leave
        /// from there.
        var local = PacketInfo()
        /// The last datagram in either direction.
        var lastActive = MonotonicInstant(nanoseconds: 0)
        /// From the client's address (`source` "client"): holds a use of the target side's
        /// TransparentSource for the client's address.
        var transparent = false

        /// False for a free slot.
        var inUse: Bool { socket >= 0 }
    }

    private let loop: EventLoop
    /// Where each table's targets are reached.
    let sides: TargetSides
    /// The engine: loop checks and first match (RelayContext.swift).
    private weak var context: (any RelayContext)?
    /// The limits this relay was made with.
    public let limits: UDPRelayLimits
    /// The engine's descriptor budget: one descriptor per flow.
    let budget: DescriptorBudget
    var flows: [Flow] = []
    private var freeSlots: [UInt32] = []
    var flowsByKey: [FlowKey: UInt32] = [:]
    /// Every datagram from a client passes through here, `batch` at a time; allocated once.
    private let datagrams: DatagramBatch
    /// Replies gathered during one loop turn, each with its client and local address, sent
    /// from `pendingListener` in one sendmmsg after the turn's events; allocated once.
    private let replies: DatagramBatch
    /// Replies waiting in `replies` (its first slots).
    private var pendingReplies = 0
    /// The listener the waiting replies leave from.
    private var pendingListener: Int32 = -1
    /// Per datagram of a listener batch, its flow's slot (-1: dropped, or already sent).
    private let batchFlows: UnsafeMutablePointer<Int32>
    /// The datagrams of one flow in a listener batch, in arrival order, for one sendmmsg.
    private let sendOrder: UnsafeMutablePointer<UInt8>
    /// The expiry timer, armed while there are flows.
    private var expiryTimer: EventLoop.TimerID?

    /// Flows open now.
    public private(set) var flowCount = 0
    /// What the relay has done so far.
    public private(set) var counters = Counters()

    /// Where a full flow table is reported (once while it stays full), if anywhere.
    public var conditions: DataPathConditions?

    /// Makes a relay and makes it the loop's handler for `udpFlow` sources. `sides` are where
    /// the tables' targets are reached; `context` (held weakly) answers loop checks and first
    /// match; `budget` is charged per flow.
    public init(
        loop: EventLoop, sides: TargetSides, context: (any RelayContext)?, limits: UDPRelayLimits = UDPRelayLimits(),
        budget: DescriptorBudget = DescriptorBudget(plan: .current)
    ) {
        precondition(limits.maxFlows >= 0 && limits.maxFlows <= 1 << 24, "maxFlows \(limits.maxFlows) is not in 0...2^24")
        precondition(limits.idleTimeoutMilliseconds > 0, "idleTimeoutMilliseconds must be positive")
        precondition(limits.expiryCheckMilliseconds > 0, "expiryCheckMilliseconds must be positive")
        self.loop = loop
        self.sides = sides
        self.context = context
        self.limits = limits
        self.budget = budget
        datagrams = DatagramBatch(capacity: Self.batch, bufferSize: Self.bufferSize)
        replies = DatagramBatch(capacity: Self.batch, bufferSize: Self.bufferSize)
        batchFlows = .allocate(capacity: Self.batch)
        sendOrder = .allocate(capacity: Self.batch)
        flows.reserveCapacity(min(limits.maxFlows, 1024))
        freeSlots.reserveCapacity(min(limits.maxFlows, 1024))
        flowsByKey.reserveCapacity(min(limits.maxFlows, 1024))
        loop.setHandler(self, for: EngineEventKind.udpFlow)
        // Weak: the relay goes away when the loop lets go of its handler.
        loop.afterEvents { [weak self] in self?.flushReplies() }
    }

    deinit {
        closeAll()
        batchFlows.deallocate()
        sendOrder.deallocate()
    }

    /// Closes every flow (engine shutdown) and disarms the expiry timer. Replies not yet sent
    /// are dropped (counted): their listeners may be closed already.
    public func closeAll() {
        counters.droppedErrors += UInt64(pendingReplies)
        pendingReplies = 0
        guard flowCount > 0 else { return }
        for slot in flows.indices where flows[slot].inUse { closeFlow(slot: slot) }
    }

    // MARK: Client → target

    /// Relays the datagrams waiting on `listener` to `target`, one flow per client address.
    ///
    /// Takes at most `batch` datagrams, then returns so other sources get their turn.
    /// On a `shared` listener a new flow's target is the one the context's first match picks.
    public func listenerReadable(fd listener: Int32, target: ForwardTarget, shared: Bool = false) {
        let received: Int
        switch Sys.receiveBatch(listener, into: datagrams, count: Self.batch, flags: Int32(MSG_DONTWAIT)) {
        case .success(let n): received = n
        case .failure(let e) where e == .wouldBlock: return
        case .failure:
            // An unconnected socket has few errors to report (ENOMEM, a queued ICMP error
            // with IP_RECVERR); each is one lost datagram. The loop is level-triggered: what
            // is waiting is taken on its next turn.
            counters.droppedErrors += 1
            return
        }
        let now = MonotonicInstant.now
        counters.datagramsIn += UInt64(received)
        var previous: (key: FlowKey, slot: Int)? = nil
        for i in 0..<received {
            let client = datagrams.peer(i)
            let local = datagrams.local(i)
            let key = FlowKey(listener: listener, client: client, local: local.address)
            if let previous, previous.key == key {
                batchFlows[i] = Int32(previous.slot)
            } else if let found = flowSlot(key: key, local: local, target: target, shared: shared, now: now) {
                flows[found].lastActive = now
                previous = (key, found)
                batchFlows[i] = Int32(found)
            } else {
                previous = nil
                batchFlows[i] = -1
            }
        }
        // Each flow's datagrams of the batch, in the order they arrived, in one sendmmsg on
        // its socket (flows in the order of their first datagram).
        for i in 0..<received where batchFlows[i] >= 0 {
            let slot = batchFlows[i]
            var count = 0
            for j in i..<received where batchFlows[j] == slot {
                sendOrder[count] = UInt8(j)
                count += 1
                batchFlows[j] = -1
            }
            sendToTarget(count, on: flows[Int(slot)].socket)
        }
    }

    /// The slot of the flow of `client` on `listener`, opened if needed; nil when the
    /// datagram is to be dropped (counted here).
    private func flowSlot(key: FlowKey, local: PacketInfo, target: ForwardTarget, shared: Bool, now: MonotonicInstant) -> Int? {
        let listener = key.listener
        let client = key.client
        if let slot = flowsByKey[key] { return Int(slot) }
        var target = target
        if shared {
            guard let winner = context?.firstMatchTarget(listener: listener, localAddress: { local.address }) else {
                counters.droppedUnmatched += 1
                return nil
            }
            target = winner
        }
        guard flowCount < limits.maxFlows else {
            counters.droppedFlowLimit += 1
            conditions?.occurred(
                .udpFlowTableFull,
                detail: "the UDP flow table is full (\(limits.maxFlows) flows, --max-udp-flows): datagrams from new clients are dropped")
            return nil
        }
        // `endpoint` turns an IPv4-mapped client of a dual-stack listener into IPv4.
        let destination = target.destination(peerFamily: client.endpoint?.address.family ?? .ipv4)
        if context?.refusesLoop(target, to: destination) ?? false {
            counters.droppedLoop += 1
            return nil
        }
        guard budget.admit(.udp) else {
            counters.droppedDescriptorBudget += 1
            return nil
        }
        let side = sides[target.table]
        // From the client's address (`source` "client"), of the destination's family.
        var transparentClient: SocketAddress? = nil
        if target.source == .client, side.transparent != nil, let endpoint = client.endpoint {
            transparentClient = SocketAddress(endpoint.address, port: endpoint.port)
        }
        guard let socket = openFlowSocket(to: destination, side: side, from: transparentClient) else {
            budget.release(.udp)
            if transparentClient != nil {
                counters.droppedTransparent += 1
                conditions?.occurred(
                    .transparentSourceFailed,
                    detail: "a UDP flow of \(target.table.name) rule \(target.ruleID) could not be made from its client's address "
                        + "(the address and port are taken in the namespace, or its route could not be added): datagram dropped")
            } else {
                counters.droppedErrors += 1
            }
            return nil
        }
        let flow = Flow(
            socket: socket, listener: listener, client: client, local: local, lastActive: now, transparent: transparentClient != nil)
        guard let slot = install(flow, key: key) else {
            // epoll cannot take one more watch: this datagram is lost, the relay carries on.
            if let address = transparentClient?.endpoint?.address { side.transparent?.releaseFlow(client: address) }
            Sys.close(socket)
            budget.release(.udp)
            counters.droppedErrors += 1
            return nil
        }
        counters.flowsCreated += 1
        conditions?.clear(.udpFlowTableFull)
        return Int(slot)
    }

    /// Puts `flow` (charged already) in a free slot under `key`, watched by epoll under kind
    /// `udpFlow` with the slot as its index, and arms the expiry timer with the first flow.
    /// - Returns: the slot, or nil when epoll cannot watch the socket (nothing is changed).
    func install(_ flow: Flow, key: FlowKey) -> UInt32? {
        let slot: UInt32
        if let free = freeSlots.popLast() {
            slot = free
        } else {
            slot = UInt32(flows.count)
            flows.append(Flow())
        }
        do throws(PestoError) {
            try loop.add(fd: flow.socket, events: EventLoop.Events.readable, kind: EngineEventKind.udpFlow, index: slot)
        } catch {
            freeSlots.append(slot)
            return nil
        }
        flows[Int(slot)] = flow
        flowsByKey[key] = slot
        flowCount += 1
        if expiryTimer == nil {
            expiryTimer = loop.every(milliseconds: limits.expiryCheckMilliseconds) { [unowned self] in
                self.expireIdleFlows(now: .now)
            }
        }
        return slot
    }

    /// A non-blocking UDP socket on `side`, connected to `destination`; nil when the
    /// environment refuses (no descriptors, no route, no such family, no ephemeral port).
    /// With `client`, the socket is bound to the client's address and port (transparent
    /// source), and the client's address is retained in the side's routing; nil also when
    /// that fails (EADDRINUSE, the route refused).
    private func openFlowSocket(to destination: SocketAddress, side: TargetSide, from client: SocketAddress?) -> Int32? {
        let opened = side.socket(domain: destination.family, type: Int32(SOCK_DGRAM.rawValue))
        guard case .success(let fd) = opened else { return nil }
        if let client {
            guard let routing = side.transparent, let address = client.endpoint?.address, client.family == destination.family,
                case .success = TransparentSource.prepare(fd, client: client)
            else {
                Sys.close(fd)
                return nil
            }
            guard let target = destination.endpoint?.address, case .success = routing.retainFlow(client: address, target: target) else {
                Sys.close(fd)
                return nil
            }
            // A UDP connect() only sets the default destination: it completes at once or fails.
            guard case .connected = Sys.connect(fd, to: destination) else {
                routing.releaseFlow(client: address)
                Sys.close(fd)
                return nil
            }
            return fd
        }
        guard case .connected = Sys.connect(fd, to: destination) else {
            Sys.close(fd)
            return nil
        }
        return fd
    }

    /// Sends the `count` datagrams of the batch named by `sendOrder` on a flow socket, in
    /// that order: one sendmmsg() unless one fails.
    private func sendToTarget(_ count: Int, on socket: Int32) {
        let order = UnsafePointer(sendOrder)
        let (sent, dropped) = Self.sendAll(count, retryRefused: true) { range in
            if range.count == 1 {
                // One datagram (request/response): send() costs less than a sendmmsg() of one.
                let i = Int(order[range.lowerBound])
                return Sys.send(socket, datagrams.bytes(i), datagrams.length(i), flags: Int32(MSG_DONTWAIT)).map { _ in 1 }
            }
            return Sys.sendBatchConnected(
                socket, datagrams, index: order + range.lowerBound, count: range.count, flags: Int32(MSG_DONTWAIT))
        }
        counters.datagramsOut += sent
        counters.droppedErrors += dropped
    }

    /// Sends datagrams `0..<count` with `send`, which sends a prefix of the range it is given
    /// as sendmmsg() does (how many; a failure when the first failed). sendmmsg() stops at
    /// the first datagram it cannot send and reports that on no call: the next call starts
    /// with it. A datagram whose call fails is dropped (counted) and the rest are sent on, in
    /// order, so the calls are at most `count` plus the retries. With `retryRefused`, a
    /// datagram that fails with ECONNREFUSED gets one more try: on a connected UDP socket that
    /// is an ICMP error about an earlier datagram (that one is the loss), cleared by being
    /// reported, and nothing was sent. Returns the datagrams sent and the failed calls.
    static func sendAll(
        _ count: Int, retryRefused: Bool, send: (Range<Int>) -> Result<Int, Errno>
    ) -> (sent: UInt64, dropped: UInt64) {
        var sent: UInt64 = 0
        var dropped: UInt64 = 0
        var next = 0
        var retried = false
        while next < count {
            switch send(next..<count) {
            case .success(let n) where n > 0:
                sent += UInt64(n)
                next += n
                retried = false
            case .failure(let e) where retryRefused && e == Self.connectionRefused && !retried:
                dropped += 1
                retried = true
            case .success, .failure:
                // A full send buffer (EAGAIN), no route, ...: UDP may lose this one.
                dropped += 1
                next += 1
                retried = false
            }
        }
        return (sent, dropped)
    }

    // MARK: Target → client

    /// A flow socket is readable: its replies join those gathered this turn, to go back to
    /// their clients from the listener after the turn's events (`flushReplies`).
    ///
    /// Takes at most `batch` replies, then returns so other sources get their turn.
    public func handleEvent(_ events: UInt32, index: UInt32, fd: Int32) {
        let slot = Int(index)
        // The flow may have been closed earlier in this epoll batch.
        guard slot < flows.count, flows[slot].socket == fd else { return }
        let listener = flows[slot].listener
        // One sendmmsg leaves from one listener: another's replies go first.
        if pendingReplies > 0 && pendingListener != listener { flushReplies() }
        pendingListener = listener
        var budget = Self.batch
        var errors = 0
        receiving: while budget > 0 {
            if pendingReplies == Self.batch { flushReplies() }
            let room = min(budget, Self.batch - pendingReplies)
            switch Sys.receiveBatch(fd, into: replies, at: pendingReplies, count: room, flags: Int32(MSG_DONTWAIT)) {
            case .success(let received):
                counters.repliesIn += UInt64(received)
                for i in pendingReplies..<(pendingReplies + received) {
                    replies.setDestination(i, to: flows[slot].client, from: flows[slot].local)
                }
                pendingReplies += received
                budget -= received
                if received < room { break receiving }
            case .failure(let e) where e == .wouldBlock:
                break receiving
            case .failure:
                // An error (ECONNREFUSED and friends: the target rejected an earlier datagram)
                // is counted, and cleared by being reported: one more try takes what may wait
                // behind it. The flow stays, the target may come back.
                counters.droppedErrors += 1
                errors += 1
                if errors == 2 { break receiving }
            }
        }
        if budget < Self.batch { flows[slot].lastActive = .now }
        // The only source of its turn (request/response): nothing to gather with, so the
        // replies leave now, as they would have without gathering.
        if loop.readyThisTurn == 1 { flushReplies() }
    }

    /// Sends the replies gathered so far from `pendingListener`, each to its client from its
    /// flow's local address: one sendmmsg() unless one fails; a reply whose call fails is
    /// dropped (counted) and the rest are sent on. Runs after each turn's events, and before
    /// the batch would overflow or another listener's replies join it.
    func flushReplies() {
        let count = pendingReplies
        guard count > 0 else { return }
        pendingReplies = 0
        let listener = pendingListener
        let (sent, dropped) = Self.sendAll(count, retryRefused: false) { range in
            Sys.sendBatchEach(listener, replies, range: range, flags: Int32(MSG_DONTWAIT))
        }
        counters.repliesOut += sent
        counters.droppedErrors += dropped
    }

    // MARK: Ending flows

    /// Closes the flows of `listener`, which the engine is about to close: replies could no
    /// longer be sent from it, and its descriptor number may soon be another listener's.
    public func listenerClosing(fd listener: Int32) {
        if pendingListener == listener { flushReplies() }
        guard flowCount > 0 else { return }
        for slot in flows.indices where flows[slot].inUse && flows[slot].listener == listener {
            closeFlow(slot: slot)
        }
    }

    /// Closes the flows whose last datagram is `idleTimeoutMilliseconds` or more before `now`.
    func expireIdleFlows(now: MonotonicInstant) {
        for slot in flows.indices where flows[slot].inUse {
            if flows[slot].lastActive.adding(milliseconds: limits.idleTimeoutMilliseconds) <= now {
                closeFlow(slot: slot)
                counters.flowsExpired += 1
            }
        }
    }

    /// Stops watching and closes a flow's socket, frees its slot, and disarms the expiry
    /// timer with the last flow.
    private func closeFlow(slot: Int) {
        let flow = flows[slot]
        precondition(flow.inUse, "closing free UDP flow slot \(slot)")
        flowsByKey[FlowKey(listener: flow.listener, client: flow.client, local: flow.local.address)] = nil
        // close() alone leaves epoll only once no other reference to the socket exists (a
        // fork between our socket() and its exec, say); removing first is certain.
        loop.remove(fd: flow.socket)
        Sys.close(flow.socket)
        // Only the HOST table's side has transparent flows.
        if flow.transparent, let address = flow.client.endpoint?.address { sides.host.transparent?.releaseFlow(client: address) }
        flows[slot] = Flow()
        freeSlots.append(UInt32(slot))
        flowCount -= 1
        budget.release(.udp)
        if flowCount == 0, let timer = expiryTimer {
            loop.cancelTimer(timer)
            expiryTimer = nil
        }
    }

    // MARK: Inspection (tests)

    /// The socket of the (first) flow of `client` on `listener`, or nil.
    func flowSocket(listener: Int32, client: SocketAddress) -> Int32? {
        flows.first { $0.inUse && $0.listener == listener && $0.client == client }?.socket
    }

    /// The local end every open flow's replies leave from.
    var flowLocals: [PacketInfo] { flows.filter(\.inUse).map(\.local) }

    /// The slot of every open flow with its socket.
    var openFlows: [(slot: Int, socket: Int32)] {
        flows.indices.filter { flows[$0].inUse }.map { ($0, flows[$0].socket) }
    }

    /// True when the expiry timer is armed.
    var expiryArmed: Bool { expiryTimer != nil }
}

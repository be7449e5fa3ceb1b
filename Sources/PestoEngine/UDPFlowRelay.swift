// UDPRelay: datagrams relayed per client flow.
//
// Theory of operation
// -------------------
// UDP has no connections, so the relay makes them: a flow is one (listening socket, client
// address) pair. The first datagram from a client creates the flow's own socket on the
// target side, connect()ed to the target, so the kernel filters replies for us and the
// flow's socket is the only one that receives them:
//
//   client ──datagram──▶ listener ──(lookup/create flow)──▶ flow socket ──send()──▶ target
//   client ◀──sendto()── listener ◀──────── recv() ───────── flow socket ◀──reply── target
//
// Replies leave through the listening socket, so the client sees them come from the
// address and port it sent to. Flows live in slots reused through a free list; the slot is
// the epoll index of the flow socket, so reply events need no lookup. New datagrams are
// matched to flows with one dictionary lookup keyed by (listener, client address), which
// allocates nothing. One 64 KiB buffer, allocated once, carries every datagram.
//
// A flow is closed when it has been idle (no datagram either way) for the idle timeout
// (180 s by default), when its listener is closed (replies could no longer be sent), or when
// the relay shuts down. At `maxFlows`, datagrams from new clients are dropped and counted.
// A destination that is one of pestod's own listeners on the target side is dropped too
// (it would loop forever). Errors of the environment (ECONNREFUSED from an earlier ICMP,
// ENOBUFS) drop a datagram and are counted; they never end the service.

import CPestoSys

#if canImport(Glibc)
import Glibc
#endif

/// Limits of the UDP relay.
public struct UDPRelayLimits: Sendable {
    /// Most flows at once.
    public var maxFlows = 4096
    /// A flow idle this long is closed.
    public var idleTimeoutMilliseconds = 180_000
    /// How often idle flows are looked for.
    public var expiryCheckMilliseconds = 1000
    /// Datagrams handled per readiness event, for fairness.
    public var batch = 64

    public init() {}
}

/// Relays UDP datagrams per client flow; belongs to the loop thread.
public final class UDPRelay: EventHandler {
    /// What the relay has done, for logs and tests.
    public struct Counters: Sendable {
        public var datagramsIn: UInt64 = 0
        public var datagramsOut: UInt64 = 0
        public var repliesIn: UInt64 = 0
        public var repliesOut: UInt64 = 0
        public var droppedFlowLimit: UInt64 = 0
        public var droppedLoop: UInt64 = 0
        public var droppedErrors: UInt64 = 0
        public var flowsCreated: UInt64 = 0
        public var flowsExpired: UInt64 = 0
    }

    /// A flow's identity: the listener it came in on and the client's address.
    struct FlowKey: Hashable {
        var listener: Int32
        var client: SocketAddress
    }

    /// One flow.
    struct Flow {
        var socket: Int32 = -1
        var listener: Int32 = -1
        var client = SocketAddress()
        var lastActive = MonotonicInstant(nanoseconds: 0)
        var inUse = false
    }

    private let loop: EventLoop
    private let targetSide: (TableKind) -> TargetSide
    private let wouldLoop: (ForwardTarget, SocketAddress) -> Bool
    public let limits: UDPRelayLimits
    private var flows: [Flow] = []
    private var freeSlots: [UInt32] = []
    private var index: [FlowKey: UInt32] = [:]
    private let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 65_536, alignment: 16)
    private var expiryTimer: EventLoop.TimerID?
    public private(set) var counters = Counters()

    /// Flows open now.
    public var flowCount: Int { index.count }

    /// Makes a relay; see `TCPRelay.init` for `targetSide` and `wouldLoop`.
    public init(
        loop: EventLoop, targetSide: @escaping (TableKind) -> TargetSide, limits: UDPRelayLimits = UDPRelayLimits(),
        wouldLoop: @escaping (ForwardTarget, SocketAddress) -> Bool = { _, _ in false }
    ) {
        self.loop = loop
        self.targetSide = targetSide
        self.limits = limits
        self.wouldLoop = wouldLoop
        loop.setHandler(self, for: EngineEventKind.udpFlow)
        expiryTimer = loop.every(milliseconds: limits.expiryCheckMilliseconds) { [unowned self] in self.expireIdleFlows() }
    }

    deinit {
        closeAll()
        if let expiryTimer { loop.cancelTimer(expiryTimer) }
        buffer.deallocate()
    }

    /// Closes every flow.
    public func closeAll() {
        for i in flows.indices where flows[i].inUse { closeFlow(UInt32(i)) }
    }

    // MARK: Client → target

    /// Relays the datagrams waiting on `listener` to their flows, creating flows as needed.
    public func listenerReadable(fd listener: Int32, target: ForwardTarget) {
        let now = MonotonicInstant.now
        for _ in 0..<limits.batch {
            var client = SocketAddress()
            let n = client.withMutableSockaddr { sa, len in
                recvfrom(listener, buffer.baseAddress, buffer.count, Int32(MSG_DONTWAIT), sa, len)
            }
            if n < 0 {
                if errno == EAGAIN || errno == EINTR { return }
                counters.droppedErrors += 1  // e.g. ECONNREFUSED queued on the socket
                continue
            }
            counters.datagramsIn += 1
            guard let slot = flow(for: FlowKey(listener: listener, client: client), target: target, now: now) else { continue }
            flows[Int(slot)].lastActive = now
            if send(flows[Int(slot)].socket, buffer.baseAddress, n, Int32(MSG_DONTWAIT) | Int32(MSG_NOSIGNAL)) >= 0 {
                counters.datagramsOut += 1
            } else {
                counters.droppedErrors += 1
            }
        }
    }

    /// The slot of the flow for `key`, created if needed; nil when the datagram is dropped.
    private func flow(for key: FlowKey, target: ForwardTarget, now: MonotonicInstant) -> UInt32? {
        if let slot = index[key] { return slot }
        guard index.count < limits.maxFlows else {
            counters.droppedFlowLimit += 1
            return nil
        }
        let family: AddressFamily = key.client.endpoint?.address.family ?? .ipv4
        let destination = target.destination(peerFamily: family)
        if wouldLoop(target, destination) {
            counters.droppedLoop += 1
            return nil
        }
        let fd: Int32
        switch targetSide(target.table).socket(domain: destination.family, type: Int32(SOCK_DGRAM.rawValue)) {
        case .success(let s): fd = s
        case .failure:
            counters.droppedErrors += 1
            return nil
        }
        guard destination.withSockaddr({ sa, len in Glibc.connect(fd, sa, len) }) == 0 else {
            Sys.close(fd)
            counters.droppedErrors += 1
            return nil
        }
        let slot: UInt32
        if let free = freeSlots.popLast() {
            slot = free
        } else {
            flows.append(Flow())
            slot = UInt32(flows.count - 1)
        }
        flows[Int(slot)] = Flow(socket: fd, listener: key.listener, client: key.client, lastActive: now, inUse: true)
        do {
            try loop.add(fd: fd, events: EventLoop.Events.readable, kind: EngineEventKind.udpFlow, index: slot)
        } catch {
            preconditionFailure("cannot watch flow socket \(fd): \(error)")
        }
        index[key] = slot
        counters.flowsCreated += 1
        return slot
    }

    // MARK: Target → client

    /// A flow socket is readable: its replies go back to the client through the listener.
    public func handleEvent(_ events: UInt32, index slot: UInt32, fd: Int32) {
        let i = Int(slot)
        guard i < flows.count, flows[i].inUse, flows[i].socket == fd else { return }
        var replied = false
        for _ in 0..<limits.batch {
            let n = recv(fd, buffer.baseAddress, buffer.count, Int32(MSG_DONTWAIT))
            if n < 0 {
                if errno == EAGAIN || errno == EINTR { break }
                counters.droppedErrors += 1  // ECONNREFUSED: the target is not listening
                continue
            }
            counters.repliesIn += 1
            replied = true
            let sent = flows[i].client.withSockaddr { sa, len in
                sendto(flows[i].listener, buffer.baseAddress, n, Int32(MSG_DONTWAIT) | Int32(MSG_NOSIGNAL), sa, len)
            }
            if sent >= 0 { counters.repliesOut += 1 } else { counters.droppedErrors += 1 }
        }
        if replied { flows[i].lastActive = MonotonicInstant.now }
    }

    // MARK: Ending flows

    /// Closes the flows of a listener that is about to be closed.
    public func listenerClosing(fd listener: Int32) {
        for i in flows.indices where flows[i].inUse && flows[i].listener == listener { closeFlow(UInt32(i)) }
    }

    /// Closes the flows idle for longer than the timeout.
    func expireIdleFlows() {
        let now = MonotonicInstant.now
        let limit = UInt64(limits.idleTimeoutMilliseconds) * 1_000_000
        for i in flows.indices where flows[i].inUse && now.nanoseconds &- flows[i].lastActive.nanoseconds >= limit {
            closeFlow(UInt32(i))
            counters.flowsExpired += 1
        }
    }

    private func closeFlow(_ slot: UInt32) {
        let i = Int(slot)
        index[FlowKey(listener: flows[i].listener, client: flows[i].client)] = nil
        Sys.close(flows[i].socket)  // also leaves epoll
        flows[i] = Flow()
        freeSlots.append(slot)
    }
}

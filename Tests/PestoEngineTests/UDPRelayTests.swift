// SPDX-License-Identifier: GPL-2.0-or-later

// The UDP relay on real loopback sockets: flows, replies, expiry, limits, loops, IPv6, cleanup.
//
// Every test builds a `UDPHarness`: its own event loop, a relay, UDP "listeners" that the
// harness registers under `udpListener` and hands to the relay as the engine does, an echo
// "target" serviced in the same loop, and client sockets whose replies the loop collects.
// `run(until:)` turns the loop until a condition holds (checked after every test-side event
// and every few milliseconds, for what happens inside the relay); its timeout only records a
// failure. Descriptors are identified by inode, so a number reused by a test running in
// parallel is never mistaken for a socket the relay failed to close.

import CPestoSys
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoEngine
@testable import PestoModel

#if canImport(Glibc)
    import Glibc
#endif

/// Passes a source's readiness to a closure.
final class ClosureHandler: EventHandler {
    let action: (Int32) -> Void
    init(_ action: @escaping (Int32) -> Void) { self.action = action }
    func handleEvent(_ events: UInt32, index: UInt32, fd: Int32) { action(fd) }
}

/// Ignores everything; installed at shutdown so the loop lets go of the relay and the harness.
final class NullHandler: EventHandler {
    func handleEvent(_ events: UInt32, index: UInt32, fd: Int32) {}
}

/// One event loop with a UDP relay, listeners, an echo target and clients, all on loopback.
/// It is the relay's context: it records the loop checks and answers them with `refuseAsLoop`.
final class UDPHarness: RelayContext {
    static let echoKind = EventLoop.Kind(EngineEventKind.firstForTests + 4)
    static let clientKind = EventLoop.Kind(EngineEventKind.firstForTests + 5)

    let loop: EventLoop
    private(set) var relay: UDPRelay!
    let listenPort: UInt16
    let targetPort: UInt16
    /// Where listeners forward (nil: the loopback address of the client's family).
    let targetAddress: IPAddress?
    /// The listeners and the target each forwards to.
    private(set) var listeners: [Int32: ForwardTarget] = [:]
    /// Calls of `listenerReadable`.
    private(set) var listenerCalls = 0
    /// The echo targets started (all at `targetPort`).
    private(set) var echoes: [Int32] = []
    /// The source address of every datagram the echo target received.
    private(set) var echoSources: [SocketAddress] = []
    /// The clients made so far.
    private(set) var clients: [Int32] = []
    /// Every datagram each client received, with its source.
    private(set) var replies: [Int32: [(payload: [UInt8], from: SocketAddress)]] = [:]
    /// What `refusesLoop` was asked.
    private(set) var loopChecks: [(target: ForwardTarget, destination: SocketAddress)] = []
    /// The answer to every loop check.
    private let refuseAsLoop: Bool
    private var buffer = [UInt8](repeating: 0, count: 65_536)
    private var stopCondition: (() -> Bool)?
    /// Where every socket of the test is made (nil: this thread's namespace).
    let namespace: NetworkNamespace?

    /// Makes the loop and the relay; ports are fresh for this test. With `namespace`, every
    /// socket (listeners, target, clients, the relay's flows) is made inside it.
    init(
        limits: UDPRelayLimits = UDPRelayLimits(), targetAddress: IPAddress? = nil, refuseAsLoop: Bool = false,
        namespace: NetworkNamespace? = nil
    ) throws {
        loop = try EventLoop()
        let ports = TestSockets.freePorts(2)
        listenPort = ports.lowerBound
        targetPort = ports.upperBound
        self.targetAddress = targetAddress
        self.namespace = namespace
        self.refuseAsLoop = refuseAsLoop
        relay = UDPRelay(loop: loop, sides: TargetSides(TargetSide(namespace: namespace)), context: self, limits: limits)
        loop.setHandler(ClosureHandler { [unowned self] fd in self.listenerReadable(fd) }, for: EngineEventKind.udpListener)
        loop.setHandler(ClosureHandler { [unowned self] fd in self.echoReadable(fd) }, for: Self.echoKind)
        loop.setHandler(ClosureHandler { [unowned self] fd in self.clientReadable(fd) }, for: Self.clientKind)
    }

    /// Closes everything the test made and makes the loop drop its handlers, so the relay is
    /// freed (its deinit runs) along with the loop.
    func shutdown() {
        relay?.closeAll()
        for fd in Array(listeners.keys) { closeListener(fd) }
        for fd in clients + echoes { close(fd) }
        for kind in [EngineEventKind.udpListener, EngineEventKind.udpFlow, Self.echoKind, Self.clientKind] {
            loop.setHandler(NullHandler(), for: kind)
        }
        relay = nil
    }

    // MARK: RelayContext

    func refusesLoop(_ target: ForwardTarget, to destination: SocketAddress) -> Bool {
        loopChecks.append((target, destination))
        return refuseAsLoop
    }

    /// The harness's listeners are never shared.
    func firstMatchTarget(listener: Int32, localAddress: () -> IPAddress?) -> ForwardTarget? { nil }

    func relayCapacityAvailable() {}

    /// Lets go of the relay (the loop must have let go already).
    func dropRelay() { relay = nil }

    // MARK: Sockets

    /// A UDP socket bound to `address:port` (IPv6 sockets are IPv6-only unless `dualStack`).
    func udpSocket(_ address: IPAddress, port: UInt16, dualStack: Bool = false, device: String? = nil) throws -> Int32 {
        let make = { socket(address.family.socketDomain, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
        let fd = namespace.map { $0.perform(make) } ?? make()
        try #require(fd >= 0, "socket: \(Errno.current)")
        if address.family == .ipv6 {
            var v6only: Int32 = dualStack ? 0 : 1
            setsockopt(fd, Int32(IPPROTO_IPV6), IPV6_V6ONLY, &v6only, socklen_t(MemoryLayout<Int32>.size))
        }
        if let device {
            if case .failure(let e) = Sys.bindToDevice(fd, interface: device) {
                close(fd)
                try #require(Bool(false), "SO_BINDTODEVICE \(device): \(e)")
            }
        }
        let bound = SocketAddress(address, port: port).withSockaddr { sa, len in bind(fd, sa, len) }
        if bound != 0 {
            let e = Errno.current
            close(fd)
            try #require(bound == 0, "bind \(address) port \(port): \(e)")
        }
        return fd
    }

    /// A listener on `address:port` (default: the harness's listen port) forwarding to the
    /// target; with `packetInfo` (as the engine's listener factory makes them) it reports each
    /// datagram's local address; with `device`, it is bound to that interface.
    @discardableResult
    func addListener(
        _ address: IPAddress = .loopbackIPv4, port: UInt16? = nil, dualStack: Bool = false, packetInfo: Bool = true,
        device: String? = nil
    ) throws -> Int32 {
        let port = port ?? listenPort
        let fd = try udpSocket(address, port: port, dualStack: dualStack, device: device)
        if packetInfo {
            if case .failure(let e) = Sys.receivePacketInfo(fd, domain: address.family.socketDomain) {
                closeListener(fd)
                try #require(Bool(false), "IP_PKTINFO: \(e)")
            }
        }
        listeners[fd] = ForwardTarget(table: .host, ruleID: UInt32(port), proto: .udp, address: targetAddress, port: targetPort)
        try loop.add(fd: fd, events: EventLoop.Events.readable, kind: EngineEventKind.udpListener)
        return fd
    }

    /// Closes a listener the way the engine does: the relay hears of it first.
    func closeListener(_ fd: Int32) {
        relay?.listenerClosing(fd: fd)
        listeners[fd] = nil
        close(fd)
    }

    /// Starts an echo target on `address:targetPort`.
    func startEcho(_ address: IPAddress = .loopbackIPv4) throws {
        let fd = try udpSocket(address, port: targetPort)
        echoes.append(fd)
        try loop.add(fd: fd, events: EventLoop.Events.readable, kind: Self.echoKind)
    }

    /// A client socket on an ephemeral port of `address`, its replies collected by the loop.
    func client(_ address: IPAddress = .loopbackIPv4) throws -> Int32 {
        let fd = try udpSocket(address, port: 0)
        try loop.add(fd: fd, events: EventLoop.Events.readable, kind: Self.clientKind)
        clients.append(fd)
        replies[fd] = []
        return fd
    }

    /// Sends `payload` from `client` to `address:port` (default: 127.0.0.1 and the listen port).
    func send(
        _ payload: [UInt8], from client: Int32, to address: IPAddress = .loopbackIPv4, port: UInt16? = nil,
        sourceLocation: SourceLocation = #_sourceLocation
    ) {
        let destination = SocketAddress(address, port: port ?? listenPort)
        let sent = payload.withUnsafeBytes { raw in
            destination.withSockaddr { sa, len in sendto(client, raw.baseAddress, raw.count, 0, sa, len) }
        }
        #expect(sent == payload.count, "sendto: \(Errno.current)", sourceLocation: sourceLocation)
    }

    /// A client on an ephemeral port of `address`, connect()ed to `destination` at the listen
    /// port, as DNS resolvers, QUIC and WireGuard make theirs: the kernel drops every reply
    /// that does not come from exactly that address and port.
    func connectedClient(_ address: IPAddress, to destination: IPAddress) throws -> Int32 {
        let fd = try client(address)
        let r = SocketAddress(destination, port: listenPort).withSockaddr { sa, len in connect(fd, sa, len) }
        try #require(r == 0, "connect to \(destination): \(Errno.current)")
        return fd
    }

    /// Sends `payload` with send(2) on a connected client.
    func sendConnected(_ payload: [UInt8], from client: Int32, sourceLocation: SourceLocation = #_sourceLocation) {
        let sent = payload.withUnsafeBytes { raw in Glibc.send(client, raw.baseAddress, raw.count, 0) }
        #expect(sent == payload.count, "send: \(Errno.current)", sourceLocation: sourceLocation)
    }

    // MARK: Running

    /// Runs the loop until `condition` holds; false (and a recorded failure) after the timeout.
    @discardableResult
    func run(
        _ what: String, timeoutMilliseconds: Int = 5000, sourceLocation: SourceLocation = #_sourceLocation,
        until condition: @escaping () -> Bool
    ) -> Bool {
        if condition() { return true }
        var timedOut = false
        stopCondition = condition
        let loop = self.loop
        let poll = loop.every(milliseconds: 5) { if condition() { loop.stop() } }
        let timeout = loop.after(milliseconds: timeoutMilliseconds) {
            timedOut = true
            loop.stop()
        }
        loop.run()
        loop.cancelTimer(poll)
        loop.cancelTimer(timeout)
        stopCondition = nil
        if timedOut { Issue.record("timed out after \(timeoutMilliseconds) ms waiting for \(what)", sourceLocation: sourceLocation) }
        return !timedOut
    }

    private func checkStop() {
        if let stopCondition, stopCondition() { loop.stop() }
    }

    // MARK: Handlers

    private func listenerReadable(_ fd: Int32) {
        guard let target = listeners[fd] else { return }
        listenerCalls += 1
        relay.listenerReadable(fd: fd, target: target)
        checkStop()
    }

    private func echoReadable(_ fd: Int32) {
        while true {
            var from = SocketAddress()
            let n = buffer.withUnsafeMutableBytes { raw in
                from.withMutableSockaddr { sa, len in recvfrom(fd, raw.baseAddress, raw.count, Int32(MSG_DONTWAIT), sa, len) }
            }
            if n < 0 { break }
            echoSources.append(from)
            _ = buffer.withUnsafeBytes { raw in
                from.withSockaddr { sa, len in sendto(fd, raw.baseAddress, n, 0, sa, len) }
            }
        }
        checkStop()
    }

    private func clientReadable(_ fd: Int32) {
        while true {
            var from = SocketAddress()
            let n = buffer.withUnsafeMutableBytes { raw in
                from.withMutableSockaddr { sa, len in recvfrom(fd, raw.baseAddress, raw.count, Int32(MSG_DONTWAIT), sa, len) }
            }
            if n < 0 { break }
            replies[fd, default: []].append((Array(buffer[0..<n]), from))
        }
        checkStop()
    }

    // MARK: Looking at the relay

    /// The open flow sockets with their inodes.
    func flowSockets() -> [(fd: Int32, inode: UInt64)] {
        relay.openFlows.map { ($0.socket, TestSockets.inode($0.socket) ?? 0) }
    }

    /// The payloads `client` received.
    func payloads(_ client: Int32) -> [[UInt8]] { replies[client, default: []].map(\.payload) }
}

/// True when `fd` is still the socket whose inode was `inode`.
private func stillOpen(_ socket: (fd: Int32, inode: UInt64)) -> Bool {
    TestSockets.inode(socket.fd) == socket.inode
}

/// `count` bytes of a repeatable pattern that differs per `seed`.
private func pattern(_ count: Int, seed: UInt8 = 0) -> [UInt8] {
    (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ $0 >> 8 &+ Int(seed)) }
}

@Suite("UDP relay", .timeLimit(.minutes(10)))
struct UDPRelayTests {
    // MARK: Relaying

    @Test("request and reply cross the relay byte for byte: empty, small and 60,000-byte datagrams")
    func echo() throws {
        let h = try UDPHarness()
        defer { h.shutdown() }
        let listener = try h.addListener()
        try h.startEcho()
        let client = try h.client()
        let sent = [[], Array("hello".utf8), pattern(60_000)]
        for payload in sent { h.send(payload, from: client) }
        h.run("three replies") { h.payloads(client).count == 3 }

        #expect(h.payloads(client).sorted { $0.count < $1.count } == sent)
        // Replies come from the address and port the client wrote to.
        #expect(h.replies[client]?.allSatisfy { $0.from == SocketAddress(.loopbackIPv4, port: h.listenPort) } == true)
        #expect(h.relay.flowCount == 1)
        let c = h.relay.counters
        #expect((c.datagramsIn, c.datagramsOut, c.repliesIn, c.repliesOut) == (3, 3, 3, 3))
        #expect((c.flowsCreated, c.droppedErrors, c.droppedFlowLimit, c.droppedLoop) == (1, 0, 0, 0))
        // The target saw one source, the flow's own socket: not the client, not the listener.
        let sources = Set(h.echoSources)
        #expect(sources.count == 1)
        #expect(h.relay.flowSocket(listener: listener, client: localAddress(client)).map(localAddress) == sources.first)
        // The relay asked about loops once, for the flow, with the destination it used.
        #expect(h.loopChecks.count == 1)
        #expect(h.loopChecks.first?.destination == SocketAddress(.loopbackIPv4, port: h.targetPort))
        #expect(h.loopChecks.first?.target == h.listeners[listener])
    }

    @Test("two clients get a flow each and only their own replies")
    func separateFlows() throws {
        let h = try UDPHarness()
        defer { h.shutdown() }
        try h.addListener()
        try h.startEcho()
        let a = try h.client()
        let b = try h.client()
        h.send(Array("from a".utf8), from: a)
        h.send(Array("from b".utf8), from: b)
        h.send(Array("again a".utf8), from: a)
        h.run("three replies") { h.payloads(a).count == 2 && h.payloads(b).count == 1 }

        #expect(h.payloads(a).map { String(decoding: $0, as: UTF8.self) }.sorted() == ["again a", "from a"])
        #expect(h.payloads(b).map { String(decoding: $0, as: UTF8.self) } == ["from b"])
        #expect(h.relay.flowCount == 2)
        #expect(h.relay.counters.flowsCreated == 2)
        #expect(Set(h.echoSources).count == 2, "each flow has its own socket towards the target")
        #expect(Set(h.flowSockets().map(\.fd)).count == 2)
    }

    @Test("a burst larger than one batch is relayed completely, over several listener wake-ups")
    func burst() throws {
        let h = try UDPHarness()
        defer { h.shutdown() }
        try h.addListener()
        try h.startEcho()
        let client = try h.client()
        let count = UDPRelay.batch + 36
        for i in 0..<count { h.send(pattern(32, seed: UInt8(i)), from: client) }
        h.run("\(count) replies") { h.payloads(client).count == count }

        #expect(Set(h.payloads(client)) == Set((0..<count).map { pattern(32, seed: UInt8($0)) }))
        #expect(h.listenerCalls >= 2, "one wake-up takes at most \(UDPRelay.batch) datagrams")
        #expect(h.relay.flowCount == 1)
        #expect(h.relay.counters.datagramsIn == UInt64(count))
        #expect(h.relay.counters.repliesOut == UInt64(count))
    }

    // MARK: Expiry

    @Test("traffic keeps a flow alive; once idle past the timeout it is closed, and a new one opens in a reused slot")
    func expiry() throws {
        var limits = UDPRelayLimits()
        limits.idleTimeoutMilliseconds = 300
        limits.expiryCheckMilliseconds = 10
        let h = try UDPHarness(limits: limits)
        defer { h.shutdown() }
        let listener = try h.addListener()
        try h.startEcho()
        let client = try h.client()
        #expect(!h.relay.expiryArmed, "no flows, no timer")
        h.send([1], from: client)
        h.run("the first reply") { h.payloads(client).count == 1 }
        let first = try #require(h.flowSockets().first)
        let firstSlot = try #require(h.relay.openFlows.first?.slot)
        #expect(h.relay.expiryArmed)

        // A datagram every 50 ms for 450 ms: never idle for 300 ms.
        var sent = 1
        let keepAlive = h.loop.every(milliseconds: 50) {
            if sent < 10 {
                h.send([UInt8(sent)], from: client)
                sent += 1
            }
        }
        h.run("ten replies") { h.payloads(client).count == 10 }
        h.loop.cancelTimer(keepAlive)
        #expect(h.relay.counters.flowsExpired == 0)
        #expect(h.relay.flowCount == 1)
        #expect(stillOpen(first), "the same flow socket carried all of it")

        // Now silence: the flow expires.
        let lastReply = MonotonicInstant.now
        h.run("the flow to expire") { h.relay.flowCount == 0 }
        let idle = (MonotonicInstant.now.nanoseconds - lastReply.nanoseconds) / 1_000_000
        #expect(idle >= 290, "expired after \(idle) ms of silence; the timeout is 300 ms")
        #expect(h.relay.counters.flowsExpired == 1)
        #expect(!stillOpen(first), "the expired flow's socket is closed")
        #expect(h.relay.flowSocket(listener: listener, client: localAddress(client)) == nil)
        #expect(!h.relay.expiryArmed, "the timer is disarmed with the last flow")

        // The client comes back: a fresh flow in the freed slot.
        h.send([99], from: client)
        h.run("the reply after expiry") { h.payloads(client).count == 11 }
        #expect(h.payloads(client).last == [99])
        #expect(h.relay.counters.flowsCreated == 2)
        #expect(h.relay.openFlows.map(\.slot) == [firstSlot])
    }

    // MARK: Limits and refusals

    @Test("at maxFlows a new client's datagrams are dropped and counted; existing flows carry on")
    func flowLimit() throws {
        var limits = UDPRelayLimits()
        limits.maxFlows = 1
        let h = try UDPHarness(limits: limits)
        defer { h.shutdown() }
        try h.addListener()
        try h.startEcho()
        let a = try h.client()
        let b = try h.client()
        h.send(Array("a1".utf8), from: a)
        h.run("a's first reply") { h.payloads(a).count == 1 }
        h.send(Array("b1".utf8), from: b)
        h.send(Array("b2".utf8), from: b)
        h.run("b's datagrams to be dropped") { h.relay.counters.droppedFlowLimit == 2 }
        h.send(Array("a2".utf8), from: a)
        h.run("a's second reply") { h.payloads(a).count == 2 }

        #expect(h.payloads(b).isEmpty)
        #expect(h.relay.flowCount == 1)
        let c = h.relay.counters
        #expect((c.datagramsIn, c.datagramsOut, c.flowsCreated, c.droppedFlowLimit) == (4, 2, 1, 2))
        #expect(h.echoSources.count == 2, "only a's datagrams reached the target")
    }

    @Test("a destination that would loop through pestod is dropped, counted, and gets no socket")
    func loopRefused() throws {
        let h = try UDPHarness(refuseAsLoop: true)
        defer { h.shutdown() }
        let listener = try h.addListener()
        try h.startEcho()
        let client = try h.client()
        h.send([1], from: client)
        h.send([2], from: client)
        h.run("both datagrams to be refused") { h.relay.counters.droppedLoop == 2 }

        #expect(h.relay.flowCount == 0)
        #expect(h.relay.counters.flowsCreated == 0)
        #expect(h.relay.counters.datagramsOut == 0)
        #expect(h.loopChecks.count == 2)
        #expect(h.loopChecks.allSatisfy { $0.destination == SocketAddress(.loopbackIPv4, port: h.targetPort) })
        #expect(h.loopChecks.allSatisfy { $0.target == h.listeners[listener] })
        #expect(!h.relay.expiryArmed)
    }

    @Test("a target that refuses (ICMP port unreachable) costs datagrams, not the flow")
    func targetRefuses() throws {
        let h = try UDPHarness()
        defer { h.shutdown() }
        try h.addListener()
        let client = try h.client()
        // Nothing listens on the target port yet.
        h.send([1], from: client)
        h.send([2], from: client)
        h.run("the refusal to be reported") { h.relay.counters.droppedErrors >= 1 }
        let flow = try #require(h.flowSockets().first)
        #expect(h.relay.counters.datagramsOut == 2, "a refusal reported by send() does not cost the datagram being sent")

        try h.startEcho()
        h.send([3], from: client)
        h.run("the reply once the target is up") { h.payloads(client).count == 1 }
        #expect(h.payloads(client) == [[3]])
        #expect(h.relay.flowCount == 1)
        #expect(stillOpen(flow), "the same flow carried on")
    }

    // MARK: IPv6

    @Test("IPv6: a client on ::1 is relayed to the target's ::1")
    func ipv6() throws {
        let h = try UDPHarness()
        defer { h.shutdown() }
        try h.addListener(.loopbackIPv6)
        try h.startEcho(.loopbackIPv6)
        let client = try h.client(.loopbackIPv6)
        let payload = pattern(50_000, seed: 6)
        h.send(payload, from: client, to: .loopbackIPv6)
        h.run("the IPv6 reply") { h.payloads(client).count == 1 }

        #expect(h.payloads(client) == [payload])
        #expect(h.replies[client]?.first?.from == SocketAddress(.loopbackIPv6, port: h.listenPort))
        #expect(h.flowSockets().map { TestSockets.domain($0.fd) } == [AF_INET6])
        #expect(h.loopChecks.first?.destination == SocketAddress(.loopbackIPv6, port: h.targetPort))
    }

    @Test("dual stack: an IPv4 client of a :: listener arrives IPv4-mapped and is relayed over IPv4")
    func dualStack() throws {
        let h = try UDPHarness()
        defer { h.shutdown() }
        try h.addListener(.anyIPv6, dualStack: true)
        try h.startEcho(.loopbackIPv4)
        let v4 = try h.client(.loopbackIPv4)
        let v6 = try h.client(.loopbackIPv6)
        try h.startEcho(.loopbackIPv6)
        h.send(Array("v4".utf8), from: v4, to: .loopbackIPv4)
        h.send(Array("v6".utf8), from: v6, to: .loopbackIPv6)
        h.run("both replies") { h.payloads(v4).count == 1 && h.payloads(v6).count == 1 }

        #expect(h.payloads(v4) == [Array("v4".utf8)])
        #expect(h.payloads(v6) == [Array("v6".utf8)])
        #expect(h.replies[v4]?.first?.from == SocketAddress(.loopbackIPv4, port: h.listenPort))
        #expect(h.replies[v6]?.first?.from == SocketAddress(.loopbackIPv6, port: h.listenPort))
        #expect(Set(h.flowSockets().compactMap { TestSockets.domain($0.fd) }) == [AF_INET, AF_INET6])
        #expect(
            Set(h.loopChecks.map(\.destination)) == [
                SocketAddress(.loopbackIPv4, port: h.targetPort), SocketAddress(.loopbackIPv6, port: h.targetPort),
            ])
    }

    // MARK: Closing

    @Test("listenerClosing closes that listener's flows and no other's")
    func listenerClosing() throws {
        let h = try UDPHarness()
        defer { h.shutdown() }
        let ports = TestSockets.freePorts(1)
        let first = try h.addListener()
        let second = try h.addListener(port: ports.lowerBound)
        try h.startEcho()
        let client = try h.client()
        h.send([1], from: client)
        h.send([2], from: client, port: ports.lowerBound)
        h.run("both replies") { h.payloads(client).count == 2 }
        let address = localAddress(client)
        let doomed = try #require(h.relay.flowSocket(listener: first, client: address))
        let doomedFlow = (fd: doomed, inode: try #require(TestSockets.inode(doomed)))
        let survivor = try #require(h.relay.flowSocket(listener: second, client: address))
        let survivorFlow = (fd: survivor, inode: try #require(TestSockets.inode(survivor)))

        h.closeListener(first)
        #expect(h.relay.flowCount == 1)
        #expect(!stillOpen(doomedFlow))
        #expect(stillOpen(survivorFlow))
        #expect(h.relay.counters.flowsExpired == 0, "closed, not expired")

        h.send([3], from: client, port: ports.lowerBound)
        h.run("the other listener's reply") { h.payloads(client).count == 3 }
        #expect(h.payloads(client).last == [3])
    }

    @Test("closeAll closes every flow socket; slots are reused afterwards")
    func closeAll() throws {
        let h = try UDPHarness()
        defer { h.shutdown() }
        try h.addListener()
        try h.startEcho()
        let clients = try (0..<3).map { _ in try h.client() }
        for (i, c) in clients.enumerated() { h.send([UInt8(i)], from: c) }
        h.run("three replies") { clients.allSatisfy { h.payloads($0).count == 1 } }
        let flows = h.flowSockets()
        #expect(flows.count == 3)
        #expect(flows.allSatisfy(stillOpen))

        h.relay.closeAll()
        #expect(h.relay.flowCount == 0)
        #expect(!flows.contains(where: stillOpen), "every flow socket is closed")
        #expect(h.relay.openFlows.isEmpty)
        #expect(!h.relay.expiryArmed)

        h.send([7], from: clients[0])
        h.run("a reply on a new flow") { h.payloads(clients[0]).count == 2 }
        #expect(h.relay.openFlows.allSatisfy { (0..<3).contains($0.slot) }, "a freed slot is reused")
    }

    @Test("a relay that goes away closes its flows")
    func deinitCloses() throws {
        let h = try UDPHarness()
        try h.addListener()
        try h.startEcho()
        let client = try h.client()
        h.send([1], from: client)
        h.run("the reply") { h.payloads(client).count == 1 }
        let flow = try #require(h.flowSockets().first)
        weak let relay: UDPRelay? = h.relay
        // The loop holds its handlers: replacing the relay's lets it go.
        h.loop.setHandler(NullHandler(), for: EngineEventKind.udpFlow)
        h.dropRelay()
        #expect(relay == nil, "nothing else holds the relay")
        #expect(!stillOpen(flow))
        h.shutdown()
    }
}

/// The address `fd` is bound to.
private func localAddress(_ fd: Int32) -> SocketAddress {
    var address = SocketAddress()
    _ = address.withMutableSockaddr { sa, len in getsockname(fd, sa, len) }
    return address
}

/// The loopback interface's index (1 in every namespace).
private let loopbackIndex = Int32(if_nametoindex("lo"))

/// Replies leave from the exact address (and interface) the client's datagram arrived on.
@Suite("UDP relay: replies from the address asked", .timeLimit(.minutes(10)))
struct UDPPacketInfoTests {
    @Test("the engine's listener factory asks every UDP listener for packet info, IPv4, IPv6 and dual stack")
    func factorySetsPacketInfo() throws {
        let factory = KernelListenerFactory(families: [.ipv4, .ipv6])
        let port = TestSockets.freePorts(1).lowerBound
        for (address, level, name) in [
            (IPAddress?.some(.loopbackIPv4), Int32(IPPROTO_IP), IP_PKTINFO),
            (.some(.loopbackIPv6), Int32(IPPROTO_IPV6), IPV6_RECVPKTINFO),
            (nil, Int32(IPPROTO_IPV6), IPV6_RECVPKTINFO),
        ] {
            let fd = try factory.openListener(for: Rule(proto: .udp, address: address, firstPort: port), port: port).get()
            defer { factory.closeListener(fd) }
            var value: Int32 = 0
            var length = socklen_t(MemoryLayout<Int32>.size)
            #expect(getsockopt(fd, level, name, &value, &length) == 0)
            #expect(value == 1, "packet info on the listener of \(address.map(String.init(describing:)) ?? "*")")
        }
    }

    @Test("a connected client of 127.0.0.5 through a 0.0.0.0 listener gets its reply, from 127.0.0.5")
    func wildcardIPv4() throws {
        let h = try UDPHarness()
        defer { h.shutdown() }
        try h.addListener(.anyIPv4)
        try h.startEcho(.loopbackIPv4)
        let five = IPAddress.v4(0x7F00_0005)
        let six = IPAddress.v4(0x7F00_0006)
        let a = try h.connectedClient(.loopbackIPv4, to: five)
        let b = try h.connectedClient(.loopbackIPv4, to: six)
        h.sendConnected(Array("five".utf8), from: a)
        h.sendConnected(Array("six".utf8), from: b)
        h.run("both replies") { h.payloads(a).count == 1 && h.payloads(b).count == 1 }

        #expect(h.payloads(a) == [Array("five".utf8)])
        #expect(h.payloads(b) == [Array("six".utf8)])
        #expect(h.replies[a]?.first?.from == SocketAddress(five, port: h.listenPort))
        #expect(h.replies[b]?.first?.from == SocketAddress(six, port: h.listenPort))
        #expect(
            Set(h.relay.flowLocals) == [
                PacketInfo(address: five, interface: loopbackIndex), PacketInfo(address: six, interface: loopbackIndex),
            ])
    }

    @Test("one unconnected client writing to two addresses of a wildcard listener has two flows, each answered from its address")
    func oneClientTwoAddresses() throws {
        let h = try UDPHarness()
        defer { h.shutdown() }
        try h.addListener(.anyIPv4)
        try h.startEcho(.loopbackIPv4)
        let client = try h.client(.loopbackIPv4)
        h.send(Array("a".utf8), from: client, to: .v4(0x7F00_0007))
        h.run("the first reply") { h.payloads(client).count == 1 }
        h.send(Array("b".utf8), from: client, to: .v4(0x7F00_0008))
        h.run("the second reply") { h.payloads(client).count == 2 }

        #expect(
            h.replies[client]?.map(\.from) == [
                SocketAddress(.v4(0x7F00_0007), port: h.listenPort), SocketAddress(.v4(0x7F00_0008), port: h.listenPort),
            ])
        #expect(h.relay.flowCount == 2)
    }

    @Test(
        "64 clients × 4 datagrams queued before the loop turns: every one reaches the target, every reply its client, from the address it wrote to"
    )
    func manyClientsOneBatch() throws {
        let h = try UDPHarness()
        defer { h.shutdown() }
        let listener = try h.addListener(.anyIPv4)
        // Room for the whole burst in the listener's queue (SO_RCVBUFFORCE: the tests run as root).
        var size: Int32 = 4 << 20
        try #require(setsockopt(listener, SOL_SOCKET, SO_RCVBUFFORCE, &size, socklen_t(MemoryLayout<Int32>.size)) == 0, "\(Errno.current)")
        try h.startEcho(.loopbackIPv4)
        let clientCount = 64
        let perClient = 4
        let clients = try (0..<clientCount).map { _ in try h.client(.loopbackIPv4) }
        /// Client k writes to 127.0.0.(10 + k % 8), so one batch holds flows of several local addresses.
        func destination(_ k: Int) -> IPAddress { .v4(0x7F00_000A + UInt32(k % 8)) }
        func payload(_ k: Int, _ i: Int) -> [UInt8] { [UInt8(k), UInt8(i)] + pattern(30, seed: UInt8(k &* 4 &+ i)) }
        // Interleaved, as many clients' datagrams arrive: the listener's batches mix flows.
        for i in 0..<perClient {
            for (k, client) in clients.enumerated() { h.send(payload(k, i), from: client, to: destination(k)) }
        }
        let total = clientCount * perClient
        h.run("\(total) replies") { h.replies.values.reduce(0) { $0 + $1.count } == total }

        #expect(h.relay.counters.datagramsIn == UInt64(total))
        #expect(h.relay.counters.datagramsOut == UInt64(total))
        #expect(h.relay.counters.repliesOut == UInt64(total))
        #expect(h.relay.counters.droppedErrors == 0)
        #expect(h.relay.flowCount == clientCount)
        #expect(h.echoSources.count == total)
        #expect(Set(h.echoSources).count == clientCount, "one flow socket per client")
        for (k, client) in clients.enumerated() {
            #expect(Set(h.payloads(client)) == Set((0..<perClient).map { payload(k, $0) }), "client \(k) got its own replies")
            #expect(
                h.replies[client]?.allSatisfy { $0.from == SocketAddress(destination(k), port: h.listenPort) } == true,
                "client \(k)'s replies come from the address it wrote to")
        }
    }

    @Test("dual stack: an IPv4 client of 127.0.0.5 through a :: listener gets its reply from 127.0.0.5")
    func dualStackMapped() throws {
        let h = try UDPHarness()
        defer { h.shutdown() }
        try h.addListener(.anyIPv6, dualStack: true)
        try h.startEcho(.loopbackIPv4)
        let five = IPAddress.v4(0x7F00_0005)
        let client = try h.connectedClient(.loopbackIPv4, to: five)
        h.sendConnected(Array("mapped".utf8), from: client)
        h.run("the reply") { h.payloads(client).count == 1 }

        #expect(h.payloads(client) == [Array("mapped".utf8)])
        #expect(h.replies[client]?.first?.from == SocketAddress(five, port: h.listenPort))
        #expect(h.relay.flowLocals == [PacketInfo(address: five, interface: loopbackIndex)])
    }

    @Test("a listener bound to an interface (lo) answers a client of 127.0.0.9 from 127.0.0.9")
    func boundToInterface() throws {
        let h = try UDPHarness()
        defer { h.shutdown() }
        try h.addListener(.anyIPv4, device: "lo")
        try h.startEcho(.loopbackIPv4)
        let nine = IPAddress.v4(0x7F00_0009)
        let client = try h.connectedClient(.loopbackIPv4, to: nine)
        h.sendConnected(Array("lo".utf8), from: client)
        h.run("the reply") { h.payloads(client).count == 1 }

        #expect(h.replies[client]?.first?.from == SocketAddress(nine, port: h.listenPort))
        #expect(h.relay.flowLocals == [PacketInfo(address: nine, interface: loopbackIndex)])
    }

    @Test(
        "in a namespace: IPv4 and IPv6 addresses on lo and on a second interface are answered from themselves",
        .enabled(if: getuid() == 0, "needs root to create a network namespace (ip netns add)")
    )
    func namespaceAddresses() throws {
        let testNamespace = try TestNamespace()  // its lo is up; removed when released
        for command in [
            ["addr", "add", "fd00:5::5/128", "dev", "lo"],
            // A second interface (veth: this kernel may lack the dummy module), down-to-earth
            // addresses on it as on a multi-homed host's LAN side.
            ["link", "add", "pesto0", "type", "veth", "peer", "name", "pesto1"],
            ["link", "set", "pesto0", "up"],
            ["link", "set", "pesto1", "up"],  // carrier on pesto0, so its IPv6 address is usable at once
            ["addr", "add", "10.77.0.5/24", "dev", "pesto0"],
            ["addr", "add", "fd00:77::5/64", "dev", "pesto0", "nodad"],
        ] {
            let result = try run("/usr/sbin/ip", ["-n", testNamespace.name] + command)
            try #require(result.status == 0, "ip \(command): \(result.err)")
        }
        try testNamespace.waitForLocalRoute("fd00:77::5")  // pesto0's carrier comes up asynchronously
        let ns = testNamespace.namespace
        let h = try UDPHarness(namespace: ns)
        defer { h.shutdown() }
        try h.addListener(.anyIPv4)
        try h.addListener(.anyIPv6)
        try h.startEcho(.loopbackIPv4)
        try h.startEcho(.loopbackIPv6)

        let onLo6 = try #require(IPAddress("fd00:5::5"))
        let onDummy4 = IPAddress.v4(0x0A4D_0005)
        let onDummy6 = try #require(IPAddress("fd00:77::5"))
        let cases: [(client: Int32, local: IPAddress)] = [
            (try h.connectedClient(.loopbackIPv6, to: onLo6), onLo6),
            (try h.connectedClient(.loopbackIPv4, to: onDummy4), onDummy4),
            (try h.connectedClient(.loopbackIPv6, to: onDummy6), onDummy6),
        ]
        for (client, _) in cases { h.sendConnected(Array("ns".utf8), from: client) }
        h.run("every reply") { cases.allSatisfy { h.payloads($0.client).count == 1 } }

        for (client, local) in cases {
            #expect(h.replies[client]?.first?.from == SocketAddress(local, port: h.listenPort), "reply to a client of \(local)")
        }
        #expect(Set(h.relay.flowLocals.compactMap(\.address)) == [onLo6, onDummy4, onDummy6])
    }
}

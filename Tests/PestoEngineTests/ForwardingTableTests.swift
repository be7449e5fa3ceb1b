// SPDX-License-Identifier: GPL-2.0-or-later

// ForwardingTable operations with real sockets on loopback: each success and every error path.

import CPestoSys
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoEngine
@testable import PestoModel

#if canImport(Glibc)
    import Glibc
#endif

/// Everything observable about a table, to prove that a failing call changed nothing.
struct TableSnapshot: Equatable {
    var rows: [String]
    var reserved: Int
    var open: Int
    var active: Int

    init(_ table: ForwardingTable) {
        rows = table.list().map { id, rule, status in
            let fds = (try? table.listeners(of: id)) ?? []
            let sockets = fds.map { "\($0.port)=\($0.fd)@\(TestSockets.inode($0.fd) ?? 0)" }.joined(separator: ",")
            return "\(id) \(rule) \(status) [\(sockets)]"
        }
        reserved = table.reservedSockets
        open = table.openSockets
        active = table.activeCount
    }
}

/// Expects `body` to throw a `PestoError` with `code` whose message contains `fragment`, and
/// the table to be exactly as before.
func expectRejected(
    _ table: ForwardingTable, _ code: PestoError.Code, _ fragment: String = "",
    sourceLocation: SourceLocation = #_sourceLocation, _ body: () throws(PestoError) -> Void
) {
    let before = TableSnapshot(table)
    do {
        try body()
        Issue.record("expected \(code), got success", sourceLocation: sourceLocation)
    } catch {
        #expect(error.code == code, sourceLocation: sourceLocation)
        #expect(fragment.isEmpty || error.message.contains(fragment), "\(error.message)", sourceLocation: sourceLocation)
    }
    #expect(TableSnapshot(table) == before, "a failing call changed the table", sourceLocation: sourceLocation)
}

@Suite("Forwarding table", .timeLimit(.minutes(10)))
struct ForwardingTableTests {
    static let caps: Capabilities = [.ipv4, .ipv6, .tcp, .udp, .ifname]

    func makeTable(limits: TableLimits = .default, factory: (any ListenerFactory)? = nil) -> ForwardingTable {
        ForwardingTable(
            kind: .host, capabilities: Self.caps, limits: limits, factory: factory ?? KernelListenerFactory(families: [.ipv4, .ipv6]))
    }

    func tcp(_ ports: ClosedRange<UInt16>, _ address: String? = "127.0.0.1") -> Rule {
        Rule(proto: .tcp, address: address.map { IPAddress($0)! }, firstPort: ports.lowerBound, lastPort: ports.upperBound)
    }

    @Test("insert keeps rules inactive and in ID order; read, readIndex, list")
    func insertAndRead() throws {
        let t = makeTable()
        let rules = [(30, tcp(1000...1000)), (10, tcp(2000...2010)), (20, tcp(3000...3000))]
        for (id, rule) in rules { try t.insert(id: UInt32(id), rule: rule) }
        #expect(t.ids == [10, 20, 30])
        #expect(t.ruleCount == 3 && t.activeCount == 0 && t.openSockets == 0)
        #expect(t.reservedSockets == 13)
        #expect(try t.read(10) == tcp(2000...2010))
        #expect(try t.status(10) == .inactive)
        #expect(try t.read(atIndex: 1).id == 20)
        #expect(try t.read(atIndex: 2).rule == tcp(1000...1000))
        expectRejected(t, .noSuchRule, "there is none at index 3") { () throws(PestoError) in _ = try t.read(atIndex: 3) }
        expectRejected(t, .noSuchRule, "has no rule 11") { () throws(PestoError) in _ = try t.read(11) }
        expectRejected(t, .noSuchRule) { () throws(PestoError) in _ = try t.status(11) }
        #expect(t.list().map(\.id) == [10, 20, 30])
        #expect(t.list().allSatisfy { $0.status == .inactive })
    }

    @Test("insert errors: RuleExists, InvalidRule, NoSpace for rules and for sockets")
    func insertErrors() throws {
        let t = makeTable(limits: TableLimits(maxRules: 2, maxSockets: 10))
        try t.insert(id: 1, rule: tcp(1000...1004))
        expectRejected(t, .ruleExists, "already has a rule 1") { () throws(PestoError) in try t.insert(id: 1, rule: tcp(2000...2000)) }
        expectRejected(t, .invalidRule, "first-port") { () throws(PestoError) in try t.insert(id: 2, rule: tcp(0...0)) }
        expectRejected(t, .invalidRule, "scan capability") { () throws(PestoError) in
            try t.insert(id: 2, rule: Rule(proto: .tcp, firstPort: 5, scan: true))
        }
        expectRejected(t, .noSpace, "at most 10 sockets") { () throws(PestoError) in try t.insert(id: 2, rule: tcp(2000...2005)) }
        try t.insert(id: 2, rule: tcp(2000...2004))
        expectRejected(t, .noSpace, "at most 2 rules") { () throws(PestoError) in try t.insert(id: 3, rule: tcp(3000...3000)) }
    }

    @Test("activate binds and listens; deactivate closes only that rule's sockets")
    func activateDeactivate() throws {
        let factory = ScriptedListenerFactory()
        let t = makeTable(factory: factory)
        let ports = TestSockets.freePorts(3)
        try t.insert(id: 7, rule: tcp(ports))
        let counts = try t.activate(id: 7)
        #expect(counts == .init(bound: 3, failed: 0))
        #expect(try t.status(7) == RuleStatus(active: true, bound: 3, failed: 0, lastError: nil))
        #expect(t.openSockets == 3 && t.activeCount == 1)
        let listeners = try t.listeners(of: 7)
        #expect(listeners.map(\.port) == Array(ports))
        for (port, fd) in listeners {
            #expect(TestSockets.connectAndAccept(listener: fd, port: port))
            #expect(fcntl(fd, F_GETFL) & Int32(PESTO_O_NONBLOCK) != 0, "listener must be non-blocking")
            #expect(fcntl(fd, F_GETFD) & FD_CLOEXEC != 0, "listener must be close-on-exec")
        }
        expectRejected(t, .ruleActive, "already active") { () throws(PestoError) in try t.activate(id: 7) }
        expectRejected(t, .ruleActive, "deactivate it before deleting") { () throws(PestoError) in try t.delete(id: 7) }
        expectRejected(t, .noSuchRule) { () throws(PestoError) in try t.activate(id: 8) }

        try t.deactivate(id: 7)
        #expect(try t.status(7) == .inactive)
        #expect(t.openSockets == 0 && t.activeCount == 0)
        #expect(factory.closed.sorted() == listeners.map(\.fd).sorted(), "exactly the rule's descriptors were closed")
        if case .success(let fd) = TestSockets.connect(port: ports.lowerBound) {
            close(fd)
            Issue.record("port still accepts after deactivation")
        }
        expectRejected(t, .ruleInactive, "is not active") { () throws(PestoError) in try t.deactivate(id: 7) }
        expectRejected(t, .noSuchRule) { () throws(PestoError) in try t.deactivate(id: 8) }
        try t.delete(id: 7)
        #expect(t.ruleCount == 0 && t.reservedSockets == 0)
        expectRejected(t, .noSuchRule) { () throws(PestoError) in try t.delete(id: 7) }
    }

    @Test("activation conflicts only with active rules, and names the other rule")
    func conflicts() throws {
        let t = makeTable()
        let ports = TestSockets.freePorts(4)
        try t.insert(id: 1, rule: tcp(ports, nil))
        try t.insert(id: 2, rule: tcp(ports.upperBound...ports.upperBound, "127.0.0.1"))
        try t.activate(id: 2)  // rule 1 is inactive: no conflict yet
        expectRejected(t, .conflict, "overlaps active rule 2") { () throws(PestoError) in try t.activate(id: 1) }
        try t.deactivate(id: 2)
        try t.activate(id: 1)  // deactivate-then-activate replaces cleanly
        #expect(try t.status(1).bound == 4)
        expectRejected(t, .conflict, "overlaps active rule 1") { () throws(PestoError) in try t.activate(id: 2) }
        try t.deactivate(id: 1)
    }

    @Test("a port held elsewhere is a counted EADDRINUSE failure, bound by the retry once freed")
    func bindFailureAndRetry() throws {
        var changes: [RuleStateChange] = []
        let t = makeTable()
        t.onStateChange = { changes.append($0) }
        let ports = TestSockets.freePorts(2)
        let holder = try #require(TestSockets.bound(port: ports.upperBound))
        try t.insert(id: 5, rule: tcp(ports))
        #expect(try t.activate(id: 5) == .init(bound: 1, failed: 1))
        #expect(try t.status(5) == RuleStatus(active: true, bound: 1, failed: 1, lastError: .addressInUse))
        #expect(try t.status(5).lastErrorName == "EADDRINUSE")
        #expect(changes == [RuleStateChange(id: 5, status: try t.status(5), cause: .activated, failuresChanged: true)])

        #expect(t.retryFailedBinds().isEmpty, "still held: nothing changes")
        #expect(changes.count == 1)

        close(holder)
        #expect(t.retryFailedBinds() == [5])
        let healed = RuleStatus(active: true, bound: 2, failed: 0, lastError: nil)
        #expect(try t.status(5) == healed)
        #expect(try t.status(5).lastErrorName == "")
        #expect(changes.last == RuleStateChange(id: 5, status: healed, cause: .retried, failuresChanged: true))
        let fd = try #require(try t.listeners(of: 5).last?.fd)
        #expect(TestSockets.connectAndAccept(listener: fd, port: ports.upperBound))
        #expect(t.retryFailedBinds().isEmpty)

        try t.deactivate(id: 5)
        #expect(changes.last == RuleStateChange(id: 5, status: .inactive, cause: .deactivated, failuresChanged: false))
    }

    @Test("UDP rules bind datagram sockets and collide with a held UDP port")
    func udp() throws {
        let t = makeTable()
        let ports = TestSockets.freePorts(2)
        let holder = try #require(TestSockets.bound(Int32(SOCK_DGRAM.rawValue), port: ports.lowerBound, listen: false))
        defer { close(holder) }
        try t.insert(id: 1, rule: Rule(proto: .udp, address: .loopbackIPv4, firstPort: ports.lowerBound, lastPort: ports.upperBound))
        #expect(try t.activate(id: 1) == .init(bound: 1, failed: 1))
        let fd = try #require(try t.listeners(of: 1).first?.fd)
        #expect(TestSockets.option(fd, level: SOL_SOCKET, name: SO_TYPE) == Int32(SOCK_DGRAM.rawValue))
        try t.deactivate(id: 1)
    }

    @Test("dual stack: one IPv6 socket with IPV6_V6ONLY off serves both families")
    func dualStack() throws {
        let t = makeTable()
        let port = TestSockets.freePorts(1).lowerBound
        try t.insert(id: 1, rule: Rule(proto: .tcp, firstPort: port))
        #expect(try t.activate(id: 1) == .init(bound: 1, failed: 0))
        let fd = try #require(try t.listeners(of: 1).first?.fd)
        #expect(TestSockets.domain(fd) == AF_INET6)
        #expect(TestSockets.option(fd, level: Int32(IPPROTO_IPV6), name: IPV6_V6ONLY) == 0)
        #expect(TestSockets.connectAndAccept(listener: fd, address: .loopbackIPv4, port: port))
        #expect(TestSockets.connectAndAccept(listener: fd, address: .loopbackIPv6, port: port))
        try t.deactivate(id: 1)

        // An explicit `::` is IPv6 only; `0.0.0.0` is an IPv4 socket.
        try t.insert(id: 2, rule: Rule(proto: .tcp, address: .anyIPv6, firstPort: port))
        try t.activate(id: 2)
        let v6 = try #require(try t.listeners(of: 2).first?.fd)
        #expect(TestSockets.option(v6, level: Int32(IPPROTO_IPV6), name: IPV6_V6ONLY) == 1)
        try t.insert(id: 3, rule: Rule(proto: .tcp, address: .anyIPv4, firstPort: port))
        try t.activate(id: 3)  // IPv4 and IPv6 wildcards do not conflict
        let v4 = try #require(try t.listeners(of: 3).first?.fd)
        #expect(TestSockets.domain(v4) == AF_INET)
        try t.deactivate(id: 2)
        try t.deactivate(id: 3)

        // Only IPv4 enabled: a dual-stack rule falls back to an IPv4 wildcard socket.
        let v4only = ForwardingTable(kind: .host, capabilities: [.ipv4, .tcp], factory: KernelListenerFactory(families: [.ipv4]))
        try v4only.insert(id: 1, rule: Rule(proto: .tcp, firstPort: port))
        try v4only.activate(id: 1)
        #expect(TestSockets.domain(try #require(try v4only.listeners(of: 1).first?.fd)) == AF_INET)
    }

    @Test("an interface binds with SO_BINDTODEVICE; a missing one is a counted ENODEV failure")
    func interfaces() throws {
        let t = makeTable()
        let port = TestSockets.freePorts(1).lowerBound
        try t.insert(id: 1, rule: Rule(proto: .tcp, interface: "lo", firstPort: port))
        #expect(try t.activate(id: 1) == .init(bound: 1, failed: 0))
        let fd = try #require(try t.listeners(of: 1).first?.fd)
        var name = [CChar](repeating: 0, count: 16)
        var len = socklen_t(16)
        #expect(getsockopt(fd, SOL_SOCKET, SO_BINDTODEVICE, &name, &len) == 0)
        #expect(String(decoding: name.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self) == "lo")
        #expect(TestSockets.connectAndAccept(listener: fd, port: port))

        try t.insert(id: 2, rule: Rule(proto: .tcp, interface: "pesto-nodev0", firstPort: port))
        try t.deactivate(id: 1)
        #expect(try t.activate(id: 2) == .init(bound: 0, failed: 1))
        #expect(try t.status(2).lastError == .noSuchDevice)
        try t.deactivate(id: 2)
    }

    @Test("running out of descriptors fails the rest at once, and a retry pass stops at it")
    func descriptorExhaustion() throws {
        let factory = ScriptedListenerFactory()
        factory.failure = .tooManyOpenFiles
        factory.succeedFirst = 3
        let t = makeTable(factory: factory)
        let ports = TestSockets.freePorts(10)
        try t.insert(id: 1, rule: tcp(ports))
        #expect(try t.activate(id: 1) == .init(bound: 3, failed: 7))
        #expect(factory.opens == 4, "after EMFILE no more socket() calls in this activation")
        #expect(try t.status(1).lastErrorName == "EMFILE")

        #expect(t.retryFailedBinds().isEmpty)
        #expect(factory.opens == 5, "a retry pass stops at the first EMFILE")

        factory.failure = nil
        #expect(t.retryFailedBinds() == [1])
        #expect(try t.status(1) == RuleStatus(active: true, bound: 10, failed: 0, lastError: nil))
        try t.deactivate(id: 1)
        #expect(factory.closed.count == 10)
    }

    @Test("every descriptor opened is closed exactly once, across a thousand operations and deinit")
    func noLeaks() throws {
        // Counted through the factory, not /proc/self/fd: other tests open sockets in parallel.
        let factory = ScriptedListenerFactory()
        do {
            let t = makeTable(factory: factory)
            let ports = TestSockets.freePorts(5)
            for round in 0..<200 {
                let id = UInt32(round % 3)
                try t.insert(id: id, rule: tcp(ports))
                try t.activate(id: id)
                try t.deactivate(id: id)
                try t.delete(id: id)
            }
            try t.insert(id: 99, rule: tcp(ports))
            try t.activate(id: 99)  // still active when the table goes away: deinit closes it
            #expect(factory.opens == 1005)
        }
        #expect(factory.closed.count == factory.opened.count)
        #expect(factory.closed.sorted() == factory.opened.sorted())
    }

    @Test("IDs in any order: table order stays ID order through inserts and deletes anywhere")
    func orderUnderChurn() throws {
        let t = makeTable(factory: RefusingListenerFactory())
        var random = SeededRandom(seed: 7)
        var model = Set<UInt32>()
        for step in 0..<3000 {
            let id = UInt32(random.below(500))
            if model.contains(id) {
                if random.oneIn(2) {
                    try t.activate(id: id)
                    try t.deactivate(id: id)
                }
                try t.delete(id: id)
                model.remove(id)
            } else {
                try t.insert(id: id, rule: tcp(UInt16(1 + id)...UInt16(1 + id)))
                model.insert(id)
            }
            if step % 97 == 0 || model.isEmpty {
                let sorted = model.sorted()
                #expect(t.ids == sorted && t.list().map(\.id) == sorted && t.ruleCount == sorted.count)
                for (k, id) in sorted.enumerated() where k % 17 == 0 {
                    #expect(try t.read(atIndex: k).id == id && t.read(id).firstPort == UInt16(1 + id))
                }
                #expect(t.reservedSockets == sorted.count)
            }
        }
    }

    @Test("65,535 rules inserted in descending ID order and deleted in ascending order (no shifting of the others)")
    func descendingInsertAscendingDelete() throws {
        let t = makeTable(factory: RefusingListenerFactory())
        let n: UInt32 = 65_535
        for id in stride(from: n, through: 1, by: -1) { try t.insert(id: id, rule: tcp(8080...8080)) }
        #expect(try t.read(atIndex: 0).id == 1 && t.ids.count == Int(n) && t.ids.last == n)
        for id in 1...n { try t.delete(id: id) }
        #expect(t.ruleCount == 0 && t.ids.isEmpty && t.reservedSockets == 0)
    }
}

// SPDX-License-Identifier: GPL-2.0-or-later

// RelayHandover in process: a relayed connection whose pipe holds bytes moves from one
// engine to another (as between two pestods, with duplicated descriptors standing for
// SCM_RIGHTS); the new engine moves no byte before it is started, then delivers the pipe's
// bytes first and in order, and relays both ways.

import CPestoSys
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoEngine
@testable import PestoModel

#if canImport(Glibc)
    import Glibc
#endif

@Suite("relay handover", .timeLimit(.minutes(10)))
struct RelayHandoverTests {
    /// The byte at offset `i` of the test's stream (not periodic over a pipe's length).
    static func byte(_ i: Int) -> UInt8 { UInt8(truncatingIfNeeded: (i &* 2_654_435_761) >> 13) }

    @Test(
        "a connection with bytes held in its pipe moves to another engine: nothing moves before startAdopted, then the pipe's bytes come first and in order, and both directions relay"
    )
    func connectionMovesWithItsPipe() throws {
        let port = TestSockets.freePorts(1).lowerBound
        let targetPort = TestSockets.freePorts(1).lowerBound
        // The target reads nothing at first; a small receive buffer makes the relay's pipe fill soon.
        let targetListener = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        defer { close(targetListener) }
        TestSockets.setOption(targetListener, level: SOL_SOCKET, name: SO_RCVBUF, 4096)
        #expect(TestSockets.withSocketAddress(.loopbackIPv4, targetPort) { bind(targetListener, $0, $1) == 0 })
        #expect(listen(targetListener, 4) == 0)

        var config = EngineConfiguration()
        config.capabilities = [.ipv4, .tcp, .udp]
        let loopA = try EventLoop()
        let a = try ForwardingEngine(loop: loopA, configuration: config)
        try a.host.insert(id: 1, rule: Rule(proto: .tcp, address: .loopbackIPv4, firstPort: port, targetPort: targetPort))
        _ = try a.host.activate(id: 1)
        let client = try TestSockets.connect(port: port).get()
        defer { close(client) }
        _ = fcntl(client, F_SETFL, fcntl(client, F_GETFL) | O_NONBLOCK)
        #expect(loopA.turn(until: { a.tcp.activeConnections == 1 }, "the relay connects"))
        let target = accept(targetListener, nil, nil)
        #expect(target >= 0)
        defer { close(target) }

        // The client writes until the relay holds bytes in its pipe, its target blocked.
        var written = 0
        var chunk = [UInt8](repeating: 0, count: 65_536)
        /// Writes one chunk, if the client's socket takes it.
        func write() {
            for k in chunk.indices { chunk[k] = Self.byte(written + k) }
            let n = send(client, chunk, chunk.count, Int32(MSG_NOSIGNAL))
            if n > 0 { written += n }
        }
        #expect(
            loopA.turn(
                until: {
                    let up = a.tcp.connectionState(0)?.up
                    if (up?.pending ?? 0) > 0 && up?.destinationBlocked == true { return true }
                    write()
                    return false
                }, "the pipe holds bytes"))
        let handed = a.tcp.handoverSnapshot()
        #expect(handed.count == 1)
        var connection = try #require(handed.first)
        #expect(connection.up.pending > 0 && connection.descriptors.count == 4 && !connection.connecting)
        #expect(connection.target?.endpoint?.port == targetPort)
        connection.descriptors = connection.descriptors.map { dup($0) }  // what SCM_RIGHTS gives the new pestod

        let loopB = try EventLoop()
        let b = try ForwardingEngine(loop: loopB, configuration: config)
        #expect(b.adopt(connection))
        #expect(b.budget.held == DescriptorPlan.perConnection, "charged as any connection, its pipes with it")
        #expect(b.tcp.connectionState(0)?.up.pending == connection.up.pending)
        a.tcp.closeAll()  // the old pestod exits: its copies close, the sockets and the pipe live on
        // Nothing moved yet: the target's socket holds only what it held before.
        var received = 0
        var buffer = [UInt8](repeating: 0, count: 65_536)
        var misplaced: Int?
        _ = fcntl(target, F_SETFL, fcntl(target, F_GETFL) | O_NONBLOCK)
        func read() {
            while misplaced == nil {
                let n = recv(target, &buffer, buffer.count, 0)
                if n <= 0 { return }
                for k in 0..<n where buffer[k] != Self.byte(received + k) {
                    misplaced = received + k
                    break
                }
                received += n
            }
        }
        read()
        let beforeStart = received
        #expect(beforeStart <= written - connection.up.pending, "the pipe's bytes wait for startAdopted")
        b.tcp.startAdopted()
        #expect(
            loopB.turn(
                until: {
                    read()
                    return received == written || misplaced != nil
                }, "every byte arrives"))
        #expect(misplaced == nil, "byte \(misplaced ?? -1) out of place")
        #expect(received == written)
        // And back: the target answers through the new engine.
        #expect(send(target, "pong", 4, 0) == 4)
        var answer = [UInt8](repeating: 0, count: 4)
        #expect(loopB.turn(until: { recv(client, &answer, 4, Int32(MSG_PEEK)) == 4 }, "the answer arrives"))
        #expect(answer == Array("pong".utf8))
    }

    @Test("an adopted connection the descriptor budget cannot take is refused and its descriptors closed")
    func adoptionWithinTheBudget() throws {
        var config = EngineConfiguration()
        config.capabilities = [.ipv4, .tcp, .udp]
        config.descriptors = DescriptorPlan(openFileLimit: DescriptorPlan.coreReserve + 1)  // engine limit 1
        let loop = try EventLoop()
        let engine = try ForwardingEngine(loop: loop, configuration: config)
        // Two stream socket pairs: the connection gets one end of each, the test keeps the
        // other ends, which read end of file once the connection's are closed.
        var first: [Int32] = [-1, -1]
        var second: [Int32] = [-1, -1]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &first) == 0)
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &second) == 0)
        defer {
            close(first[1])
            close(second[1])
        }
        let connection = TCPConnectionHandover(
            table: .host, ruleID: 1, connecting: false, up: .init(), down: .init(), target: nil, preamble: [],
            descriptors: [first[0], second[0]])
        #expect(!engine.adopt(connection))
        #expect(engine.budget.held == 0 && engine.tcp.activeConnections == 0)
        var byte: UInt8 = 0
        #expect(
            recv(first[1], &byte, 1, Int32(MSG_DONTWAIT)) == 0 && recv(second[1], &byte, 1, Int32(MSG_DONTWAIT)) == 0, "both were closed")
    }
}

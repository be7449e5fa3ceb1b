// SPDX-License-Identifier: GPL-2.0-or-later

// The UDP relay's batched sends: one sendmmsg per flow towards the target, the replies of a
// whole loop turn in one sendmmsg from the listener, and what a send that fails part-way does.
//
// `sendAll` (the loop both directions use around sendmmsg) is driven in process by a scripted
// send, which can stop part-way as sendmmsg does; the relay itself runs on real loopback
// sockets (`UDPHarness`), with `SyscallScript` failing one sendmmsg on a chosen socket.

import CPestoSys
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoEngine
@testable import PestoModel

#if canImport(Glibc)
    import Glibc
#endif

/// A payload of 32 bytes naming client `k`'s datagram `i`.
private func numbered(_ k: Int, _ i: Int) -> [UInt8] {
    [UInt8(k), UInt8(i)] + [UInt8](repeating: UInt8(truncatingIfNeeded: k &* 31 &+ i), count: 30)
}

/// Gives `fd` a receive queue of 4 MiB (SO_RCVBUFFORCE: the tests run as root), so a burst
/// queued before the loop turns is not cut short by the kernel.
private func roomyQueue(_ fd: Int32) throws {
    var size: Int32 = 4 << 20
    try #require(setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, socklen_t(MemoryLayout<Int32>.size)) == 0, "\(Errno.current)")
}

@Suite("UDP relay batches", .timeLimit(.minutes(10)))
struct UDPBatchTests {
    // MARK: The loop's hook

    @Test("afterEvents actions run once after the handlers of all the sources one epoll_wait returned, in the order added")
    func afterEventsRunsAfterHandlers() throws {
        let loop = try EventLoop()
        let kind = EventLoop.Kind(EngineEventKind.firstForTests)
        var log: [String] = []
        let handler = RecordingHandler()
        handler.onEvent = { log.append("event \(loop.readyThisTurn)") }
        loop.setHandler(handler, for: kind)
        loop.afterEvents { log.append("after 1") }
        loop.afterEvents {
            log.append("after 2")
            loop.stop()
        }
        var pipes: [Int32] = []
        for _ in 0..<2 {
            var fds: [Int32] = [0, 0]
            try #require(pesto_pipe2(&fds, Int32(PESTO_O_CLOEXEC) | Int32(PESTO_O_NONBLOCK)) == 0)
            pipes += fds
            try loop.add(fd: fds[0], events: EPOLLIN.rawValue, kind: kind)
            _ = write(fds[1], "x", 1)
        }
        defer { for fd in pipes { close(fd) } }
        loop.run()
        #expect(log == ["event 2", "event 2", "after 1", "after 2"], "both sources came in one epoll_wait, and readyThisTurn says so")
    }

    // MARK: sendAll, as sendmmsg behaves

    @Test("a send that stops part-way resumes with the datagram it stopped at; one that fails drops that one and goes on, in order")
    func sendAllResumes() {
        var asked: [Range<Int>] = []
        var answers: [Result<Int, Errno>] = [.success(3), .failure(.wouldBlock), .success(2), .success(4)]
        let (sent, dropped) = UDPRelay.sendAll(10, retryRefused: false) { range in
            asked.append(range)
            return answers.removeFirst()
        }
        #expect(asked == [0..<10, 3..<10, 4..<10, 6..<10], "each call starts where the last one stopped; the failed datagram is skipped")
        #expect(sent == 9)
        #expect(dropped == 1)
    }

    @Test("a socket that refuses every send costs one call per datagram, never a spin")
    func sendAllNeverSpins() {
        var calls = 0
        let (sent, dropped) = UDPRelay.sendAll(64, retryRefused: true) { _ in
            calls += 1
            return .failure(.wouldBlock)
        }
        #expect(calls == 64)
        #expect(sent == 0)
        #expect(dropped == 64)
    }

    @Test("towards the target, ECONNREFUSED (an earlier datagram's ICMP error) gets one retry of the same datagram, not more")
    func sendAllRetriesRefusedOnce() {
        let refused = Errno(rawValue: ECONNREFUSED)
        var asked: [Range<Int>] = []
        var answers: [Result<Int, Errno>] = [
            .success(1), .failure(refused), .success(1), .failure(refused), .failure(refused), .success(1),
        ]
        let (sent, dropped) = UDPRelay.sendAll(4, retryRefused: true) { range in
            asked.append(range)
            return answers.removeFirst()
        }
        #expect(asked == [0..<4, 1..<4, 1..<4, 2..<4, 2..<4, 3..<4])
        #expect(sent == 3, "datagram 2 was refused twice and dropped")
        #expect(dropped == 3, "three failed calls")
        #expect(answers.isEmpty)

        var replies = 0
        let (replySent, replyDropped) = UDPRelay.sendAll(2, retryRefused: false) { _ in
            replies += 1
            return replies == 1 ? .failure(refused) : .success(1)
        }
        #expect(replies == 2, "replies are not retried")
        #expect(replySent == 1)
        #expect(replyDropped == 1)
    }

    // MARK: The relay on loopback

    @Test("8 clients × 40 datagrams queued at once cross many batches both ways; each client gets all its replies, in its order")
    func orderAcrossBatches() throws {
        let h = try UDPHarness()
        defer { h.shutdown() }
        let listener = try h.addListener()
        try roomyQueue(listener)
        try h.startEcho()
        try roomyQueue(h.echoes[0])
        let clients = try (0..<8).map { _ in try h.client() }
        for client in clients { try roomyQueue(client) }
        let perClient = 40
        // Interleaved, so every listener batch mixes flows and holds several datagrams of each.
        for i in 0..<perClient {
            for (k, client) in clients.enumerated() { h.send(numbered(k, i), from: client) }
        }
        let total = clients.count * perClient
        h.run("\(total) replies") { h.replies.values.reduce(0) { $0 + $1.count } == total }

        #expect(h.listenerCalls >= total / UDPRelay.batch, "the datagrams crossed several listener batches")
        for (k, client) in clients.enumerated() {
            #expect(h.payloads(client) == (0..<perClient).map { numbered(k, $0) }, "client \(k): every reply, in order")
        }
        let perFlow = Dictionary(grouping: h.echoSources.indices, by: { h.echoSources[$0] })
        #expect(perFlow.count == clients.count, "one flow socket per client")
        #expect(h.relay.counters.datagramsOut == UInt64(total))
        #expect(h.relay.counters.repliesOut == UInt64(total))
        #expect(h.relay.counters.droppedErrors == 0)
    }

    @Test("a reply sendmmsg that fails (EAGAIN) loses one reply, sends the turn's others, and the flows carry on")
    func replySendFails() throws {
        let h = try UDPHarness()
        defer { h.shutdown() }
        let listener = try h.addListener()
        try h.startEcho()
        let clients = try (0..<8).map { _ in try h.client() }
        let script = SyscallScript()
        script.fail(.sendmsg, with: .wouldBlock, times: 1) { $0.fd == listener }
        script.run {
            for (k, client) in clients.enumerated() { h.send(numbered(k, 0), from: client) }
            h.run("7 replies") { h.replies.values.reduce(0) { $0 + $1.count } == 7 }
        }
        #expect(script.injectedCount(.sendmsg) == 1)
        #expect(h.relay.counters.repliesIn == 8)
        #expect(h.relay.counters.repliesOut == 7)
        #expect(h.relay.counters.droppedErrors == 1)
        #expect(clients.allSatisfy { h.payloads($0).count <= 1 })

        for (k, client) in clients.enumerated() { h.send(numbered(k, 1), from: client) }
        h.run("8 more replies") { h.replies.values.reduce(0) { $0 + $1.count } == 15 }
        for (k, client) in clients.enumerated() {
            #expect(h.payloads(client).last == numbered(k, 1), "client \(k)'s flow carried on")
        }
        #expect(h.relay.counters.droppedErrors == 1)
    }

    @Test("a flow's sendmmsg towards the target that fails (EAGAIN) loses that datagram; the flow's others follow in order")
    func targetSendFails() throws {
        let h = try UDPHarness()
        defer { h.shutdown() }
        try h.addListener()
        try h.startEcho()
        let client = try h.client()
        h.send(numbered(0, 0), from: client)
        h.run("the first reply") { h.payloads(client).count == 1 }
        let flow = try #require(h.flowSockets().first).fd

        let script = SyscallScript()
        script.fail(.sendmsg, with: .wouldBlock, times: 1) { $0.fd == flow }
        script.run {
            // Queued before the loop turns: one listener batch, one sendmmsg on the flow socket.
            for i in 1...4 { h.send(numbered(0, i), from: client) }
            h.run("3 more replies") { h.payloads(client).count == 4 }
        }
        #expect(script.injectedCount(.sendmsg) == 1)
        #expect(h.payloads(client) == [0, 2, 3, 4].map { numbered(0, $0) }, "the first of the batch was lost, the rest kept their order")
        #expect(h.relay.counters.datagramsOut == 4)
        #expect(h.relay.counters.droppedErrors == 1)
    }
}

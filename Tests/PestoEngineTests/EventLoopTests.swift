// SPDX-License-Identifier: GPL-2.0-or-later

// The event loop: typed dispatch, timers, stopping; and the engine's retry timer on it.

import CPestoSys
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoEngine
@testable import PestoModel

#if canImport(Glibc)
    import Glibc
#endif

/// Records what the loop dispatches to it.
final class RecordingHandler: EventHandler {
    var seen: [(events: UInt32, index: UInt32, fd: Int32)] = []
    var onEvent: (() -> Void)?

    func handleEvent(_ events: UInt32, index: UInt32, fd: Int32) {
        seen.append((events, index, fd))
        var buffer = [UInt8](repeating: 0, count: 64)
        _ = read(fd, &buffer, 64)
        onEvent?()
    }
}

@Suite("Event loop", .timeLimit(.minutes(10)))
struct EventLoopTests {
    @Test("every event kind of pestod is distinct, non-zero and below the tests' own")
    func kindsDistinct() {
        let raw = EngineEventKind.all.map(\.rawValue)
        #expect(Set(raw).count == raw.count)
        #expect(raw.allSatisfy { $0 != 0 && $0 < EngineEventKind.firstForTests })
    }

    @Test("a readable source reaches its kind's handler with its index and fd")
    func typedDispatch() throws {
        let loop = try EventLoop()
        let handler = RecordingHandler()
        loop.setHandler(handler, for: EventLoop.Kind(EngineEventKind.firstForTests))
        var fds: [Int32] = [0, 0]
        #expect(pesto_pipe2(&fds, Int32(PESTO_O_CLOEXEC) | Int32(PESTO_O_NONBLOCK)) == 0)
        defer {
            close(fds[0])
            close(fds[1])
        }
        try loop.add(fd: fds[0], events: EPOLLIN.rawValue, kind: EventLoop.Kind(EngineEventKind.firstForTests), index: 0xABCDE)
        handler.onEvent = { loop.stop() }
        _ = write(fds[1], "x", 1)
        loop.run()
        #expect(handler.seen.count == 1)
        #expect(handler.seen.first?.index == 0xABCDE)
        #expect(handler.seen.first?.fd == fds[0])
        #expect((handler.seen.first?.events ?? 0) & EPOLLIN.rawValue != 0)
    }

    @Test("work deferred with nextTurn runs one piece per turn, and a ready source is handled between two pieces")
    func nextTurnLetsSourcesIn() throws {
        let loop = try EventLoop()
        let handler = RecordingHandler()
        loop.setHandler(handler, for: EventLoop.Kind(EngineEventKind.firstForTests))
        var fds: [Int32] = [0, 0]
        #expect(pesto_pipe2(&fds, Int32(PESTO_O_CLOEXEC) | Int32(PESTO_O_NONBLOCK)) == 0)
        defer {
            close(fds[0])
            close(fds[1])
        }
        try loop.add(fd: fds[0], events: EPOLLIN.rawValue, kind: EventLoop.Kind(EngineEventKind.firstForTests))
        var order: [String] = []
        handler.onEvent = { order.append("source") }
        loop.nextTurn {
            order.append("first")
            _ = write(fds[1], "x", 1)  // ready now: handled before the next piece
            loop.nextTurn {
                order.append("second")
                loop.stop()
            }
        }
        loop.run()
        #expect(order == ["first", "source", "second"])
    }

    @Test("periodic and one-shot timers fire in order; cancelled ones do not")
    func timers() throws {
        let loop = try EventLoop()
        var log: [String] = []
        var ticks = 0
        let cancelled = loop.after(milliseconds: 5) { log.append("cancelled") }
        loop.cancelTimer(cancelled)
        loop.after(milliseconds: 30) { log.append("once") }
        loop.every(milliseconds: 10) {
            ticks += 1
            if ticks == 5 { loop.stop() }
        }
        loop.run()
        #expect(ticks == 5)
        #expect(log == ["once"])
    }

    @Test("the stopper ends run() from another thread")
    func stopper() throws {
        let loop = try EventLoop()
        let stopper = loop.stopper
        loop.after(milliseconds: 1) {
            Thread.detach { stopper.stop() }
        }
        loop.run()  // returns only because of the stopper
    }

    @Test("the engine's retry timer binds a freed port and reports the change")
    func engineRetry() throws {
        let loop = try EventLoop()
        var config = EngineConfiguration()
        config.retryIntervalMilliseconds = 20
        let engine = try ForwardingEngine(loop: loop, configuration: config)
        let port = TestSockets.freePorts(1).lowerBound
        let holder = try #require(TestSockets.bound(port: port))
        try engine.host.insert(id: 1, rule: Rule(proto: .tcp, address: .loopbackIPv4, firstPort: port))
        #expect(try engine.host.activate(id: 1).failed == 1)
        var changes: [RuleStateChange] = []
        engine.host.onStateChange = { change in
            changes.append(change)
            loop.stop()
        }
        engine.start()
        loop.after(milliseconds: 50) { close(holder) }
        loop.run()
        #expect(changes.map(\.cause) == [.retried])
        #expect(changes.first?.status == RuleStatus(active: true, bound: 1, failed: 0, lastError: nil))
        engine.stop()
        try engine.host.deactivate(id: 1)
    }
}

/// A detached thread, for tests that need a second thread.
enum Thread {
    static func detach(_ body: @escaping @Sendable () -> Void) {
        final class Box: @unchecked Sendable {
            let body: @Sendable () -> Void
            init(_ b: @escaping @Sendable () -> Void) { body = b }
        }
        var tid = pthread_t()
        let box = Unmanaged.passRetained(Box(body)).toOpaque()
        pthread_create(
            &tid, nil,
            { arg in
                let b = Unmanaged<Box>.fromOpaque(arg!).takeRetainedValue()
                b.body()
                return nil
            }, box)
        pthread_detach(tid)
    }
}

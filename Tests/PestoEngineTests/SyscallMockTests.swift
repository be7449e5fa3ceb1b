// SPDX-License-Identifier: GPL-2.0-or-later

// The real TCP relay, on real loopback sockets, with chosen system calls failing: a
// `SyscallScript` (debug builds only) makes the calls it names fail with the errno it names,
// on the test's thread, which is the thread that turns the engine's loop. Every test checks
// that the descriptors the funnel opened during it were closed again (`openDescriptors`), so
// nothing leaks whatever the error.
//
// `turn(until:)` runs the loop until a condition holds, checked every 5 ms; its 5 s bound only
// records a failure.

import CPestoSys
import PestoModel
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoEngine

#if canImport(Glibc)
    import Glibc
#endif

/// An engine relaying one loopback TCP port to an echo server, made under a script.
private final class RelayHarness {
    let loop: EventLoop
    let engine: ForwardingEngine
    let server: EchoServer
    let port: UInt16
    /// The descriptors open once the engine listens (the loop's two and the listener).
    let baseline: Set<Int32>
    private let script: SyscallScript

    /// Must be called inside `script.run`. No pipe is pooled, so every pipe is a pipe2() call.
    init(script: SyscallScript, pauseMilliseconds: Int = 100) throws {
        self.script = script
        loop = try EventLoop()
        var config = EngineConfiguration()
        config.tcp.pipePoolSize = 0
        config.capabilities = [.tcp, .udp, .ipv4, .ipv6]
        config.pauseMilliseconds = pauseMilliseconds
        engine = try ForwardingEngine(loop: loop, configuration: config)
        let ports = TestSockets.freePorts(2)
        port = ports.lowerBound
        server = try #require(EchoServer(port: ports.upperBound))
        try engine.host.insert(id: 1, rule: Rule(proto: .tcp, address: .loopbackIPv4, firstPort: port, targetPort: ports.upperBound))
        #expect(try engine.host.activate(id: 1).bound == 1)
        baseline = script.openDescriptors
    }

    /// Runs the loop until `condition` holds (false if it did not within 5 s).
    @discardableResult
    func turn(until condition: @escaping () -> Bool, _ what: String) -> Bool { loop.turn(until: condition, what) }

    /// A client connected to the relayed port.
    func connect() throws -> Int32 {
        try #require(try? TestSockets.connect(port: port).get())
    }

    /// Sends one byte through `fd` and turns the loop until its echo is back.
    func echo(_ fd: Int32, _ what: String) -> Bool {
        var byte: UInt8 = 42
        guard write(fd, &byte, 1) == 1 else { return false }
        guard turn(until: { peek(fd) == "data" }, what) else { return false }
        return read(fd, &byte, 1) == 1 && byte == 42
    }

    /// No connection left, only the listener charged, and every descriptor the funnel opened
    /// for connections and pipes closed.
    func expectNothingLeaked(_ sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(engine.tcp.activeConnections == 0, sourceLocation: sourceLocation)
        #expect(engine.budget.held == 1, "only the listener is charged", sourceLocation: sourceLocation)
        #expect(script.openDescriptors == baseline, "descriptors left open", sourceLocation: sourceLocation)
    }

    /// Releases everything (the loop holds the engine's handlers).
    func shutdown() {
        try? engine.host.deactivate(id: 1)
        engine.tcp.closeAll()
        loop.removeAllHandlers()
        server.stop()
    }
}

/// What a client socket sees next: data, end of file, a reset, or nothing yet.
private func peek(_ fd: Int32) -> String {
    var byte: UInt8 = 0
    let n = recv(fd, &byte, 1, Int32(MSG_DONTWAIT) | Int32(MSG_PEEK))
    if n == 1 { return "data" }
    if n == 0 { return "eof" }
    return errno == EAGAIN ? "nothing" : errno == ECONNRESET ? "reset" : "error \(errno)"
}

/// Whether `fd` is a pipe (the source of a splice out of a relay's pipe).
private func isPipe(_ fd: Int32) -> Bool {
    var st = stat()
    return fstat(fd, &st) == 0 && (st.st_mode & S_IFMT) == S_IFIFO
}

@Suite("The TCP relay under failing system calls", .timeLimit(.minutes(10)))
struct SyscallMockTests {
    @Test("EINTR is retried: accept, splice, epoll_ctl and setsockopt interrupted; the connection relays, nothing is reset")
    func interrupted() throws {
        let script = SyscallScript()
        try script.run {
            let h = try RelayHarness(script: script)
            defer { h.shutdown() }
            script.fail(.accept, with: .interrupted)
            script.fail(.splice, with: .interrupted, times: 4)
            script.fail(.epollCtl, with: .interrupted, times: 2)
            script.fail(.setsockopt, with: .interrupted)
            let client = try h.connect()
            defer { close(client) }
            #expect(h.echo(client, "the byte echoed"))
            #expect(script.injectedCount(.accept) == 1 && script.injectedCount(.splice) == 4)
            #expect(script.injectedCount(.epollCtl) == 2 && script.injectedCount(.setsockopt) == 1)
            #expect(h.engine.tcp.counters.resets == 0 && h.engine.tcp.activeConnections == 1)
            shutdown(client, Int32(SHUT_WR))  // the defer closes it
            h.turn(until: { h.engine.tcp.activeConnections == 0 }, "the connection closed")
            h.expectNothingLeaked()
        }
    }

    @Test("EAGAIN waits for readiness: a byte held back in the pipe by a full destination is delivered on EPOLLOUT")
    func wouldBlock() throws {
        let script = SyscallScript()
        try script.run {
            let h = try RelayHarness(script: script)
            defer { h.shutdown() }
            let client = try h.connect()
            defer { close(client) }
            h.turn(until: { h.engine.tcp.activeConnections == 1 }, "the connection accepted")
            // Out of the pipe towards the target, and then towards the client: the client sends
            // nothing more, so only EPOLLOUT on the blocked destination can move the byte on.
            script.fail(.splice, with: .wouldBlock, times: 2) { isPipe($0.fd) }
            #expect(h.echo(client, "the byte echoed after two EAGAINs"))
            #expect(script.injectedCount(.splice) == 2)
            // And EAGAIN reading a socket (a spurious wake-up) is just the end of the turn.
            script.fail(.splice, with: .wouldBlock, times: 1) { !isPipe($0.fd) }
            #expect(h.echo(client, "the next byte echoed"))
            #expect(h.engine.tcp.counters.resets == 0)
            shutdown(client, Int32(SHUT_WR))  // the defer closes it
            h.turn(until: { h.engine.tcp.activeConnections == 0 }, "the connection closed")
            h.expectNothingLeaked()
        }
    }

    @Test(
        "a splice failing with ENOBUFS, ENOSPC or ENOMEM resets that connection and closes all its descriptors; the next one relays",
        arguments: [ENOBUFS, ENOSPC, ENOMEM])
    func spliceFails(_ code: Int32) throws {
        let script = SyscallScript()
        try script.run {
            let h = try RelayHarness(script: script)
            defer { h.shutdown() }
            let client = try h.connect()
            defer { close(client) }
            h.turn(until: { h.engine.tcp.activeConnections == 1 }, "the connection accepted")
            script.fail(.splice, with: Errno(rawValue: code))
            var byte: UInt8 = 1
            #expect(write(client, &byte, 1) == 1)
            h.turn(until: { peek(client) == "reset" }, "the client reset")
            #expect(h.engine.tcp.counters.resets == 1)
            h.expectNothingLeaked()
            let next = try h.connect()
            defer { close(next) }
            #expect(h.echo(next, "a new connection relays"))
        }
    }

    @Test("no pipe (pipe2 EMFILE) resets that connection alone, with nothing left open")
    func pipeFails() throws {
        let script = SyscallScript()
        try script.run {
            let h = try RelayHarness(script: script)
            defer { h.shutdown() }
            script.fail(.pipe, with: .tooManyOpenFiles)
            let client = try h.connect()
            defer { close(client) }
            h.turn(until: { peek(client) == "reset" }, "the client reset")
            #expect(script.injectedCount(.pipe) == 1 && h.engine.tcp.counters.resets == 1)
            h.expectNothingLeaked()
            let next = try h.connect()
            defer { close(next) }
            #expect(h.echo(next, "a new connection relays"))
        }
    }

    @Test(
        "accept4 out of descriptors or buffers pauses the listener without spinning; a closing connection resumes it and the waiting client is served",
        arguments: [EMFILE, ENFILE, ENOBUFS])
    func acceptExhausted(_ code: Int32) throws {
        let script = SyscallScript()
        try script.run {
            // A pause far longer than the test: only the closing connection can resume the listener.
            let h = try RelayHarness(script: script, pauseMilliseconds: 600_000)
            defer { h.shutdown() }
            let first = try h.connect()
            #expect(h.echo(first, "the first connection relays"))
            script.fail(.accept, with: Errno(rawValue: code), times: nil)
            let waiting = try h.connect()  // complete in the kernel, waiting in the backlog
            defer { close(waiting) }
            h.turn(until: { h.engine.pausedListenerDescriptors.count == 1 }, "the listener paused")
            #expect(script.injectedCount(.accept) == 1, "one accept, then no more while paused")
            script.stopFailing()
            close(first)
            h.turn(until: { h.engine.pausedListenerDescriptors.isEmpty }, "the listener resumed")
            #expect(h.echo(waiting, "the waiting client served"))
            shutdown(waiting, Int32(SHUT_WR))  // the defer closes it
            h.turn(until: { h.engine.tcp.activeConnections == 0 }, "both connections closed")
            h.expectNothingLeaked()
        }
    }

    @Test("no descriptor for the target's socket (EMFILE): the client is reset and the listener paused until the pause ends")
    func targetSocketFails() throws {
        let script = SyscallScript()
        try script.run {
            let h = try RelayHarness(script: script, pauseMilliseconds: 20)
            defer { h.shutdown() }
            script.fail(.socket, with: .tooManyOpenFiles)
            let client = try h.connect()
            defer { close(client) }
            h.turn(until: { peek(client) == "reset" }, "the client reset")
            #expect(h.engine.tcp.counters.connectFailures == 1)
            h.expectNothingLeaked()
            let next = try h.connect()
            defer { close(next) }
            #expect(h.echo(next, "served once the pause is over"))
        }
    }

    @Test(
        "a connect still in progress when asked again is watched for EPOLLOUT and SO_ERROR decides: connected, or a getsockopt failure resets"
    )
    func slowConnect() throws {
        let script = SyscallScript()
        try script.run {
            let h = try RelayHarness(script: script)
            defer { h.shutdown() }
            script.recording = true
            // The second connect() of each connection says EALREADY, whatever the kernel knows.
            var connects = 0
            script.fail(.connect, with: .alreadyInProgress, times: nil) { _ in
                connects += 1
                return connects % 2 == 0
            }
            let client = try h.connect()
            defer { close(client) }
            #expect(h.echo(client, "relayed after EPOLLOUT"))
            #expect(script.calls.filter { $0.name == .getsockopt }.count == 1, "SO_ERROR read once")
            // getsockopt itself failing counts as the connect failing.
            script.fail(.getsockopt, with: .noBufferSpace)
            let refused = try h.connect()
            defer { close(refused) }
            h.turn(until: { peek(refused) == "reset" }, "the second client reset")
            #expect(h.engine.tcp.counters.connectFailures == 1)
            shutdown(client, Int32(SHUT_WR))  // the defer closes it
            h.turn(until: { h.engine.tcp.activeConnections == 0 }, "the first connection closed")
            h.expectNothingLeaked()
        }
    }

    @Test("an epoll_ctl failure on a relayed connection (ENOSPC, ENOMEM) closes that connection cleanly", arguments: [ENOSPC, ENOMEM])
    func watchFails(_ code: Int32) throws {
        let script = SyscallScript()
        try script.run {
            let h = try RelayHarness(script: script)
            defer { h.shutdown() }
            let kind = EngineEventKind.tcpConnection.rawValue
            script.fail(.epollCtl, with: Errno(rawValue: code), times: 1) { $0.epollKind == kind }
            let client = try h.connect()
            defer { close(client) }
            h.turn(until: { peek(client) == "reset" }, "the client reset")
            #expect(h.engine.tcp.counters.watchFailures == 1)
            h.expectNothingLeaked()
        }
    }
}

@Suite("The syscall script", .timeLimit(.minutes(10)))
struct SyscallScriptTests {
    @Test("a scripted call fails without reaching the kernel; EINTR is retried; other threads and later calls are untouched")
    func script() throws {
        let script = SyscallScript()
        script.fail(.socket, with: .tooManyOpenFiles)
        script.fail(.pipe, with: .interrupted, times: 2)
        script.run {
            #expect(Sys.socket(domain: AF_INET, type: Int32(SOCK_STREAM.rawValue)).failureValue == .tooManyOpenFiles)
            // The script is per thread: another thread's call goes to the kernel. It reports
            // through a pipe (1: its socket() succeeded), which this thread reads, blocking.
            var report: [Int32] = [-1, -1]
            #expect(Glibc.pipe(&report) == 0)
            let writeEnd = report[1]
            detachThread {
                var ok: UInt8 = 0
                if case .success(let fd) = Sys.socket(domain: AF_INET, type: Int32(SOCK_STREAM.rawValue)) {
                    Sys.close(fd)
                    ok = 1
                }
                _ = Glibc.write(writeEnd, &ok, 1)
                Glibc.close(writeEnd)
            }
            var otherOK: UInt8 = 0
            #expect(Glibc.read(report[0], &otherOK, 1) == 1 && otherOK == 1, "the other thread's socket() was not scripted")
            Glibc.close(report[0])
            guard case .success(let fd) = Sys.socket(domain: AF_INET, type: Int32(SOCK_STREAM.rawValue)) else {
                Issue.record("the second socket() failed")
                return
            }
            #expect(script.openDescriptors == [fd])
            Sys.close(fd)
            guard case .success(let ends) = Sys.pipe() else {
                Issue.record("pipe2 interrupted twice was not retried")
                return
            }
            Sys.close(ends.read)
            Sys.close(ends.write)
            #expect(script.injectedCount(.pipe) == 2 && script.injectedCount(.socket) == 1)
            #expect(script.openDescriptors.isEmpty)
        }
        // Outside `run`, nothing is scripted.
        script.fail(.socket, with: .tooManyOpenFiles)
        if case .success(let fd) = Sys.socket(domain: AF_INET, type: Int32(SOCK_STREAM.rawValue)) {
            Sys.close(fd)
        } else {
            Issue.record("a script not running failed a call")
        }
    }
}

extension Result {
    /// The error, if this is a failure.
    fileprivate var failureValue: Failure? {
        if case .failure(let e) = self { return e }
        return nil
    }
}

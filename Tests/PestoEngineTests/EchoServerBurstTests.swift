// SPDX-License-Identifier: GPL-2.0-or-later

// The tests' TCP echo server under a burst of connections, as a relay sends them when it
// drains its own backlog after a pause (a takeover: "three takeovers in a row" in
// TakeoverTests). Its listen backlog was 16: the burst overflowed it, the kernel answered with
// SYN cookies, and a connection whose first segments were dropped for the full queue got a
// reset for its FIN (the cookie check fails for it), which pestod passed on to its client.

import CPestoSys
import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport
import Testing

#if canImport(Glibc)
    import Glibc
#endif

@Suite("test support: the echo server", .timeLimit(.minutes(10)))
struct EchoServerBurstTests {
    /// Connects `count` non-blocking sockets to `port` at once; each sends four bytes and a FIN
    /// once connected and reads the echo to its end. Returns what went wrong, one line each.
    static func burst(port: UInt16, count: Int) -> [String] {
        var fds: [Int32] = []
        var problems: [String] = []
        for _ in 0..<count {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(PESTO_O_NONBLOCK), 0)
            guard fd >= 0 else { return ["socket: \(Errno.current)"] }
            let r = SocketAddress(.loopbackIPv4, port: port).withSockaddr { Glibc.connect(fd, $0, $1) }
            if r != 0 && errno != EINPROGRESS {
                problems.append("connect: \(Errno.current)")
                close(fd)
                continue
            }
            fds.append(fd)
        }
        var sent = [Bool](repeating: false, count: fds.count)
        var received = [Int](repeating: 0, count: fds.count)
        var open = Set(fds.indices)
        let deadline = MonotonicInstant.now.adding(milliseconds: 30_000)
        var buffer = [UInt8](repeating: 0, count: 64)
        while !open.isEmpty && MonotonicInstant.now < deadline {
            var polled = open.map { pollfd(fd: fds[$0], events: Int16(sent[$0] ? POLLIN : POLLOUT), revents: 0) }
            let order = Array(open)
            guard poll(&polled, nfds_t(polled.count), 1000) >= 0 else { break }
            for (k, i) in order.enumerated() where polled[k].revents != 0 {
                if !sent[i] {
                    let w = send(fds[i], "ping", 4, Int32(MSG_NOSIGNAL))
                    guard w == 4 else {
                        problems.append("send: \(Errno.current)")
                        open.remove(i)
                        continue
                    }
                    shutdown(fds[i], Int32(SHUT_WR))
                    sent[i] = true
                    continue
                }
                let n = recv(fds[i], &buffer, buffer.count, 0)
                if n > 0 {
                    received[i] += n
                } else if n == 0 || errno != EAGAIN {
                    if n < 0 || received[i] != 4 { problems.append("after \(received[i]) bytes: \(n == 0 ? "EOF" : "\(Errno.current)")") }
                    open.remove(i)
                }
            }
        }
        problems += open.map { "timed out after \(received[$0]) bytes" }
        for fd in fds { close(fd) }
        return problems
    }

    @Test("a burst of 64 connections at once, eight times: every one is echoed, none is reset")
    func burstIsEchoed() throws {
        let port = TestSockets.freePorts(1).lowerBound
        let echo = try #require(EchoServer(port: port))
        defer { echo.stop() }
        var problems: [String] = []
        for _ in 0..<8 { problems += Self.burst(port: port, count: 64) }
        #expect(problems.isEmpty, "\(problems.count) of \(8 * 64) connections: \(Set(problems))")
    }
}

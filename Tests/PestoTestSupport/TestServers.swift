// SPDX-License-Identifier: GPL-2.0-or-later

// Test servers and traffic: real sockets, plain threads, bounded in time.

import CPestoSys
import PestoEngine
import PestoModel
import PestoSystem
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// Runs `body` on a new detached thread (traps when no thread can be made).
public func detachThread(_ body: @escaping @Sendable () -> Void) {
    final class Box: @unchecked Sendable {
        let body: @Sendable () -> Void
        init(_ b: @escaping @Sendable () -> Void) { body = b }
    }
    var tid = pthread_t()
    let box = Unmanaged.passRetained(Box(body)).toOpaque()
    let rc = pthread_create(
        &tid, nil,
        { arg in
            Unmanaged<Box>.fromOpaque(arg!).takeRetainedValue().body()
            return nil
        }, box)
    precondition(rc == 0, "pthread_create: \(Errno(rawValue: rc))")
    pthread_detach(tid)
}

/// A TCP echo server on its own threads: every connection gets back what it sends, and a
/// half-close (EOF) is answered with a half-close once everything is echoed.
public final class EchoServer: Sendable {
    /// The listening descriptor (closed by `stop()`).
    public let fd: Int32
    public let port: UInt16
    /// Connections accepted so far.
    public var accepted: Int { acceptedCount.load(ordering: .relaxed) }
    private let acceptedCount = Atomic<Int>(0)
    /// The peer addresses of the connections accepted so far.
    public var peers: [IPAddress] { peerList.withLock { $0 } }
    private let peerList = Mutex<[IPAddress]>([])
    private let stopped = Atomic<Bool>(false)

    /// Listens on `address:port` (the listening socket can come from another namespace via `fd`).
    public init?(address: IPAddress = .loopbackIPv4, port: UInt16, listeningFD: Int32? = nil) {
        guard let fd = listeningFD ?? TestSockets.bound(address: address, port: port) else { return nil }
        // A long backlog: a relay draining its own backlog after a pause (a takeover) connects
        // dozens of clients at once, faster than the one accepting thread takes them. With 16,
        // the queue overflowed under load and the kernel answered with SYN cookies, whose
        // check fails for a FIN that follows a dropped segment: the relay's connection then
        // got a reset from here, which pestod passed on to its client.
        _ = Glibc.listen(fd, SOMAXCONN)
        self.fd = fd
        self.port = port
        let flags = fcntl(fd, F_GETFL)
        _ = fcntl(fd, F_SETFL, flags & ~Int32(PESTO_O_NONBLOCK))
        detachThread { [self] in self.acceptLoop() }
    }

    private func acceptLoop() {
        while !stopped.load(ordering: .relaxed) {
            var peer = SocketAddress()
            let c = peer.withMutableSockaddr { pesto_accept4(fd, $0, $1, Int32(SOCK_CLOEXEC.rawValue)) }
            if c < 0 {
                if errno == EINTR { continue }
                return
            }
            if let address = peer.endpoint?.address { peerList.withLock { $0.append(address) } }
            acceptedCount.add(1, ordering: .relaxed)
            detachThread { EchoServer.echo(c) }
        }
    }

    private static func echo(_ c: Int32) {
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = read(c, &buffer, buffer.count)
            if n <= 0 { break }
            var off = 0
            while off < n {
                let w = buffer.withUnsafeBytes { write(c, $0.baseAddress! + off, n - off) }
                if w <= 0 {
                    close(c)
                    return
                }
                off += w
            }
        }
        shutdown(c, Int32(SHUT_WR))
        // Wait for the peer to finish before closing, so nothing is reset.
        while read(c, &buffer, buffer.count) > 0 {}
        close(c)
    }

    /// Stops accepting (open connections finish on their own).
    public func stop() {
        stopped.store(true, ordering: .relaxed)
        shutdown(fd, Int32(SHUT_RDWR))
        close(fd)
    }
}

/// Client-side traffic checks.
public enum TestTraffic {
    /// The byte at `offset` of the test pattern (period 251, so misplaced chunks show).
    @inline(__always) static func pattern(_ offset: Int) -> UInt8 { UInt8(truncatingIfNeeded: offset % 251) }

    /// Sends `count` pattern bytes to an echo server through `fd`, half-closes, and reads the
    /// echo until EOF, comparing every byte. Returns nil on success, else what went wrong.
    public static func echoRoundTrip(fd: Int32, count: Int, timeoutMilliseconds: Int32 = 30_000) -> String? {
        let flags = fcntl(fd, F_GETFL)
        _ = fcntl(fd, F_SETFL, flags | Int32(PESTO_O_NONBLOCK))
        var out = [UInt8](repeating: 0, count: 65536)
        var inBuf = [UInt8](repeating: 0, count: 65536)
        var sent = 0
        var received = 0
        var shut = false
        let deadline = MonotonicInstant.now.adding(milliseconds: Int(timeoutMilliseconds))
        while true {
            if MonotonicInstant.now > deadline { return "timed out: sent \(sent), received \(received)" }
            var pfd = pollfd(fd: fd, events: Int16(POLLIN) | (sent < count ? Int16(POLLOUT) : 0), revents: 0)
            _ = poll(&pfd, 1, 1000)
            if sent < count && pfd.revents & Int16(POLLOUT) != 0 {
                let chunk = min(out.count, count - sent)
                for k in 0..<chunk { out[k] = pattern(sent + k) }
                let w = out.withUnsafeBytes { send(fd, $0.baseAddress!, chunk, Int32(MSG_NOSIGNAL)) }
                if w > 0 { sent += w } else if errno != EAGAIN { return "send failed: \(Errno.current)" }
            }
            if sent == count && !shut {
                shutdown(fd, Int32(SHUT_WR))
                shut = true
            }
            if pfd.revents & (Int16(POLLIN) | Int16(POLLHUP) | Int16(POLLERR)) != 0 {
                let n = recv(fd, &inBuf, inBuf.count, 0)
                if n == 0 {
                    return received == count ? nil : "EOF after \(received) of \(count) bytes"
                }
                if n < 0 {
                    if errno == EAGAIN { continue }
                    return "recv failed after \(received) bytes: \(Errno.current)"
                }
                for k in 0..<n where inBuf[k] != pattern(received + k) {
                    return "byte \(received + k) differs: got \(inBuf[k]), expected \(pattern(received + k))"
                }
                received += n
            }
        }
    }

    /// Connects, sends four bytes, reads the echo and the EOF; nil on success. The wait is
    /// bounded at 30 s, a bound for a hung relay and not a measure: a relay that just took
    /// over may first serve the connections queued during the handover, and on a loaded CI
    /// machine 5 s were seen to run out behind them.
    public static func ping(_ address: IPAddress = .loopbackIPv4, port: UInt16) -> String? {
        guard case .success(let fd) = TestSockets.connect(address, port: port) else { return "connect failed: \(Errno.current)" }
        defer { close(fd) }
        return echoRoundTrip(fd: fd, count: 4, timeoutMilliseconds: 30_000)
    }
}

/// A UDP echo server on its own thread; remembers the source ports it saw.
public final class UDPEchoServer: Sendable {
    public let fd: Int32
    public let port: UInt16
    private let sources = Mutex<[UInt16]>([])
    private let stopped = Atomic<Bool>(false)

    /// The distinct source ports seen so far, in order of first appearance.
    public var sourcePorts: [UInt16] { sources.withLock { $0 } }

    /// Binds `address:port` (or serves `boundFD`, a socket made elsewhere, e.g. in a namespace).
    public init?(address: IPAddress = .loopbackIPv4, port: UInt16, boundFD: Int32? = nil) {
        guard let fd = boundFD ?? TestSockets.bound(Int32(SOCK_DGRAM.rawValue), address: address, port: port, listen: false) else {
            return nil
        }
        self.fd = fd
        self.port = port
        var tv = timeval(tv_sec: 0, tv_usec: 200_000)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        detachThread { [self] in self.serve() }
    }

    private func serve() {
        var buffer = [UInt8](repeating: 0, count: 65536)
        while !stopped.load(ordering: .relaxed) {
            var peer = SocketAddress()
            let n = peer.withMutableSockaddr { sa, len in recvfrom(fd, &buffer, buffer.count, 0, sa, len) }
            if n < 0 { continue }  // timeout: check `stopped`
            if let p = peer.endpoint?.port { sources.withLock { if !$0.contains(p) { $0.append(p) } } }
            _ = peer.withSockaddr { sa, len in sendto(fd, buffer, n, 0, sa, len) }
        }
        close(fd)
    }

    /// Stops serving (the socket is closed by the server thread).
    public func stop() { stopped.store(true, ordering: .relaxed) }
}

extension TestTraffic {
    /// Sends `payload` from `fd` (a UDP socket) to `port` and waits up to 5 s for the answer;
    /// returns the answer and the port it came from.
    public static func udpExchange(fd: Int32, address: IPAddress = .loopbackIPv4, port: UInt16, payload: [UInt8]) -> (
        reply: [UInt8], from: UInt16
    )? {
        let to = SocketAddress(address, port: port)
        guard to.withSockaddr({ sa, len in sendto(fd, payload, payload.count, 0, sa, len) }) == payload.count else { return nil }
        var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        guard poll(&pfd, 1, 5000) == 1 else { return nil }
        var buffer = [UInt8](repeating: 0, count: 65536)
        var from = SocketAddress()
        let n = from.withMutableSockaddr { sa, len in recvfrom(fd, &buffer, buffer.count, 0, sa, len) }
        guard n >= 0, let port = from.endpoint?.port else { return nil }
        return (Array(buffer[..<n]), port)
    }

    /// A UDP socket bound to an ephemeral port on `address`.
    public static func udpClient(_ address: IPAddress = .loopbackIPv4) -> Int32? {
        TestSockets.bound(Int32(SOCK_DGRAM.rawValue), address: address, port: 0, listen: false)
    }
}

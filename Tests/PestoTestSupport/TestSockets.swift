// SPDX-License-Identifier: GPL-2.0-or-later

// Test helpers: real sockets on loopback, free-port discovery, descriptor identity.

import CPestoSys
import PestoEngine
import PestoModel
import PestoSystem
import Synchronization
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// Small socket utilities for tests. All of them use real kernel sockets on loopback.
public enum TestSockets {
    /// Binds a socket of `type` to `address:port`; returns the fd or nil (and closes) on failure.
    public static func bound(
        _ type: Int32 = Int32(SOCK_STREAM.rawValue), address: IPAddress = .loopbackIPv4, port: UInt16, listen: Bool = true
    ) -> Int32? {
        let domain = address.family.socketDomain
        let fd = socket(domain, type | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return nil }
        if domain == AF_INET6 {
            var one: Int32 = 1
            setsockopt(fd, Int32(IPPROTO_IPV6), IPV6_V6ONLY, &one, socklen_t(MemoryLayout<Int32>.size))
        }
        if !withSocketAddress(address, port, { Glibc.bind(fd, $0, $1) == 0 }) {
            close(fd)
            return nil
        }
        if listen && type == Int32(SOCK_STREAM.rawValue) && Glibc.listen(fd, 16) != 0 {
            close(fd)
            return nil
        }
        return fd
    }

    /// The next port to hand out: every test in the process gets ports of its own, so tests
    /// running in parallel never race for the same port.
    private static let nextPort = Mutex<UInt16>(UInt16.random(in: 20_000...24_000))

    /// A run of `count` consecutive ports that are free for TCP and UDP on loopback right now,
    /// and that no other test of this process has been given.
    public static func freePorts(_ count: Int = 1) -> ClosedRange<UInt16> {
        for _ in 0..<500 {
            let base = nextPort.withLock { next -> UInt16 in
                if Int(next) + count > 32_000 { next = 20_000 }
                defer { next += UInt16(count) }
                return next
            }
            let range = base...(base + UInt16(count) - 1)
            if range.allSatisfy(isFree) { return range }
        }
        Issue.record("no free port range of \(count) found")
        return 1...1
    }

    /// True when nothing holds `port` for TCP or UDP on any address.
    public static func isFree(_ port: UInt16) -> Bool {
        for type in [Int32(SOCK_STREAM.rawValue), Int32(SOCK_DGRAM.rawValue)] {
            guard let fd = bound(type, address: .anyIPv6, port: port, listen: false) else { return false }
            close(fd)
            guard let fd4 = bound(type, address: .anyIPv4, port: port, listen: false) else { return false }
            close(fd4)
        }
        return true
    }

    /// Connects a TCP socket to `address:port` (blocking); returns the fd, or the errno.
    /// With `source`, the socket is bound to that address first (IP_BIND_ADDRESS_NO_PORT: the
    /// connect picks the port, so each source address has its own ephemeral ports); with
    /// `timeoutMilliseconds`, the connect, sends and receives give up after it (EAGAIN).
    public static func connect(
        _ address: IPAddress = .loopbackIPv4, port: UInt16, from source: IPAddress? = nil,
        timeoutMilliseconds: Int? = nil, noDelay: Bool = false
    ) -> Result<Int32, Errno> {
        let domain = address.family.socketDomain
        let fd = socket(domain, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return .failure(.current) }
        if let timeoutMilliseconds { setTimeouts(fd, milliseconds: timeoutMilliseconds) }
        if noDelay { setOption(fd, level: Int32(IPPROTO_TCP), name: TCP_NODELAY, 1) }
        if let source {
            setOption(fd, level: Int32(IPPROTO_IP), name: Int32(PESTO_IP_BIND_ADDRESS_NO_PORT), 1)
            if !withSocketAddress(source, 0, { Glibc.bind(fd, $0, $1) == 0 }) {
                let e = Errno.current
                close(fd)
                return .failure(e)
            }
        }
        if !withSocketAddress(address, port, { Glibc.connect(fd, $0, $1) == 0 }) {
            let e = Errno.current
            close(fd)
            return .failure(e)
        }
        return .success(fd)
    }

    /// Sets the receive and send timeouts of `fd` (SO_SNDTIMEO also bounds connect()).
    public static func setTimeouts(_ fd: Int32, milliseconds: Int) {
        var tv = timeval(tv_sec: milliseconds / 1000, tv_usec: (milliseconds % 1000) * 1000)
        let size = socklen_t(MemoryLayout<timeval>.size)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, size)
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, size)
    }

    /// Sets an `Int32` socket option of `fd`.
    public static func setOption(_ fd: Int32, level: Int32, name: Int32, _ value: Int32) {
        var v = value
        setsockopt(fd, level, name, &v, socklen_t(MemoryLayout<Int32>.size))
    }

    /// How a connection to `port` ends when the peer sends nothing: connects, waits up to 5 s
    /// for the socket to become readable, and reads one byte. `.success(0)` is an orderly end
    /// of file, `.failure(ECONNRESET)` a reset; nil when the connect itself failed.
    public static func firstRead(port: UInt16) -> Result<Int, Errno>? {
        guard case .success(let fd) = connect(port: port) else { return nil }
        defer { close(fd) }
        var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        guard poll(&pfd, 1, 5_000) == 1 else { return .failure(Errno(rawValue: ETIMEDOUT)) }
        var byte: UInt8 = 0
        let n = read(fd, &byte, 1)
        return n >= 0 ? .success(n) : .failure(.current)
    }

    /// Calls `body` with a sockaddr for `address:port` (IPv4 or IPv6) and its length.
    public static func withSocketAddress(_ address: IPAddress, _ port: UInt16, _ body: (UnsafePointer<sockaddr>, socklen_t) -> Bool) -> Bool
    {
        SocketAddress(address, port: port).withSockaddr(body)
    }

    /// Connects to `port`, accepts the connection on `listener` (a non-blocking listening fd)
    /// and closes both ends. True when the whole exchange worked.
    public static func connectAndAccept(listener: Int32, address: IPAddress = .loopbackIPv4, port: UInt16) -> Bool {
        guard case .success(let client) = connect(address, port: port) else { return false }
        defer { close(client) }
        var pfd = pollfd(fd: listener, events: Int16(POLLIN), revents: 0)
        guard poll(&pfd, 1, 5_000) == 1 else { return false }
        let server = pesto_accept4(listener, nil, nil, Int32(SOCK_CLOEXEC.rawValue))
        guard server >= 0 else { return false }
        close(server)
        return true
    }

    /// The inode number of the object behind `fd` (the socket's identity).
    public static func inode(_ fd: Int32) -> UInt64? {
        var st = stat()
        guard fstat(fd, &st) == 0 else { return nil }
        return UInt64(st.st_ino)
    }

    /// An `Int32` socket option of `fd`.
    public static func option(_ fd: Int32, level: Int32, name: Int32) -> Int32? {
        var value: Int32 = 0
        var len = socklen_t(MemoryLayout<Int32>.size)
        guard getsockopt(fd, level, name, &value, &len) == 0 else { return nil }
        return value
    }

    /// The socket's domain (`AF_INET`/`AF_INET6`).
    public static func domain(_ fd: Int32) -> Int32? { option(fd, level: SOL_SOCKET, name: SO_DOMAIN) }

}

/// A factory that records calls and can be told to fail, for paths the kernel rarely takes.
public final class ScriptedListenerFactory: ListenerFactory {
    public init() {}

    /// The real factory behind it.
    let real = KernelListenerFactory(families: [.ipv4, .ipv6])
    /// Calls to `openListener` so far.
    public var opens = 0
    /// Fail with this errno once `opens` exceeds `succeedFirst`.
    public var failure: Errno?
    public var succeedFirst = Int.max
    /// Descriptors closed through the factory.
    public var closed: [Int32] = []
    /// Descriptors opened through the factory.
    public var opened: [Int32] = []

    public func openListener(for rule: Rule, port: UInt16) -> Result<Int32, Errno> {
        opens += 1
        if let failure, opens > succeedFirst { return .failure(failure) }
        let result = real.openListener(for: rule, port: port)
        if case .success(let fd) = result { opened.append(fd) }
        return result
    }

    public func closeListener(_ fd: Int32) {
        closed.append(fd)
        real.closeListener(fd)
    }
}

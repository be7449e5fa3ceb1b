// Test helpers: real sockets on loopback, free-port discovery, descriptor identity.

import CPestoSys
import Testing

@testable import PestoEngine

#if canImport(Glibc)
import Glibc
#endif

/// Small socket utilities for tests. All of them use real kernel sockets on loopback.
enum TestSockets {
    /// Binds a socket of `type` to `address:port`; returns the fd or nil (and closes) on failure.
    static func bound(_ type: Int32 = Int32(SOCK_STREAM.rawValue), address: IPAddress = .loopbackIPv4, port: UInt16, listen: Bool = true) -> Int32? {
        let domain = address.family.socketDomain
        let fd = socket(domain, type | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return nil }
        if domain == AF_INET6 {
            var one: Int32 = 1
            setsockopt(fd, Int32(IPPROTO_IPV6), IPV6_V6ONLY, &one, socklen_t(MemoryLayout<Int32>.size))
        }
        if case .failure = Sys.bind(fd, domain: domain, address: address, port: port) {
            close(fd)
            return nil
        }
        if listen && type == Int32(SOCK_STREAM.rawValue) && Glibc.listen(fd, 16) != 0 {
            close(fd)
            return nil
        }
        return fd
    }

    /// A run of `count` consecutive ports that are free for TCP and UDP on loopback right now.
    static func freePorts(_ count: Int = 1) -> ClosedRange<UInt16> {
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<500 {
            let base = UInt16.random(in: 20_000...(32_000 - UInt16(count)), using: &generator)
            let range = base...(base + UInt16(count) - 1)
            if range.allSatisfy(isFree) { return range }
        }
        Issue.record("no free port range of \(count) found")
        return 1...1
    }

    /// True when nothing holds `port` for TCP or UDP on any address.
    static func isFree(_ port: UInt16) -> Bool {
        for type in [Int32(SOCK_STREAM.rawValue), Int32(SOCK_DGRAM.rawValue)] {
            guard let fd = bound(type, address: .anyIPv6, port: port, listen: false) else { return false }
            close(fd)
            guard let fd4 = bound(type, address: .anyIPv4, port: port, listen: false) else { return false }
            close(fd4)
        }
        return true
    }

    /// Connects a TCP socket to `address:port` (blocking); returns the fd, or the errno.
    static func connect(_ address: IPAddress = .loopbackIPv4, port: UInt16) -> Result<Int32, Errno> {
        let domain = address.family.socketDomain
        let fd = socket(domain, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return .failure(.current) }
        let r: Int32
        if let a4 = address.in4 {
            var sa = sockaddr_in()
            sa.sin_family = sa_family_t(AF_INET)
            sa.sin_port = port.bigEndian
            sa.sin_addr = a4
            r = withUnsafePointer(to: &sa) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        } else {
            var sa = sockaddr_in6()
            sa.sin6_family = sa_family_t(AF_INET6)
            sa.sin6_port = port.bigEndian
            sa.sin6_addr = address.in6
            r = withUnsafePointer(to: &sa) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in6>.size)) } }
        }
        if r != 0 {
            let e = Errno.current
            close(fd)
            return .failure(e)
        }
        return .success(fd)
    }

    /// Connects to `port`, accepts the connection on `listener` (a non-blocking listening fd)
    /// and closes both ends. True when the whole exchange worked.
    static func connectAndAccept(listener: Int32, address: IPAddress = .loopbackIPv4, port: UInt16) -> Bool {
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
    static func inode(_ fd: Int32) -> UInt64? {
        var st = stat()
        guard fstat(fd, &st) == 0 else { return nil }
        return UInt64(st.st_ino)
    }

    /// An `Int32` socket option of `fd`.
    static func option(_ fd: Int32, level: Int32, name: Int32) -> Int32? {
        var value: Int32 = 0
        var len = socklen_t(MemoryLayout<Int32>.size)
        guard getsockopt(fd, level, name, &value, &len) == 0 else { return nil }
        return value
    }

    /// The socket's domain (`AF_INET`/`AF_INET6`).
    static func domain(_ fd: Int32) -> Int32? { option(fd, level: SOL_SOCKET, name: SO_DOMAIN) }

}

/// A factory that records calls and can be told to fail, for paths the kernel rarely takes.
final class ScriptedListenerFactory: ListenerFactory {
    /// The real factory behind it.
    let real = KernelListenerFactory(families: [.ipv4, .ipv6])
    /// Calls to `openListener` so far.
    var opens = 0
    /// Fail with this errno once `opens` exceeds `succeedFirst`.
    var failure: Errno?
    var succeedFirst = Int.max
    /// Descriptors closed through the factory.
    var closed: [Int32] = []
    /// Descriptors opened through the factory.
    var opened: [Int32] = []

    func openListener(for rule: Rule, port: UInt16) -> Result<Int32, Errno> {
        opens += 1
        if let failure, opens > succeedFirst { return .failure(failure) }
        let result = real.openListener(for: rule, port: port)
        if case .success(let fd) = result { opened.append(fd) }
        return result
    }

    func closeListener(_ fd: Int32) {
        closed.append(fd)
        real.closeListener(fd)
    }
}

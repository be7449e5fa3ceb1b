// SPDX-License-Identifier: GPL-2.0-or-later

// Syscalls: the one funnel through which the engine calls the kernel.
//
// Each wrapper returns `Result<T, Errno>`, retries EINTR where the call is restartable, and
// traps on errnos that can only mean a bug in this program (EBADF, EFAULT): those are
// programmer errors, not conditions of the environment.

import PestoModel
import CPestoSys

#if canImport(Glibc)
import Glibc
#endif

/// Raw system calls used by the engine, each returning the kernel's errno as a value.
enum Sys {
    /// Runs `body` until it returns something other than -1/EINTR; -1 becomes `.failure(errno)`.
    @inline(__always)
    static func call<T: BinaryInteger>(retryOnInterrupt: Bool = true, _ body: () -> T) -> Result<T, Errno> {
        while true {
            let r = body()
            if r != -1 { return .success(r) }
            let e = Errno.current
            if e == .interrupted && retryOnInterrupt { continue }
            precondition(e != .badFileDescriptor && e != .badAddress, "programmer error: \(e)")
            return .failure(e)
        }
    }

    /// `socket(2)` with close-on-exec and non-blocking set atomically.
    static func socket(domain: Int32, type: Int32) -> Result<Int32, Errno> {
        let flags = Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue)
        return call { Glibc.socket(domain, type | flags, 0) }
    }

    /// `setsockopt(2)` for an `Int32` option value.
    static func setOption(_ fd: Int32, level: Int32, name: Int32, value: Int32) -> Result<Void, Errno> {
        var v = value
        return call { Glibc.setsockopt(fd, level, name, &v, socklen_t(MemoryLayout<Int32>.size)) }.map { _ in () }
    }

    /// `setsockopt(SO_BINDTODEVICE)`.
    static func bindToDevice(_ fd: Int32, interface: String) -> Result<Void, Errno> {
        var bytes = Array(interface.utf8)
        bytes.append(0)
        return call { Glibc.setsockopt(fd, SOL_SOCKET, SO_BINDTODEVICE, &bytes, socklen_t(bytes.count)) }
            .map { _ in () }
    }

    /// `bind(2)` to an address and port; IPv4 addresses on an IPv6 socket are given IPv4-mapped.
    static func bind(_ fd: Int32, domain: Int32, address: IPAddress, port: UInt16) -> Result<Void, Errno> {
        SocketAddress(address, port: port, mappedIPv6: domain == AF_INET6)
            .withSockaddr { sa, len in call { Glibc.bind(fd, sa, len) } }
            .map { _ in () }
    }

    /// `listen(2)`.
    static func listen(_ fd: Int32, backlog: Int32) -> Result<Void, Errno> {
        call { Glibc.listen(fd, backlog) }.map { _ in () }
    }

    /// `close(2)`. EINTR is not retried: on Linux the descriptor is gone either way.
    static func close(_ fd: Int32) {
        let r = Glibc.close(fd)
        if r == -1 {
            let e = Errno.current
            precondition(e != .badFileDescriptor, "programmer error: close(\(fd)) gave EBADF")
        }
    }
}

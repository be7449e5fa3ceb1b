// SPDX-License-Identifier: GPL-2.0-or-later

// ProcessSockets: the listening sockets another process holds, asked of the sockets themselves.
//
// Each of the process's descriptors is copied into this process with pidfd_getfd(2) and asked
// with getsockopt/getsockname/fstat. Reading /proc/PID/net/{tcp,udp}[6] instead is not
// reliable on a busy host: the kernel produces those files in pieces, and while the machine's
// socket tables change (other tests, benchmarks holding thousands of listeners) a read can
// skip entries, so a listener that exists goes missing from a snapshot.

import CPestoSys
import PestoEngine
import PestoModel
import PestoSystem

#if canImport(Glibc)
    import Glibc
#endif

/// One listening TCP socket or unconnected (bound) UDP socket of a process.
public struct ListeningSocket: Hashable, Sendable, CustomStringConvertible {
    /// `tcp` or `udp`.
    public var proto: String
    /// True for an AF_INET6 socket.
    public var ipv6: Bool
    /// The bound address, as text.
    public var address: String
    /// The bound port.
    public var port: UInt16
    /// The socket's inode: the same socket keeps it, a new one gets another.
    public var inode: UInt64

    /// `tcp6 [::]:20000 #12345`.
    public var description: String {
        "\(proto)\(ipv6 ? "6" : "") \(ipv6 ? "[\(address)]" : address):\(port) #\(inode)"
    }
}

/// Reads another process's listening sockets.
public enum ProcessSockets {
    /// The listening TCP and unconnected UDP sockets of `pid`, sorted by their description;
    /// nil when the process cannot be inspected (gone, or pidfd not supported).
    public static func listening(pid: Int32) -> [ListeningSocket]? {
        let pidfd = pesto_pidfd_open(pid)
        guard pidfd >= 0 else { return nil }
        defer { close(pidfd) }
        var result: [ListeningSocket] = []
        for number in socketDescriptors(pid: pid) {
            let fd = pesto_pidfd_getfd(pidfd, number)
            guard fd >= 0 else { continue }  // closed meanwhile
            defer { close(fd) }
            if let socket = describe(fd) { result.append(socket) }
        }
        return result.sorted { $0.description < $1.description }
    }

    /// The descriptors of `pid` that are sockets (their /proc/PID/fd links read `socket:[…]`).
    static func socketDescriptors(pid: Int32) -> [Int32] {
        ProcessDescriptors.list(pid: pid).filter { $0.target.hasPrefix("socket:[") }.map(\.number)
    }

    /// What `fd` is, when it is a listening TCP socket or an unconnected UDP socket.
    static func describe(_ fd: Int32) -> ListeningSocket? {
        guard let domain = TestSockets.option(fd, level: SOL_SOCKET, name: SO_DOMAIN), domain == AF_INET || domain == AF_INET6,
            let type = TestSockets.option(fd, level: SOL_SOCKET, name: SO_TYPE)
        else { return nil }
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let tcp = type == Int32(SOCK_STREAM.rawValue)
        if tcp {
            guard TestSockets.option(fd, level: SOL_SOCKET, name: SO_ACCEPTCONN) == 1 else { return nil }
        } else {
            // A connected UDP socket (a relayed flow's) is not a listener.
            let connected = withUnsafeMutablePointer(to: &storage) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getpeername(fd, $0, &length) }
            }
            if connected == 0 { return nil }
            length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        }
        let named = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        guard named == 0 else { return nil }
        var st = stat()
        guard fstat(fd, &st) == 0 else { return nil }
        let port = withUnsafeBytes(of: &storage) { UInt16($0[2]) << 8 | UInt16($0[3]) }  // sin_port / sin6_port, network order
        var text = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
        withUnsafeBytes(of: &storage) { raw in
            // sin_addr at offset 4, sin6_addr at offset 8.
            let offset = domain == AF_INET6 ? 8 : 4
            _ = inet_ntop(domain, raw.baseAddress! + offset, &text, socklen_t(text.count))
        }
        let address = String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return ListeningSocket(proto: tcp ? "tcp" : "udp", ipv6: domain == AF_INET6, address: address, port: port, inode: UInt64(st.st_ino))
    }
}

/// Another process's open descriptors, from /proc/PID/fd.
public enum ProcessDescriptors {
    /// Every descriptor of `pid` with what its /proc/PID/fd link reads (`socket:[123]`, a
    /// path, `pipe:[456]`…), by number; empty when the process cannot be inspected.
    public static func list(pid: Int32) -> [(number: Int32, target: String)] {
        let dir = "/proc/\(pid)/fd"
        guard let stream = opendir(dir) else { return [] }
        defer { closedir(stream) }
        var result: [(number: Int32, target: String)] = []
        var link = [CChar](repeating: 0, count: 4096)
        while let entry = readdir(stream) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            guard let number = Int32(name) else { continue }
            let n = readlink("\(dir)/\(name)", &link, link.count - 1)
            guard n > 0 else { continue }  // closed meanwhile
            result.append((number, String(decoding: link[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)))
        }
        return result.sorted { $0.number < $1.number }
    }

    /// How many descriptors `pid` has open.
    public static func count(pid: Int32) -> Int { list(pid: pid).count }
}

// SPDX-License-Identifier: GPL-2.0-or-later

// SocketAddress: a kernel socket address (IPv4 or IPv6) as a value, without allocation.

import PestoModel

#if canImport(Glibc)
    import Glibc
#endif

/// A `sockaddr_in` or `sockaddr_in6` held in a `sockaddr_storage`.
public struct SocketAddress: Sendable {
    /// The raw storage.
    public var storage = sockaddr_storage()
    /// How many bytes of `storage` are the address.
    public var length: socklen_t = socklen_t(MemoryLayout<sockaddr_storage>.size)

    /// An empty address, to be filled in by recvfrom/accept/getsockname.
    public init() {}

    /// The address of `ip:port`; IPv4 as `sockaddr_in` unless `mappedIPv6` asks for the
    /// IPv4-mapped `sockaddr_in6` (for an IPv6 socket).
    public init(_ ip: IPAddress, port: UInt16, mappedIPv6: Bool = false) {
        if let a4 = ip.in4, !mappedIPv6 {
            withUnsafeMutableBytes(of: &storage) { raw in
                let sa = raw.baseAddress!.assumingMemoryBound(to: sockaddr_in.self)
                sa.pointee.sin_family = sa_family_t(AF_INET)
                sa.pointee.sin_port = port.bigEndian
                sa.pointee.sin_addr = a4
            }
            length = socklen_t(MemoryLayout<sockaddr_in>.size)
        } else {
            withUnsafeMutableBytes(of: &storage) { raw in
                let sa = raw.baseAddress!.assumingMemoryBound(to: sockaddr_in6.self)
                sa.pointee.sin6_family = sa_family_t(AF_INET6)
                sa.pointee.sin6_port = port.bigEndian
                sa.pointee.sin6_addr = ip.in6
            }
            length = socklen_t(MemoryLayout<sockaddr_in6>.size)
        }
    }

    /// The address of a UNIX socket at `path`; a leading "@" names the abstract namespace
    /// (as $NOTIFY_SOCKET does). Nil when the path is empty or too long (107 bytes at most).
    public init?(unixPath path: String) {
        var bytes = Array(path.utf8)
        let capacity = MemoryLayout.size(ofValue: sockaddr_un().sun_path)
        guard !bytes.isEmpty, bytes.count < capacity else { return nil }
        let abstract = bytes[0] == UInt8(ascii: "@")
        if abstract { bytes[0] = 0 }
        withUnsafeMutableBytes(of: &storage) { raw in
            let sa = raw.baseAddress!.assumingMemoryBound(to: sockaddr_un.self)
            sa.pointee.sun_family = sa_family_t(AF_UNIX)
            withUnsafeMutableBytes(of: &sa.pointee.sun_path) { path in
                for (i, b) in bytes.enumerated() { path[i] = b }
            }
        }
        // Abstract names are exactly as long as given; a path is NUL-terminated.
        length = socklen_t(MemoryLayout<sa_family_t>.size + bytes.count + (abstract ? 0 : 1))
    }

    /// AF_INET or AF_INET6 (or 0 when empty).
    public var family: Int32 { Int32(storage.ss_family) }

    /// The IP address (IPv4-mapped IPv6 comes back as IPv4) and port; nil for other families.
    public var endpoint: (address: IPAddress, port: UInt16)? {
        withUnsafeBytes(of: storage) { raw in
            switch family {
            case AF_INET:
                let sa = raw.load(as: sockaddr_in.self)
                return (.v4(UInt32(bigEndian: sa.sin_addr.s_addr)), UInt16(bigEndian: sa.sin_port))
            case AF_INET6:
                let sa = raw.load(as: sockaddr_in6.self)
                return (IPAddress(in6: sa.sin6_addr), UInt16(bigEndian: sa.sin6_port))
            default:
                return nil
            }
        }
    }

    /// Calls `body` with the address as `sockaddr` and its length.
    public func withSockaddr<T>(_ body: (UnsafePointer<sockaddr>, socklen_t) -> T) -> T {
        withUnsafeBytes(of: storage) { raw in
            body(raw.baseAddress!.assumingMemoryBound(to: sockaddr.self), length)
        }
    }

    /// Calls `body` with writable storage (for recvfrom/accept/getsockname) and its length.
    public mutating func withMutableSockaddr<T>(_ body: (UnsafeMutablePointer<sockaddr>, UnsafeMutablePointer<socklen_t>) -> T) -> T {
        length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        var len = length
        let result = withUnsafeMutableBytes(of: &storage) { raw in
            body(raw.baseAddress!.assumingMemoryBound(to: sockaddr.self), &len)
        }
        length = len
        return result
    }
}

extension SocketAddress: Equatable {
    /// Same family, address and port (what identifies a UDP peer).
    public static func == (a: SocketAddress, b: SocketAddress) -> Bool {
        guard let x = a.endpoint, let y = b.endpoint else { return false }
        return x.address == y.address && x.port == y.port
    }
}

extension SocketAddress: Hashable {
    public func hash(into hasher: inout Hasher) {
        if let e = endpoint {
            hasher.combine(e.address)
            hasher.combine(e.port)
        }
    }
}

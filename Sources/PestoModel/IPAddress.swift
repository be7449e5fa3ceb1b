// SPDX-License-Identifier: GPL-2.0-or-later

// IPAddress: an IPv4 or IPv6 address as a value, parsed and printed by the C library.

#if canImport(Glibc)
    import Glibc
#endif

/// An address family the engine can listen on or forward to.
public enum AddressFamily: Sendable, Hashable, CustomStringConvertible {
    case ipv4
    case ipv6

    /// The `AF_*` constant for `socket(2)`.
    public var socketDomain: Int32 { self == .ipv4 ? AF_INET : AF_INET6 }

    public var description: String { self == .ipv4 ? "IPv4" : "IPv6" }
}

/// An IPv4 or IPv6 address.
///
/// IPv4 is kept as a host-order `UInt32`, IPv6 as two host-order halves of the 128-bit value,
/// so comparisons and hashing are plain integer work. IPv4-mapped IPv6 text
/// (`::ffff:192.0.2.1`) parses to the IPv4 address it maps: the two spell the same peer.
public enum IPAddress: Hashable, Sendable, CustomStringConvertible {
    case v4(UInt32)
    case v6(UInt64, UInt64)

    /// `0.0.0.0`.
    public static let anyIPv4 = IPAddress.v4(0)
    /// `::`.
    public static let anyIPv6 = IPAddress.v6(0, 0)
    /// `127.0.0.1`.
    public static let loopbackIPv4 = IPAddress.v4(0x7F00_0001)
    /// `::1`.
    public static let loopbackIPv6 = IPAddress.v6(0, 1)

    /// Parses IPv4 dotted-quad or IPv6 text (without brackets or zone); nil when it is neither.
    public init?(_ text: String) {
        if text.isEmpty || text.utf8.count > 64 { return nil }
        var a4 = in_addr()
        if inet_pton(AF_INET, text, &a4) == 1 {
            self = .v4(UInt32(bigEndian: a4.s_addr))
            return
        }
        var a6 = in6_addr()
        guard inet_pton(AF_INET6, text, &a6) == 1 else { return nil }
        self.init(in6: a6)
    }

    /// Wraps a kernel `in6_addr`, turning IPv4-mapped addresses into IPv4.
    public init(in6 a6: in6_addr) {
        var bytes = a6
        let (hi, lo) = withUnsafeBytes(of: &bytes) { raw -> (UInt64, UInt64) in
            (
                UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: 0, as: UInt64.self)),
                UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
            )
        }
        if hi == 0 && lo >> 32 == 0xFFFF {
            self = .v4(UInt32(truncatingIfNeeded: lo))
        } else {
            self = .v6(hi, lo)
        }
    }

    /// The address family.
    public var family: AddressFamily {
        if case .v4 = self { return .ipv4 }
        return .ipv6
    }

    /// True for `0.0.0.0` and `::`.
    public var isUnspecified: Bool { self == .anyIPv4 || self == .anyIPv6 }

    /// True for 255.255.255.255, the IPv4 limited broadcast address.
    public var isLimitedBroadcast: Bool { self == .v4(0xFFFF_FFFF) }

    /// True for 224.0.0.0/4 and ff00::/8.
    public var isMulticast: Bool {
        switch self {
        case .v4(let a): return a >> 28 == 0xE
        case .v6(let hi, _): return hi >> 56 == 0xFF
        }
    }

    /// The kernel's `in_addr` (IPv4 only).
    public var in4: in_addr? {
        guard case .v4(let a) = self else { return nil }
        return in_addr(s_addr: a.bigEndian)
    }

    /// The kernel's `in6_addr`; IPv4 addresses are given in their IPv4-mapped form.
    public var in6: in6_addr {
        var result = in6_addr()
        let (hi, lo): (UInt64, UInt64)
        switch self {
        case .v4(let a): (hi, lo) = (0, 0xFFFF_0000_0000 | UInt64(a))
        case .v6(let h, let l): (hi, lo) = (h, l)
        }
        withUnsafeMutableBytes(of: &result) { raw in
            raw.storeBytes(of: hi.bigEndian, toByteOffset: 0, as: UInt64.self)
            raw.storeBytes(of: lo.bigEndian, toByteOffset: 8, as: UInt64.self)
        }
        return result
    }

    /// The canonical text form (`inet_ntop(3)`).
    public var description: String {
        var buffer = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
        switch self {
        case .v4:
            var a = in4!
            _ = inet_ntop(AF_INET, &a, &buffer, socklen_t(buffer.count))
        case .v6:
            var a = in6
            _ = inet_ntop(AF_INET6, &a, &buffer, socklen_t(buffer.count))
        }
        return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

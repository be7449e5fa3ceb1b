// SPDX-License-Identifier: GPL-2.0-or-later

// PacketInfo: the local end of a UDP datagram (IP_PKTINFO / IPV6_PKTINFO), as a value.

import CPestoSys
import PestoModel

#if canImport(Glibc)
    import Glibc
#endif

/// Where a datagram arrived: the local address it was sent to and the interface it came in
/// on; a reply given the same leaves from that address. A value without
/// allocation, so the UDP relay can keep one per flow and key flows by it.
public struct PacketInfo: Hashable, Sendable {
    /// The local address the datagram was sent to (IPv4-mapped comes back as IPv4); nil when
    /// the socket did not ask for it (no IP_PKTINFO / IPV6_RECVPKTINFO).
    public var address: IPAddress?
    /// The index of the interface it came in on (0: unknown).
    public var interface: Int32

    /// No local end: replies leave from wherever the kernel's route lookup picks.
    public init() {
        address = nil
        interface = 0
    }

    /// The local end `address` on interface `interface`.
    public init(address: IPAddress, interface: Int32) {
        self.address = address
        self.interface = interface
    }

    /// From the C shim's structure.
    init(_ raw: pesto_pktinfo) {
        var raw = raw
        interface = raw.ifindex
        switch raw.family {
        case AF_INET:
            address = withUnsafeBytes(of: &raw.addr) { .v4(UInt32(bigEndian: $0.loadUnaligned(as: UInt32.self))) }
        case AF_INET6:
            var a6 = in6_addr()
            withUnsafeMutableBytes(of: &a6) { dst in withUnsafeBytes(of: &raw.addr) { dst.copyMemory(from: $0) } }
            address = IPAddress(in6: a6)
        default:
            address = nil
            interface = 0
        }
    }

    /// The C shim's structure (family 0 when there is no address).
    var raw: pesto_pktinfo {
        var raw = pesto_pktinfo()
        raw.ifindex = interface
        switch address {
        case .v4(let bits)?:
            raw.family = AF_INET
            withUnsafeMutableBytes(of: &raw.addr) { $0.storeBytes(of: bits.bigEndian, as: UInt32.self) }
        case .v6?:
            raw.family = AF_INET6
            var a6 = address!.in6
            withUnsafeMutableBytes(of: &raw.addr) { dst in withUnsafeBytes(of: &a6) { dst.copyMemory(from: $0) } }
        case nil:
            raw.family = 0
        }
        return raw
    }
}

extension Sys {
    /// Asks the kernel to tell, with every datagram received on the UDP socket `fd` of
    /// `domain`, where it arrived (IP_PKTINFO on AF_INET, IPV6_RECVPKTINFO on AF_INET6, which
    /// covers the IPv4 datagrams of a dual-stack socket too, IPv4-mapped).
    package static func receivePacketInfo(_ fd: Int32, domain: Int32) -> Result<Void, Errno> {
        domain == AF_INET6
            ? setOption(fd, level: Int32(IPPROTO_IPV6), name: IPV6_RECVPKTINFO, value: 1)
            : setOption(fd, level: Int32(IPPROTO_IP), name: IP_PKTINFO, value: 1)
    }

    /// `recvmsg(2)` of one datagram: the sender goes to `from`, where it arrived to `local`
    /// (no address unless `receivePacketInfo` was set). Allocates nothing.
    package static func receiveMessage(
        _ fd: Int32, _ bytes: UnsafeMutableRawPointer?, _ count: Int, flags: Int32, from: inout SocketAddress,
        local: inout PacketInfo
    ) -> Result<Int, Errno> {
        var raw = pesto_pktinfo()
        let r = from.withMutableSockaddr { sa, len in call(.recvmsg, fd: fd) { pesto_recv_pktinfo(fd, bytes, count, flags, sa, len, &raw) }
        }
        if case .success = r { local = PacketInfo(raw) }
        return r
    }

    /// `sendmsg(2)` of one datagram to `to`, leaving from `local`'s address (a plain send
    /// from the route's choice when `local` has no address). The interface is given only for
    /// an IPv6 link-local address, which needs it; otherwise the route picks it, as a local
    /// client's datagram to an address of eth0 is reported to arrive on eth0 while its reply
    /// must go through lo. `to`'s family is the socket's.
    package static func sendMessage(
        _ fd: Int32, _ bytes: UnsafeRawPointer?, _ count: Int, flags: Int32, to address: SocketAddress, from local: PacketInfo
    ) -> Result<Int, Errno> {
        var raw = local.raw
        let family = address.family
        return address.withSockaddr { sa, len in
            call(.sendmsg, fd: fd) { pesto_send_pktinfo(fd, bytes, count, flags, sa, len, family, &raw) }
        }
    }
}

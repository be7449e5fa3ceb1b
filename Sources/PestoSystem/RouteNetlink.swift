// SPDX-License-Identifier: GPL-2.0-or-later

// RouteNetlink: the few rtnetlink requests pestod makes for transparent source (policy
// routing rules and local routes in the target namespace), encoded by hand and sent on a
// NETLINK_ROUTE socket.
//
// Theory of operation
// -------------------
// A request is one netlink message: `nlmsghdr` (length, type, flags, sequence, port 0),
// then `rtmsg` (routes) or `fib_rule_hdr` (rules), 12 bytes each, then attributes, each a
// 4-byte header (length, type) and its payload padded to 4 bytes, all in host byte order.
// Every request asks for an acknowledgement (NLM_F_ACK); the kernel handles an rtnetlink
// request inside sendmsg(2), so the answer, an NLMSG_ERROR message whose first field is 0 or
// a negative errno, is already queued when send returns: the socket is read without waiting.
// The encoders are pure (`RouteNetlinkMessage`), unit-tested byte for byte; the constants
// come from CPestoSys, checked there against the kernel's headers. The socket belongs to the
// network namespace it was created in, so a caller opens it inside the target namespace.

import CPestoSys
import PestoModel

#if canImport(Glibc)
    import Glibc
#endif

/// One policy routing rule, as `ip rule` would describe it: `[iif NAME] [ipproto P]
/// [fwmark M/MASK] lookup TABLE pref PRIORITY`.
public struct RoutingRule: Hashable, Sendable {
    /// AF_INET or AF_INET6.
    public var family: Int32
    public var priority: UInt32
    public var table: UInt32
    /// Packets with this mark (under `markMask`), or nil for any mark.
    public var mark: UInt32?
    public var markMask: UInt32 = 0xFFFF_FFFF
    /// Packets from this input interface ("lo" matches locally generated ones), or "" for any.
    public var inputInterface: String = ""
    /// Packets of this IP protocol (IPPROTO_TCP, IPPROTO_UDP), or nil for any.
    public var ipProtocol: UInt8?

    public init(
        family: Int32, priority: UInt32, table: UInt32, mark: UInt32? = nil, inputInterface: String = "", ipProtocol: UInt8? = nil
    ) {
        self.family = family
        self.priority = priority
        self.table = table
        self.mark = mark
        self.inputInterface = inputInterface
        self.ipProtocol = ipProtocol
    }
}

/// One local route: `local PREFIX dev IFINDEX table TABLE [src SOURCE]` (packets to PREFIX
/// are delivered to this host; a socket bound to no address sends to PREFIX from SOURCE).
public struct LocalRoute: Hashable, Sendable {
    /// The destination; with `prefixLength` 0, the whole family (`0.0.0.0/0`, `::/0`).
    public var destination: IPAddress
    public var prefixLength: UInt8
    public var table: UInt32
    /// The output interface's index (the loopback interface is 1 in every namespace).
    public var interfaceIndex: UInt32 = 1
    /// The source address of packets sent to PREFIX by sockets bound to no address (nil:
    /// the kernel's choice, for a local route PREFIX itself).
    public var preferredSource: IPAddress?

    public init(destination: IPAddress, prefixLength: UInt8, table: UInt32, preferredSource: IPAddress? = nil) {
        self.destination = destination
        self.prefixLength = prefixLength
        self.table = table
        self.preferredSource = preferredSource
    }

    /// The family's default local route, `local 0.0.0.0/0` or `local ::/0`.
    public static func all(_ family: AddressFamily, table: UInt32) -> LocalRoute {
        LocalRoute(destination: family == .ipv4 ? .v4(0) : .v6(0, 0), prefixLength: 0, table: table)
    }
}

/// Builds rtnetlink request messages (see the theory of operation at the top of RouteNetlink.swift).
public enum RouteNetlinkMessage {
    /// The message that adds (`add`) or deletes `rule`. An add is exclusive (NLM_F_EXCL): the
    /// kernel answers EEXIST for an identical rule instead of adding a second one.
    public static func rule(_ rule: RoutingRule, add: Bool, sequence: UInt32) -> [UInt8] {
        var m: [UInt8] = []
        encode(rule, add: add, sequence: sequence, into: &m)
        return m
    }

    /// The message that adds (`add`: created or replaced, so adding twice leaves one) or
    /// deletes `route`.
    public static func route(_ route: LocalRoute, add: Bool, sequence: UInt32) -> [UInt8] {
        var m: [UInt8] = []
        encode(route, add: add, sequence: sequence, into: &m)
        return m
    }

    /// `rule(_:add:sequence:)` written into `m` (emptied first, its storage kept: a caller
    /// that reuses one buffer allocates nothing once it has grown).
    public static func encode(_ rule: RoutingRule, add: Bool, sequence: UInt32, into m: inout [UInt8]) {
        header(
            type: add ? PESTO_RTM_NEWRULE : PESTO_RTM_DELRULE,
            flags: add ? PESTO_NLM_F_CREATE | PESTO_NLM_F_EXCL : 0, sequence: sequence, into: &m)
        // fib_rule_hdr: family, dst_len, src_len, tos, table (0: see FRA_TABLE), res1, res2,
        // action, flags.
        m.append(UInt8(rule.family))
        for _ in 0..<6 { m.append(0) }
        m.append(UInt8(PESTO_FR_ACT_TO_TBL))
        append32(0, to: &m)
        attribute(PESTO_FRA_PRIORITY, u32: rule.priority, to: &m)
        attribute(PESTO_FRA_TABLE, u32: rule.table, to: &m)
        if let mark = rule.mark {
            attribute(PESTO_FRA_FWMARK, u32: mark, to: &m)
            attribute(PESTO_FRA_FWMASK, u32: rule.markMask, to: &m)
        }
        if !rule.inputInterface.isEmpty {
            attributeHeader(PESTO_FRA_IIFNAME, payload: rule.inputInterface.utf8.count + 1, to: &m)
            m.append(contentsOf: rule.inputInterface.utf8)
            m.append(0)
            pad(&m)
        }
        if let p = rule.ipProtocol {
            attributeHeader(PESTO_FRA_IP_PROTO, payload: 1, to: &m)
            m.append(p)
            pad(&m)
        }
        finish(&m)
    }

    /// `route(_:add:sequence:)` written into `m` (emptied first, its storage kept).
    public static func encode(_ route: LocalRoute, add: Bool, sequence: UInt32, into m: inout [UInt8]) {
        header(
            type: add ? PESTO_RTM_NEWROUTE : PESTO_RTM_DELROUTE,
            flags: add ? PESTO_NLM_F_CREATE | PESTO_NLM_F_REPLACE : 0, sequence: sequence, into: &m)
        let family: Int32 = route.destination.family == .ipv4 ? AF_INET : AF_INET6
        // rtmsg: family, dst_len, src_len, tos, table (0: see RTA_TABLE), protocol, scope,
        // type, flags.
        m.append(UInt8(family))
        m.append(route.prefixLength)
        for _ in 0..<3 { m.append(0) }
        m.append(UInt8(PESTO_RTPROT_STATIC))
        m.append(UInt8(PESTO_RT_SCOPE_HOST))
        m.append(UInt8(PESTO_RTN_LOCAL))
        append32(0, to: &m)
        attribute(PESTO_RTA_TABLE, u32: route.table, to: &m)
        if route.prefixLength > 0 { attribute(PESTO_RTA_DST, address: route.destination, to: &m) }
        attribute(PESTO_RTA_OIF, u32: route.interfaceIndex, to: &m)
        if let source = route.preferredSource { attribute(PESTO_RTA_PREFSRC, address: source, to: &m) }
        finish(&m)
    }

    /// The errno of an acknowledgement (`NLMSG_ERROR` with `sequence`): nil for success,
    /// the error otherwise; EPROTO for anything that is not one.
    public static func acknowledgement(_ bytes: UnsafeRawBufferPointer, sequence: UInt32) -> Errno? {
        guard bytes.count >= 20 else { return Errno(rawValue: EPROTO) }
        let type = bytes.loadUnaligned(fromByteOffset: 4, as: UInt16.self)
        let seq = bytes.loadUnaligned(fromByteOffset: 8, as: UInt32.self)
        guard type == UInt16(PESTO_NLMSG_ERROR), seq == sequence else { return Errno(rawValue: EPROTO) }
        let error = bytes.loadUnaligned(fromByteOffset: 16, as: Int32.self)
        return error == 0 ? nil : Errno(rawValue: -error)
    }

    private static func header(type: Int, flags: Int, sequence: UInt32, into m: inout [UInt8]) {
        m.removeAll(keepingCapacity: true)
        if m.capacity < 96 { m.reserveCapacity(96) }
        append32(0, to: &m)  // length, set by finish()
        append16(UInt16(type), to: &m)
        append16(UInt16(PESTO_NLM_F_REQUEST | PESTO_NLM_F_ACK | flags), to: &m)
        append32(sequence, to: &m)
        append32(0, to: &m)  // port: the kernel
    }

    /// Sets the message's length, its first field (host order, as all of netlink).
    private static func finish(_ m: inout [UInt8]) {
        withUnsafeBytes(of: UInt32(m.count)) { length in for i in 0..<4 { m[i] = length[i] } }
    }

    private static func attributeHeader(_ type: Int, payload: Int, to m: inout [UInt8]) {
        append16(UInt16(4 + payload), to: &m)
        append16(UInt16(type), to: &m)
    }

    private static func attribute(_ type: Int, u32 value: UInt32, to m: inout [UInt8]) {
        attributeHeader(type, payload: 4, to: &m)
        append32(value, to: &m)
    }

    /// An attribute holding an address in network order (4 or 16 bytes).
    private static func attribute(_ type: Int, address: IPAddress, to m: inout [UInt8]) {
        switch address {
        case .v4(let a):
            attributeHeader(type, payload: 4, to: &m)
            withUnsafeBytes(of: a.bigEndian) { m.append(contentsOf: $0) }
        case .v6(let hi, let lo):
            attributeHeader(type, payload: 16, to: &m)
            withUnsafeBytes(of: hi.bigEndian) { m.append(contentsOf: $0) }
            withUnsafeBytes(of: lo.bigEndian) { m.append(contentsOf: $0) }
        }
    }

    /// Pads the message to a multiple of 4 bytes (attributes are 4-byte aligned).
    private static func pad(_ m: inout [UInt8]) { while m.count % 4 != 0 { m.append(0) } }

    private static func append16(_ v: UInt16, to m: inout [UInt8]) { withUnsafeBytes(of: v) { m.append(contentsOf: $0) } }
    private static func append32(_ v: UInt32, to m: inout [UInt8]) { withUnsafeBytes(of: v) { m.append(contentsOf: $0) } }
}

/// A NETLINK_ROUTE socket of the namespace it was opened in, making one request at a time.
public final class RouteNetlink {
    private let fd: Int32
    private var sequence: UInt32 = 0
    /// The request being sent and the answer, allocated once: a request allocates nothing.
    private var message: [UInt8] = []
    private var answer = [UInt8](repeating: 0, count: 1024)

    /// Opens the socket in the calling thread's network namespace.
    public init() throws(PestoError) {
        switch Sys.socket(domain: Int32(PESTO_AF_NETLINK), type: Int32(SOCK_RAW.rawValue), blocking: true) {
        case .success(let fd): self.fd = fd
        case .failure(let e): throw PestoError(.system, "Cannot open a routing netlink socket.", underlyingError: e)
        }
    }

    deinit { Sys.close(fd) }

    /// Adds or deletes a rule; the kernel's errno on failure (EEXIST, ENOENT, EPERM, ...).
    public func request(_ rule: RoutingRule, add: Bool) -> Result<Void, Errno> {
        sequence &+= 1
        RouteNetlinkMessage.encode(rule, add: add, sequence: sequence, into: &message)
        return send()
    }

    /// Adds or deletes a local route; the kernel's errno on failure.
    public func request(_ route: LocalRoute, add: Bool) -> Result<Void, Errno> {
        sequence &+= 1
        RouteNetlinkMessage.encode(route, add: add, sequence: sequence, into: &message)
        return send()
    }

    private func send() -> Result<Void, Errno> {
        let sent = message.withUnsafeBytes { Sys.send(fd, $0.baseAddress, $0.count, flags: 0) }
        if case .failure(let e) = sent { return .failure(e) }
        // The answer is queued by now (the request was handled inside send); an error
        // answer carries the request after it, hence the room.
        let got = answer.withUnsafeMutableBytes { Sys.recv(fd, $0.baseAddress, $0.count, flags: Int32(MSG_DONTWAIT)) }
        switch got {
        case .failure(let e): return .failure(e)
        case .success(let n):
            let error = answer.withUnsafeBytes {
                RouteNetlinkMessage.acknowledgement(UnsafeRawBufferPointer(rebasing: $0[..<n]), sequence: sequence)
            }
            if let error { return .failure(error) }
            return .success(())
        }
    }
}

// SPDX-License-Identifier: GPL-2.0-or-later

// ProxyProtocol: the PROXY protocol header (HAProxy's specification, versions 1 and 2) that
// tells a target who connected, and the rule key that asks for it.
//
// Theory of operation
// -------------------
// A relayed TCP connection reaches its target from pestod's own address. With a rule's
// `proxy-protocol` set to "v1" or "v2", pestod first sends the target one header carrying the
// client's address and port (the source) and the address and port the client connected to
// (the destination), then relays the connection as usual; the target (haproxy, nginx
// `proxy_protocol`, Postfix, Dovecot, ...) reads the client from the header. The specification:
//   v1  one text line, at most 107 bytes: "PROXY TCP4 <src> <dst> <sport> <dport>\r\n"
//       (TCP6 with IPv6 text);
//   v2  the 12-byte signature \r\n\r\n\0\r\nQUIT\n, version 2 and command PROXY (0x21), the
//       family and transport (0x11 TCP over IPv4, 0x21 TCP over IPv6), the length of what
//       follows (big endian: 12 or 36), then source address, destination address, source
//       port, destination port, in network order.
// Both addresses of a header are of one family. Should they differ (they do not on a
// connection the kernel accepted: a dual-stack socket reports both ends IPv4-mapped, which
// `IPAddress` reads as IPv4), the IPv4 one is given IPv4-mapped and the header is IPv6, as the
// specification's "TCP6" allows for any IPv6 address.
//
// The header is built into a caller's buffer (the TCP relay keeps one per connection slot,
// reserved at `maxLength`), so encoding v2 allocates nothing; v1's text goes through
// inet_ntop, once per connection. UDP has no header here: a rule asking for it is invalid
// (RuleValidation.swift).

#if canImport(Glibc)
    import Glibc
#endif

/// Which PROXY protocol header a rule's relayed connections start with.
public enum ProxyProtocolVersion: String, CaseIterable, Hashable, Sendable, CustomStringConvertible {
    /// No header: the target sees pestod's address (the default).
    case none = ""
    /// The text header of version 1.
    case v1
    /// The binary header of version 2.
    case v2

    /// Parses a rule description's value ("", "v1" or "v2").
    /// - Throws: `PestoError` `.invalidRule` for anything else.
    public init(parsing text: String) throws(PestoError) {
        guard let value = ProxyProtocolVersion(rawValue: text) else {
            throw PestoError(.invalidRule, "proxy-protocol \(ClientText.quote(text)) is not \"\", \"v1\" or \"v2\".")
        }
        self = value
    }

    public var description: String { self == .none ? "none" : rawValue }
}

/// Builds PROXY protocol headers (see the theory of operation at the top of ProxyProtocol.swift).
public enum ProxyProtocolHeader {
    /// The longest header either version builds (v1's longest line is 107 bytes).
    public static let maxLength = 108
    /// The signature that starts every version 2 header.
    public static let v2Signature: [UInt8] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A]

    /// Appends the header of `version` for a connection from `source` to `destination` to
    /// `buffer`; appends nothing for `.none`.
    public static func append(
        _ version: ProxyProtocolVersion, source: (address: IPAddress, port: UInt16),
        destination: (address: IPAddress, port: UInt16), to buffer: inout [UInt8]
    ) {
        let ipv6 = source.address.family == .ipv6 || destination.address.family == .ipv6
        switch version {
        case .none:
            return
        case .v1:
            buffer.append(contentsOf: "PROXY \(ipv6 ? "TCP6" : "TCP4") ".utf8)
            appendText(source.address, ipv6: ipv6, to: &buffer)
            buffer.append(UInt8(ascii: " "))
            appendText(destination.address, ipv6: ipv6, to: &buffer)
            buffer.append(contentsOf: " \(source.port) \(destination.port)\r\n".utf8)
        case .v2:
            buffer.append(contentsOf: v2Signature)
            buffer.append(0x21)  // version 2, PROXY
            buffer.append(ipv6 ? 0x21 : 0x11)  // AF_INET6 or AF_INET, STREAM
            appendBigEndian(ipv6 ? 36 : 12, bytes: 2, to: &buffer)
            appendBinary(source.address, ipv6: ipv6, to: &buffer)
            appendBinary(destination.address, ipv6: ipv6, to: &buffer)
            appendBigEndian(UInt64(source.port), bytes: 2, to: &buffer)
            appendBigEndian(UInt64(destination.port), bytes: 2, to: &buffer)
        }
    }

    /// Appends the header that says "addresses unknown": version 1's "PROXY UNKNOWN\r\n",
    /// version 2's LOCAL command with family UNSPEC; the target then uses the connection's
    /// own addresses. Nothing for `.none`.
    public static func appendUnknown(_ version: ProxyProtocolVersion, to buffer: inout [UInt8]) {
        switch version {
        case .none: return
        case .v1: buffer.append(contentsOf: "PROXY UNKNOWN\r\n".utf8)
        case .v2: buffer.append(contentsOf: v2Signature + [0x20, 0x00, 0x00, 0x00])
        }
    }

    /// The header as a new array (tests, and callers without a buffer of their own).
    public static func bytes(
        _ version: ProxyProtocolVersion, source: (address: IPAddress, port: UInt16),
        destination: (address: IPAddress, port: UInt16)
    ) -> [UInt8] {
        var buffer: [UInt8] = []
        buffer.reserveCapacity(maxLength)
        append(version, source: source, destination: destination, to: &buffer)
        return buffer
    }

    /// The address in text: dotted quad for a TCP4 header, inet_ntop's IPv6 text (IPv4 as
    /// `::ffff:a.b.c.d`) for a TCP6 one.
    private static func appendText(_ address: IPAddress, ipv6: Bool, to buffer: inout [UInt8]) {
        guard ipv6 else {
            buffer.append(contentsOf: address.description.utf8)
            return
        }
        var text = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
        var a6 = address.in6
        _ = inet_ntop(AF_INET6, &a6, &text, socklen_t(text.count))
        for c in text where c != 0 { buffer.append(UInt8(bitPattern: c)) }
    }

    /// The address in network order: 4 bytes, or 16 (IPv4 IPv4-mapped) in an IPv6 header.
    private static func appendBinary(_ address: IPAddress, ipv6: Bool, to buffer: inout [UInt8]) {
        switch (address, ipv6) {
        case (.v4(let a), false):
            appendBigEndian(UInt64(a), bytes: 4, to: &buffer)
        case (.v4(let a), true):
            appendBigEndian(0, bytes: 8, to: &buffer)
            appendBigEndian(0xFFFF_0000_0000 | UInt64(a), bytes: 8, to: &buffer)
        case (.v6(let hi, let lo), _):
            appendBigEndian(hi, bytes: 8, to: &buffer)
            appendBigEndian(lo, bytes: 8, to: &buffer)
        }
    }

    /// The low `bytes` bytes of `value`, most significant first.
    private static func appendBigEndian(_ value: UInt64, bytes: Int, to buffer: inout [UInt8]) {
        for i in (0..<bytes).reversed() { buffer.append(UInt8(truncatingIfNeeded: value >> UInt64(8 * i))) }
    }
}

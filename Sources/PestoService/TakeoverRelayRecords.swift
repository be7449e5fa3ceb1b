// SPDX-License-Identifier: GPL-2.0-or-later

// TakeoverRelayRecords: the byte layout of the handover's connection and flow records
// (message types 11 and 12, doc/takeover.md). All integers are big-endian; addresses are
// the kernel's struct sockaddr_in / sockaddr_in6 as getpeername() and recvmsg() give them
// (both pestods run on the same kernel), preceded by their length.
//
//   connection  table u8 (0 HOST, 1 SPLICE), rule ID u32, flags u8 (bit 0 connecting,
//               bit 1 up source ended, bit 2 up finished, bit 3 down source ended, bit 4
//               down finished), up pending u32, down pending u32, target address (length
//               u8, 0 for none, then the bytes), PROXY header bytes left (length u16, bytes)
//   flow        table u8, rule ID u32, listener port u16, idle milliseconds u32, client
//               address (length u8, bytes), local address family u8 (0 none, 4, 6), 16
//               address bytes (IPv4 in the first 4), interface index u32

import PestoEngine
import PestoModel
import PestoSystem

#if canImport(Glibc)
    import Glibc
#endif

/// Encodes and decodes the records of relayed connections and flows.
enum RelayRecords {
    /// The bytes `connection` takes.
    static func size(_ c: TCPConnectionHandover) -> Int { 1 + 4 + 1 + 4 + 4 + 1 + addressLength(c.target) + 2 + c.preamble.count }

    /// The bytes `flow` takes.
    static func size(_ f: UDPFlowHandover) -> Int { 1 + 4 + 2 + 4 + 1 + addressLength(f.client) + 1 + 16 + 4 }

    private static func addressLength(_ a: SocketAddress?) -> Int { a.map { Int($0.length) } ?? 0 }

    static func append(_ c: TCPConnectionHandover, to out: inout [UInt8]) {
        out.append(c.table == .host ? 0 : 1)
        put32(&out, c.ruleID)
        var flags: UInt8 = c.connecting ? 1 : 0
        if c.up.sourceEnded { flags |= 2 }
        if c.up.finished { flags |= 4 }
        if c.down.sourceEnded { flags |= 8 }
        if c.down.finished { flags |= 16 }
        out.append(flags)
        put32(&out, UInt32(c.up.pending))
        put32(&out, UInt32(c.down.pending))
        appendAddress(c.target, to: &out)
        out.append(UInt8(c.preamble.count >> 8))
        out.append(UInt8(c.preamble.count & 0xFF))
        out += c.preamble
    }

    static func append(_ f: UDPFlowHandover, to out: inout [UInt8]) {
        out.append(f.table == .host ? 0 : 1)
        put32(&out, f.ruleID)
        out.append(UInt8(f.port >> 8))
        out.append(UInt8(f.port & 0xFF))
        put32(&out, f.idleMilliseconds)
        appendAddress(f.client, to: &out)
        switch f.local.address {
        case nil:
            out.append(0)
            out += [UInt8](repeating: 0, count: 16)
        case .v4(let a)?:
            out.append(4)
            put32(&out, a)
            out += [UInt8](repeating: 0, count: 12)
        case .v6(let hi, let lo)?:
            out.append(6)
            for shift in stride(from: 56, through: 0, by: -8) { out.append(UInt8((hi >> UInt64(shift)) & 0xFF)) }
            for shift in stride(from: 56, through: 0, by: -8) { out.append(UInt8((lo >> UInt64(shift)) & 0xFF)) }
        }
        put32(&out, UInt32(bitPattern: f.local.interface))
    }

    private static func appendAddress(_ a: SocketAddress?, to out: inout [UInt8]) {
        guard let a else {
            out.append(0)
            return
        }
        out.append(UInt8(a.length))
        a.withSockaddr { p, len in out += UnsafeRawBufferPointer(start: p, count: Int(len)) }
    }

    private static func put32(_ out: inout [UInt8], _ v: UInt32) {
        for shift in [24, 16, 8, 0] { out.append(UInt8((v >> UInt32(shift)) & 0xFF)) }
    }

    /// Reads records from a payload; every read past its end, and every impossible value,
    /// throws (the message is malformed).
    struct Reader {
        private let bytes: [UInt8]
        private var at = 0

        init(_ bytes: [UInt8]) { self.bytes = bytes }

        var atEnd: Bool { at == bytes.count }

        private static func malformed(_ what: String) -> PestoError {
            PestoError(.system, "Malformed handover message (\(what)).")
        }

        private mutating func take(_ n: Int) throws(PestoError) -> ArraySlice<UInt8> {
            guard n >= 0, bytes.count - at >= n else { throw Self.malformed("a record runs past the message's end") }
            defer { at += n }
            return bytes[at..<at + n]
        }

        private mutating func u8() throws(PestoError) -> UInt8 { try take(1).first! }

        private mutating func u16() throws(PestoError) -> UInt16 {
            let b = try take(2)
            return UInt16(b[b.startIndex]) << 8 | UInt16(b[b.startIndex + 1])
        }

        private mutating func u32() throws(PestoError) -> UInt32 {
            try take(4).reduce(0) { $0 << 8 | UInt32($1) }
        }

        private mutating func u64() throws(PestoError) -> UInt64 {
            try take(8).reduce(0) { $0 << 8 | UInt64($1) }
        }

        private mutating func table() throws(PestoError) -> TableKind {
            switch try u8() {
            case 0: return .host
            case 1: return .splice
            case let t: throw Self.malformed("table \(t)")
            }
        }

        /// An IPv4 or IPv6 socket address, or nil for length 0.
        private mutating func address() throws(PestoError) -> SocketAddress? {
            let length = Int(try u8())
            guard length > 0 else { return nil }
            let raw = try take(length)
            guard length == MemoryLayout<sockaddr_in>.size || length == MemoryLayout<sockaddr_in6>.size else {
                throw Self.malformed("an address of \(length) bytes")
            }
            var a = SocketAddress()
            a.withMutableSockaddr { p, len in
                UnsafeMutableRawPointer(p).copyMemory(from: Array(raw), byteCount: length)
                len.pointee = socklen_t(length)
            }
            let family = a.family
            guard
                (family == AF_INET && length == MemoryLayout<sockaddr_in>.size)
                    || (family == AF_INET6 && length == MemoryLayout<sockaddr_in6>.size)
            else { throw Self.malformed("an address of family \(family) and \(length) bytes") }
            return a
        }

        mutating func connection() throws(PestoError) -> TCPConnectionHandover {
            let table = try table()
            let ruleID = try u32()
            let flags = try u8()
            guard flags & ~0x1F == 0 else { throw Self.malformed("connection flags \(flags)") }
            let upPending = try u32()
            let downPending = try u32()
            // A pipe holds far less than 2 GiB (at most /proc/sys/fs/pipe-max-size).
            guard upPending < 1 << 31, downPending < 1 << 31 else {
                throw Self.malformed("a pipe holding \(max(upPending, downPending)) bytes")
            }
            let target = try address()
            let preambleLength = Int(try u16())
            guard preambleLength <= ProxyProtocolHeader.maxLength else { throw Self.malformed("a PROXY header of \(preambleLength) bytes") }
            let preamble = Array(try take(preambleLength))
            let up = TCPConnectionHandover.Direction(pending: Int(upPending), sourceEnded: flags & 2 != 0, finished: flags & 4 != 0)
            let down = TCPConnectionHandover.Direction(pending: Int(downPending), sourceEnded: flags & 8 != 0, finished: flags & 16 != 0)
            let connecting = flags & 1 != 0
            // Only a relaying connection moves bytes or half-closes; both directions finished
            // would have closed it.
            guard !connecting || (flags == 1 && upPending == 0 && downPending == 0),
                !(up.finished && down.finished), !(up.finished && up.pending > 0), !(down.finished && down.pending > 0)
            else { throw Self.malformed("an impossible connection state (flags \(flags))") }
            return TCPConnectionHandover(
                table: table, ruleID: ruleID, connecting: connecting, up: up, down: down, target: target, preamble: preamble)
        }

        mutating func flow() throws(PestoError) -> UDPFlowHandover {
            let table = try table()
            let ruleID = try u32()
            let port = try u16()
            let idle = try u32()
            guard let client = try address() else { throw Self.malformed("a flow without a client address") }
            let family = try u8()
            let local: PacketInfo
            switch family {
            case 0:
                _ = try take(16)
                _ = try u32()
                local = PacketInfo()
            case 4:
                let a = try u32()
                _ = try take(12)
                local = PacketInfo(address: .v4(a), interface: Int32(bitPattern: try u32()))
            case 6:
                let hi = try u64()
                let lo = try u64()
                local = PacketInfo(address: .v6(hi, lo), interface: Int32(bitPattern: try u32()))
            default:
                throw Self.malformed("a local address of family \(family)")
            }
            return UDPFlowHandover(table: table, ruleID: ruleID, port: port, client: client, local: local, idleMilliseconds: idle)
        }
    }
}

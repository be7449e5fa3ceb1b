// SPDX-License-Identifier: GPL-2.0-or-later

// WireClient: a client of upstream pesto's control protocol (version 2) written from
// doc/pesto-v2-wire.md alone, raw bytes and all: it does not use pestod's codec, so the tests
// and benchmarks that drive pestod's control socket with it check the codec too.

import CPestoSys
import PestoEngine
import PestoModel

#if canImport(Glibc)
import Glibc
#endif

/// A minimal pesto v2 client: raw bytes as the wire document describes them.
public struct WireClient {
    /// The connected socket; the caller closes it.
    public let fd: Int32

    /// Connects to the control socket at `path`.
    public init?(path: String) {
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        let r = SocketAddress(unixPath: path)?.withSockaddr { connect(fd, $0, $1) } ?? -1
        if r != 0 { close(fd); return nil }
        var tv = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    /// Reads exactly `n` bytes (nil on EOF, error or the 5 s timeout).
    public func read(_ n: Int) -> [UInt8]? {
        var out = [UInt8](repeating: 0, count: n)
        var got = 0
        while got < n {
            let r = out.withUnsafeMutableBytes { recv(fd, $0.baseAddress! + got, n - got, 0) }
            if r <= 0 { return nil }
            got += r
        }
        return out
    }

    /// Sends all of `bytes` (a short write is the test's failure to notice).
    public func send(_ bytes: [UInt8]) { _ = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress!, bytes.count, Int32(MSG_NOSIGNAL)) } }

    /// A big-endian u32 from 4 bytes.
    public static func u32(_ b: ArraySlice<UInt8>) -> UInt32 { b.reduce(0) { $0 << 8 | UInt32($1) } }
    /// A u32 as 4 big-endian bytes.
    public static func be32(_ v: UInt32) -> [UInt8] { [UInt8(v >> 24), UInt8(v >> 16 & 0xFF), UInt8(v >> 8 & 0xFF), UInt8(v & 0xFF)] }
    /// A u16 as 2 big-endian bytes.
    public static func be16(_ v: UInt16) -> [UInt8] { [UInt8(v >> 8), UInt8(v & 0xFF)] }

    /// One 56-byte rule: IPv4 listening address (IPv4-mapped), automatic target, ports, TCP.
    public static func rule(address: [UInt8] = [127, 0, 0, 1], first: UInt16, last: UInt16? = nil, target: UInt16? = nil,
                     proto: UInt8 = 6, flags: UInt8 = 0, ifname: [UInt8] = [UInt8](repeating: 0, count: 16)) -> [UInt8] {
        var r = [UInt8](repeating: 0, count: 10) + [0xFF, 0xFF] + address  // ::ffff:a.b.c.d
        r += [UInt8](repeating: 0, count: 16)  // target: automatic
        r += ifname
        r += be16(first) + be16(last ?? first) + be16(target ?? first) + [proto, flags]
        return r
    }

    /// Reads hello and dump; returns the tables: pif → (name, caps, raw rules).
    public func readHelloAndDump() -> (version: UInt32, tables: [UInt8: (name: String, caps: UInt32, rules: [[UInt8]])])? {
        guard let hello = read(20), Array(hello[0..<8]) == Array("basil:s".utf8) + [0] else { return nil }
        let version = Self.u32(hello[8..<12])
        guard Self.u32(hello[12..<16]) == 128, Self.u32(hello[16..<20]) == 16 else { return nil }
        var tables: [UInt8: (String, UInt32, [[UInt8]])] = [:]
        while let pif = read(1)?.first, pif != 0 {
            guard let info = read(136) else { return nil }
            let name = String(decoding: info[0..<128].prefix { $0 != 0 }, as: UTF8.self)
            let count = Int(Self.u32(info[132..<136]))
            var rules: [[UInt8]] = []
            for _ in 0..<count { guard let r = read(56) else { return nil }; rules.append(r) }
            tables[pif] = (name, Self.u32(info[128..<132]), rules)
        }
        return (version, tables)
    }
}

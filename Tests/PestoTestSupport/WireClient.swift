// SPDX-License-Identifier: GPL-2.0-or-later

// WireClient: a client of upstream pesto's control protocol (version 2) written from
// doc/pesto-v2-wire.md alone, raw bytes and all: it does not use pestod's codec, so the tests
// and benchmarks that drive pestod's control socket with it check the codec too.

import CPestoSys
import PestoEngine
import PestoModel
import PestoSystem

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
        if r != 0 {
            close(fd)
            return nil
        }
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
    public static func rule(
        address: [UInt8] = [127, 0, 0, 1], first: UInt16, last: UInt16? = nil, target: UInt16? = nil,
        proto: UInt8 = 6, flags: UInt8 = 0, ifname: [UInt8] = [UInt8](repeating: 0, count: 16)
    ) -> [UInt8] {
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
            for _ in 0..<count {
                guard let r = read(56) else { return nil }
                rules.append(r)
            }
            tables[pif] = (name, Self.u32(info[128..<132]), rules)
        }
        return (version, tables)
    }
}

// MARK: - Upstream pesto's add and delete, as a session

extension WireClient {
    /// The 16-byte form of an address for a rule (doc/pesto-v2-wire.md): IPv6 as is, IPv4
    /// IPv4-mapped (`::ffff:a.b.c.d`); built with inet_pton, not with pestod's codec.
    public static func address16(_ text: String) -> [UInt8]? {
        var a4 = in_addr()
        if inet_pton(AF_INET, text, &a4) == 1 {
            return [UInt8](repeating: 0, count: 10) + [0xFF, 0xFF] + withUnsafeBytes(of: &a4) { Array($0) }
        }
        var a6 = in6_addr()
        if inet_pton(AF_INET6, text, &a6) == 1 { return withUnsafeBytes(of: &a6) { Array($0) } }
        return nil
    }

    /// The rule pesto makes of `-t LISTEN/PORT:TARGET/TARGETPORT` (or `-u` with `udp`):
    /// listening address, target address (nil: automatic, all zeros), one port, no flags
    /// beyond `flags` (0x01 dual stack with the address `::`, 0x02 weak, 0x04 scan).
    public static func specRule(
        listen: String, port: UInt16, target: String? = nil, targetPort: UInt16? = nil,
        udp: Bool = false, flags: UInt8 = 0
    ) -> [UInt8] {
        var r = address16(listen)!
        r += target.map { address16($0)! } ?? [UInt8](repeating: 0, count: 16)
        r += [UInt8](repeating: 0, count: 16)
        r += be16(port) + be16(port) + be16(targetPort ?? port) + [udp ? 17 : 6, flags]
        return r
    }

    /// Whether two raw rules conflict as upstream's fwd_rule_conflicts says: same protocol,
    /// overlapping ports, and matching addresses (a dual-stack rule matches everything, a
    /// wildcard matches every address of its family).
    public static func conflicts(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        guard a[54] == b[54] else { return false }
        let aFirst = UInt16(a[48]) << 8 | UInt16(a[49])
        let aLast = UInt16(a[50]) << 8 | UInt16(a[51])
        let bFirst = UInt16(b[48]) << 8 | UInt16(b[49])
        let bLast = UInt16(b[50]) << 8 | UInt16(b[51])
        guard aLast >= bFirst && bLast >= aFirst else { return false }
        if a[55] & 0x01 != 0 || b[55] & 0x01 != 0 { return true }
        let x = Array(a[0..<16])
        let y = Array(b[0..<16])
        let mappedPrefix = [UInt8](repeating: 0, count: 10) + [0xFF, 0xFF]
        func isV4(_ v: [UInt8]) -> Bool { Array(v[0..<12]) == mappedPrefix }
        func isWildcard(_ v: [UInt8]) -> Bool { isV4(v) ? v[12..<16].allSatisfy { $0 == 0 } : v.allSatisfy { $0 == 0 } }
        if x == y { return true }
        return isV4(x) == isV4(y) && (isWildcard(x) || isWildcard(y))
    }

    /// What a pesto run did.
    public enum PestoOutcome: Equatable, Sendable {
        /// The edited tables were uploaded, and pestod closed the session.
        case uploaded
        /// pesto gave up before uploading (as upstream's client dies on a conflicting add
        /// or a delete of a rule that is not there): a read-only session.
        case gaveUp(String)
        /// The session failed (no hello, no dump, no close).
        case failed(String)
    }

    /// One run of `pesto --add` (or `--delete`) with `rules` for the HOST table, on the
    /// wire exactly as pesto does it: read the hello and the dump, edit the HOST table
    /// (add each rule unless it conflicts with one there; delete each rule that matches one
    /// there byte for byte), upload every table received, in the order received, shut down
    /// the writing side. Unlike pesto, which exits at once, it then waits for pestod to close
    /// the session (so a test knows the upload was handled), at most `waitSeconds`.
    public static func pesto(path: String, delete: Bool = false, rules: [[UInt8]], waitSeconds: Int = 5) -> PestoOutcome {
        guard let client = WireClient(path: path) else { return .failed("cannot connect") }
        defer { close(client.fd) }
        guard let dump = client.readHelloAndDump(), var host = dump.tables[1] else { return .failed("no hello or dump") }
        for rule in rules {
            if delete {
                if let i = host.rules.firstIndex(of: rule) {
                    host.rules.remove(at: i)
                } else {
                    return .gaveUp(host.rules.contains { conflicts($0, rule) } ? "conflicts but does not match" : "not found")
                }
            } else {
                if host.rules.contains(where: { conflicts($0, rule) }) { return .gaveUp("conflict") }
                host.rules.append(rule)
            }
        }
        var upload: [UInt8] = []
        for pif in dump.tables.keys.sorted() {
            let rules = pif == 1 ? host.rules : dump.tables[pif]!.rules
            upload += [pif] + be32(UInt32(rules.count)) + rules.flatMap { $0 }
        }
        client.send(upload + [0])
        shutdown(client.fd, Int32(SHUT_WR))
        var tv = timeval(tv_sec: waitSeconds, tv_usec: 0)
        setsockopt(client.fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var byte: UInt8 = 0
        return recv(client.fd, &byte, 1, 0) == 0 ? .uploaded : .failed("pestod did not close the session")
    }
}

// SPDX-License-Identifier: GPL-2.0-or-later

// PortScanner: which ports are bound in a network namespace, read from /proc/net/{tcp,udp}[6].
//
// Theory of operation
// -------------------
// A `scan` rule (pasta's `auto`) listens only on the ports that something on the target
// side listens on. Once a second the engine asks the scanner for those ports: for the
// inbound (HOST) table inside the target namespace, for the outbound (SPLICE) table on the
// host. It reads the kernel's socket tables as text, like pasta's procfs_scan_listen():
//
//   tcp, tcp6   a port counts when a socket is in LISTEN (st 0A);
//   udp, udp6   a port counts when a socket is bound but not connected (st 07, which the
//               kernel shares with TCP_CLOSE and pasta calls UDP_LISTEN). Connected UDP
//               sockets (st 01) are left out, as pasta does: they only take datagrams from
//               their one peer, so forwarding to them is pointless, and most of them are
//               clients on ephemeral ports (DNS lookups) that must not open forwards.
//
// Every local address counts, not only the wildcard and loopback ones, again as pasta does:
// the scanner cannot know a rule's target address, and a rule that targets an address
// nothing listens on fails per connection exactly like a non-scan rule would.
//
// Sockets whose inode is in `excludingInodes` are skipped: those are pestod's own
// listeners, so a scan never makes a rule forward to a port only because pestod listens
// on it (on the same side, that would be a loop). Another socket on the same port still
// counts.
//
// The files are opened under /proc/thread-self/net, never /proc/self/net: the latter is
// the thread-group leader's namespace, while `NetworkNamespace.perform {}` moves only the
// calling thread. A file is opened per scan (the namespace is fixed when it is opened).
// tcp6/udp6 are missing when IPv6 is disabled; that counts as "no IPv6 sockets".
//
// The files can be megabytes (150 bytes per socket), so they are read in chunks of 64 KiB
// into one buffer allocated by `init`, and parsed by a byte-level state machine
// (`ProcNetParser`) that keeps its place across chunks: a line may straddle a chunk
// boundary, and nothing is copied or allocated per line. Once a line's state or inode is
// known not to matter the parser jumps to the next newline with memchr(3). Lines that do
// not parse (the header, a truncated last line) are skipped.
//
// Not thread-safe: a scanner belongs to one thread (the event loop's).

import PestoModel
import PestoSystem

#if canImport(Glibc)
    import Glibc
#endif

/// A set of ports as a 65,536-bit bitmap (1,024 `UInt64` words); no allocation after `init`.
///
/// Copies share storage until one is changed (copy on write), so keep one set per purpose
/// and refill it with `removeAll()` and `insert(_:)` to stay allocation-free.
public struct PortSet: Hashable, Sendable, Sequence, ExpressibleByArrayLiteral, CustomStringConvertible {
    /// Bit `port & 63` of word `port >> 6` is set when `port` is in the set.
    private var words: [UInt64]
    /// The number of ports in the set, kept up to date by every change.
    public private(set) var count: Int

    /// An empty set.
    public init() {
        words = [UInt64](repeating: 0, count: 1024)
        count = 0
    }

    /// A set holding `ports`.
    public init(arrayLiteral ports: UInt16...) {
        self.init()
        for port in ports { insert(port) }
    }

    /// True when the set holds no port.
    public var isEmpty: Bool { count == 0 }

    /// Adds `port`; does nothing when it is already in the set.
    public mutating func insert(_ port: UInt16) {
        let bit: UInt64 = 1 << UInt64(port & 63)
        let index = Int(port >> 6)
        if words[index] & bit == 0 {
            words[index] |= bit
            count += 1
        }
    }

    /// Removes `port`; does nothing when it is not in the set.
    public mutating func remove(_ port: UInt16) {
        let bit: UInt64 = 1 << UInt64(port & 63)
        let index = Int(port >> 6)
        if words[index] & bit != 0 {
            words[index] &= ~bit
            count -= 1
        }
    }

    /// True when `port` is in the set.
    public func contains(_ port: UInt16) -> Bool {
        words[Int(port >> 6)] & (1 << UInt64(port & 63)) != 0
    }

    /// Empties the set, keeping its storage.
    public mutating func removeAll() {
        guard count != 0 else { return }
        words.withUnsafeMutableBufferPointer { $0.update(repeating: 0) }
        count = 0
    }

    /// Ascending iteration over the ports of the set.
    public struct Iterator: IteratorProtocol {
        fileprivate let words: [UInt64]
        /// The word being read, with the bits already returned cleared.
        fileprivate var current: UInt64
        fileprivate var index: Int

        public mutating func next() -> UInt16? {
            while current == 0 {
                index += 1
                guard index < words.count else { return nil }
                current = words[index]
            }
            let bit = current.trailingZeroBitCount
            current &= current - 1
            return UInt16(index << 6 | bit)
        }
    }

    public func makeIterator() -> Iterator { Iterator(words: words, current: words[0], index: 0) }

    public var underestimatedCount: Int { count }

    /// Ports and runs of ports, such as `[22, 8000-8002]`.
    public var description: String {
        var parts: [String] = []
        var run: (first: UInt16, last: UInt16)?
        for port in self {
            if let r = run, Int(r.last) + 1 == Int(port) {
                run = (r.first, port)
                continue
            }
            if let r = run { parts.append(r.first == r.last ? "\(r.first)" : "\(r.first)-\(r.last)") }
            run = (port, port)
        }
        if let r = run { parts.append(r.first == r.last ? "\(r.first)" : "\(r.first)-\(r.last)") }
        return "[" + parts.joined(separator: ", ") + "]"
    }
}

/// Reads which ports are bound in the calling thread's current network namespace.
///
/// See the theory of operation at the top of PortScanner.swift for what "bound" means per
/// protocol. One scanner holds one read buffer, allocated once; it is not thread-safe.
public final class PortScanner {
    /// The read buffer, one chunk long.
    private let buffer: UnsafeMutableRawBufferPointer
    /// Full paths, built once: tcp, tcp6, udp, udp6.
    private let tcpPath: String, tcp6Path: String, udpPath: String, udp6Path: String

    /// The default chunk size (64 KiB): a few hundred lines per read(2).
    static let defaultChunkSize = 65_536

    /// A scanner of the calling thread's namespace with a 64 KiB read buffer.
    public convenience init() {
        self.init(chunkSize: Self.defaultChunkSize)
    }

    /// A scanner reading `directory`'s `tcp`, `tcp6`, `udp` and `udp6` in chunks of
    /// `chunkSize` bytes (tests use tiny chunks and fixture directories).
    init(chunkSize: Int, directory: String = "/proc/thread-self/net") {
        precondition(chunkSize > 0, "chunk size must be positive")
        buffer = .allocate(byteCount: chunkSize, alignment: 16)
        tcpPath = directory + "/tcp"
        tcp6Path = directory + "/tcp6"
        udpPath = directory + "/udp"
        udp6Path = directory + "/udp6"
    }

    deinit { buffer.deallocate() }

    /// Fills `result` with the ports bound for `proto` in the calling thread's network
    /// namespace: TCP ports with a socket in LISTEN (tcp and tcp6), or UDP ports with a
    /// bound, unconnected socket (udp and udp6), on any local address, skipping sockets
    /// whose inode is in `excludingInodes`.
    ///
    /// `result` is emptied first and keeps its storage, so a scan allocates nothing.
    /// - Returns: `.failure` when a file cannot be opened or read (a missing IPv6 file is
    ///   not an error: IPv6 is disabled). `result` is then empty; the caller should keep
    ///   what it had rather than close its listeners on a failed scan.
    public func boundPorts(
        _ proto: TransportProtocol,
        excludingInodes: Set<UInt64> = [],
        into result: inout PortSet
    ) -> Result<Void, Errno> {
        result.removeAll()
        let (v4, v6) = proto == .tcp ? (tcpPath, tcp6Path) : (udpPath, udp6Path)
        var outcome = readFile(v4, proto: proto, missingIsEmpty: false, excludingInodes, &result)
        if case .success = outcome {
            outcome = readFile(v6, proto: proto, missingIsEmpty: true, excludingInodes, &result)
        }
        if case .failure = outcome { result.removeAll() }
        return outcome
    }

    /// Parses the file at `path` chunk by chunk, adding its ports to `result`.
    /// - Returns: `.success` also when the file does not exist and `missingIsEmpty` is set.
    private func readFile(
        _ path: String,
        proto: TransportProtocol,
        missingIsEmpty: Bool,
        _ excludingInodes: Set<UInt64>,
        _ result: inout PortSet
    ) -> Result<Void, Errno> {
        let fd: Int32
        switch Sys.open(path, O_RDONLY) {
        case .success(let opened): fd = opened
        case .failure(let e): return missingIsEmpty && e == .noSuchFile ? .success(()) : .failure(e)
        }
        defer { Sys.close(fd) }
        var parser = ProcNetParser(proto: proto)
        while true {
            let n: Int
            switch Sys.read(fd, buffer.baseAddress, buffer.count) {
            case .success(let count): n = count
            case .failure(let e): return .failure(e)
            }
            if n == 0 { break }
            parser.feed(UnsafeRawBufferPointer(rebasing: buffer[..<n]), excludingInodes: excludingInodes, into: &result)
        }
        parser.finish()
        return .success(())
    }

    /// Parses one whole /proc/net/{tcp,tcp6,udp,udp6} text, adding the ports it finds to
    /// `result` (which is not emptied first). Exposed for tests.
    static func parse(
        _ bytes: UnsafeRawBufferPointer,
        proto: TransportProtocol,
        excludingInodes: Set<UInt64>,
        into result: inout PortSet
    ) {
        var parser = ProcNetParser(proto: proto)
        parser.feed(bytes, excludingInodes: excludingInodes, into: &result)
        parser.finish()
    }
}

/// A streaming parser of /proc/net/{tcp,udp}[6] text that keeps its place across chunks.
///
/// A line is whitespace-separated fields; the ones read are
///
///     0 sl  1 local_address  2 rem_address  3 st  4 tx:rx  5 tr:when  6 retrnsmt  7 uid  8 timeout  9 inode
///
/// with local_address `HEXADDR:HEXPORT` (8 hex digits of address for IPv4, 32 for IPv6),
/// st in hex and inode in decimal. A line whose fields 1, 3 and 9 are well formed and whose
/// state is the wanted one adds its port, unless the port is 0 or the inode is excluded.
struct ProcNetParser {
    /// The socket state that counts: LISTEN (0x0A) for TCP, unconnected (0x07) for UDP.
    let wantedState: UInt64

    /// The index of the field being read, or of the next one when between fields.
    private var field = 0
    /// True while inside a field (the last byte was not whitespace).
    private var inField = false
    /// True when the rest of the line is irrelevant: counted already, or not to be counted.
    private var skipping = false
    /// Field 1: whether the colon was seen, the digits before it, and the port after it.
    private var sawColon = false
    private var addressDigits = 0
    private var portDigits = 0
    private var port: UInt64 = 0
    /// Field 3 (st) and field 9 (inode), with their digit counts.
    private var stateDigits = 0
    private var state: UInt64 = 0
    private var inodeDigits = 0
    private var inode: UInt64 = 0

    /// The states that count for `proto`.
    static func wantedState(for proto: TransportProtocol) -> UInt64 {
        switch proto {
        case .tcp: 0x0A  // TCP_LISTEN
        case .udp: 0x07  // TCP_CLOSE: bound, not connected (pasta's UDP_LISTEN)
        }
    }

    /// A parser at the start of a file of `proto` sockets.
    init(proto: TransportProtocol) {
        wantedState = Self.wantedState(for: proto)
    }

    /// Parses the next chunk of the file.
    mutating func feed(_ bytes: UnsafeRawBufferPointer, excludingInodes: Set<UInt64>, into result: inout PortSet) {
        guard let base = bytes.baseAddress else { return }
        let end = bytes.count
        var i = 0
        while i < end {
            if skipping {
                guard let newline = memchr(base + i, 0x0A, end - i) else { return }
                i = base.distance(to: UnsafeRawPointer(newline)) + 1
                resetLine()
                continue
            }
            let c = base.load(fromByteOffset: i, as: UInt8.self)
            i += 1
            switch c {
            case 0x0A:  // '\n'
                if inField { endField(excludingInodes, &result) }
                resetLine()
            case 0x20, 0x09:  // ' ', '\t'
                if inField { endField(excludingInodes, &result) }
            default:
                inField = true
                byte(c)
            }
        }
    }

    /// Ends the file. A last line without its newline counts only when its inode field was
    /// already complete (followed by whitespace); otherwise the inode may be cut short.
    mutating func finish() {
        resetLine()
    }

    /// Forgets the line in progress.
    private mutating func resetLine() {
        field = 0
        inField = false
        skipping = false
        sawColon = false
        addressDigits = 0
        portDigits = 0
        port = 0
        stateDigits = 0
        state = 0
        inodeDigits = 0
        inode = 0
    }

    /// Takes one byte of field `field`.
    private mutating func byte(_ c: UInt8) {
        switch field {
        case 1:
            if c == UInt8(ascii: ":") {
                if sawColon || addressDigits == 0 { skipping = true }
                sawColon = true
            } else if let v = hexValue(c) {
                if sawColon {
                    portDigits += 1
                    port = port << 4 | v
                    if portDigits > 4 { skipping = true }
                } else {
                    addressDigits += 1
                    if addressDigits > 32 { skipping = true }
                }
            } else {
                skipping = true  // the header's "local_address", or garbage
            }
        case 3:
            guard let v = hexValue(c), stateDigits < 2 else {
                skipping = true
                return
            }
            stateDigits += 1
            state = state << 4 | v
        case 9:
            guard c >= UInt8(ascii: "0"), c <= UInt8(ascii: "9"), inodeDigits < 20 else {
                skipping = true
                return
            }
            let (times10, o1) = inode.multipliedReportingOverflow(by: 10)
            let (sum, o2) = times10.addingReportingOverflow(UInt64(c - UInt8(ascii: "0")))
            if o1 || o2 {
                skipping = true
                return
            }
            inodeDigits += 1
            inode = sum
        default:
            break  // fields that do not matter
        }
    }

    /// Closes field `field` at whitespace or newline: checks it, and after the inode decides
    /// the line.
    private mutating func endField(_ excludingInodes: Set<UInt64>, _ result: inout PortSet) {
        inField = false
        switch field {
        case 1:
            if !sawColon || portDigits == 0 { skipping = true }
        case 3:
            if stateDigits == 0 || state != wantedState { skipping = true }
        case 9:
            if inodeDigits > 0 && port != 0 && !excludingInodes.contains(inode) {
                result.insert(UInt16(port))
            }
            skipping = true  // the rest of the line does not matter
        default:
            break
        }
        field += 1
    }

    /// The value of a hex digit (either case), or nil.
    @inline(__always)
    private func hexValue(_ c: UInt8) -> UInt64? {
        switch c {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): UInt64(c - UInt8(ascii: "0"))
        case UInt8(ascii: "A")...UInt8(ascii: "F"): UInt64(c - UInt8(ascii: "A") + 10)
        case UInt8(ascii: "a")...UInt8(ascii: "f"): UInt64(c - UInt8(ascii: "a") + 10)
        default: nil
        }
    }
}

// SPDX-License-Identifier: GPL-2.0-or-later

// PestoV2Wire: the byte layout of upstream pesto's control protocol, version 2, as a pure codec.
//
// Theory of operation
// -------------------
// passt/pasta's `-c PATH` socket speaks one transaction per AF_UNIX stream connection
// (doc/pesto-v2-wire.md): the server sends a 20-byte hello and a dump of its
// tables; the client answers with an upload that replaces whole tables. This file turns
// those bytes into values and back; it opens no sockets and keeps no tables.
//
// Server side, outgoing:
//   - `hello()` gives the 20-byte greeting.
//   - `tableDump(_:)` gives the dump: per table a pif byte, a 136-byte info block (name,
//     caps, rule count) and the rules, then a single 0 byte.
//
// Client side, incoming (`UploadParser`), a state machine fed whatever `read(2)` returned:
//   - `.pif`       waiting for a pif byte. 0 ends the upload; 1 (HOST) or 3 (SPLICE) starts
//                  a block; anything else, or a pif already seen, is an error.
//   - `.count`     collecting the block's 4-byte rule count, checked against the limit before
//                  any rule is read (so a hostile count cannot make us buffer much).
//   - `.rules`     collecting 56-byte rules, each decoded as soon as it is complete.
//   - `.done`      the terminator was read and the upload returned; more bytes are an error.
//   - `.failed`    an error was thrown; every later `feed` throws the same error again.
//
// Mapping between a 56-byte rule and `Rule` + best-effort flag:
//   - Listening address, offset 0, 16 bytes, IPv6 or IPv4-mapped (`::ffff:a.b.c.d`).
//     Flag 0x01 (dual-stack any) requires the address `::` and maps to `Rule.address = nil`.
//     Without it, `::` is `.anyIPv6` and `::ffff:0.0.0.0` is `.anyIPv4`; IPv4-mapped
//     addresses become `.v4`.
//   - Target address, offset 16, same form; all zeros means automatic (`targetAddress = nil`).
//   - Interface name, offset 32, 16 bytes, NUL-terminated: byte 47 must be NUL, the name is
//     the bytes before the first NUL (empty = no interface) and must be UTF-8.
//   - Ports, offsets 48/50/52, big-endian: first, last, target of the first.
//   - Protocol, offset 54: 6 TCP, 17 UDP.
//   - Flags, offset 55: 0x01 dual-stack, 0x02 weak (-> `bestEffort`), 0x04 scan (-> `scan`);
//     any other bit is an error.
//   Encoding is the inverse: nil address -> `::` with flag 0x01, IPv4 -> IPv4-mapped,
//   nil target -> zeros. `Rule.owner` has no place on the wire; decoded rules have "".
//
// What the codec does not check: ports of 0, reversed ranges, ranges running past 65535,
// family mismatches, missing capabilities, conflicts. Those are `Rule.validate(capabilities:)`
// and the table's job, so the two front doors (D-Bus, pesto v2) share one set of rules and
// messages. The parser never traps on any input: a reversed range is passed through as a
// `Rule` for `validate` to reject.

#if canImport(Glibc)
    import Glibc
#endif

/// Upstream pesto's control protocol, version 2: constants, rule codec, and upload parser.
public enum PestoV2Wire {
    /// The hello's magic: the ASCII text `basil:s` followed by one NUL.
    public static let magic: [UInt8] = Array("basil:s".utf8) + [0]
    /// The protocol version we speak.
    public static let version: UInt32 = 2
    /// Size of a table's name field in the dump (upstream PIF_NAME_SIZE).
    public static let pifNameSize: UInt32 = 128
    /// Size of a rule's interface name field (the kernel's IFNAMSIZ).
    public static let ifnamsiz: UInt32 = 16
    /// Size of one encoded rule.
    public static let ruleSize = 56
    /// Size of a table's info block in the dump: name, caps, rule count.
    public static let tableInfoSize = Int(pifNameSize) + 8
    /// Size of the hello.
    public static let helloSize = 20
    /// Most rules we accept per table in an upload (ours; upstream stops at 255).
    public static let maxRulesPerTable = 65535

    /// Flag bit: listen on any address of both families (the address must be `::`).
    public static let flagDualStack: UInt8 = 0x01
    /// Flag bit: weak rule, bind failures are tolerated (our `bestEffort`).
    public static let flagWeak: UInt8 = 0x02
    /// Flag bit: listen only on ports bound on the target side (our `Rule.scan`).
    public static let flagScan: UInt8 = 0x04
    /// Every flag bit upstream defines.
    public static let knownFlags: UInt8 = flagDualStack | flagWeak | flagScan

    /// Upstream's interface ids ("pifs"); each table is named by the pif it listens on.
    public enum Pif: UInt8, Hashable, Sendable, CaseIterable, CustomStringConvertible {
        /// Ends the dump and the upload.
        case none = 0
        /// The host side: the inbound table (`-t/-u`), our `TableKind.host`.
        case host = 1
        /// The guest's tap interface; it never has a table.
        case tap = 2
        /// The namespace side: the outbound table (`-T/-U`), our `TableKind.splice`.
        case splice = 3

        /// The pif whose table `kind` is.
        public init(_ kind: TableKind) {
            switch kind {
            case .host: self = .host
            case .splice: self = .splice
            }
        }

        /// The table this pif carries, or nil for `.none` and `.tap`.
        public var tableKind: TableKind? {
            switch self {
            case .host: return .host
            case .splice: return .splice
            case .none, .tap: return nil
            }
        }

        /// Upstream's name (`NONE`, `HOST`, `TAP`, `SPLICE`).
        public var description: String {
            switch self {
            case .none: return "NONE"
            case .host: return "HOST"
            case .tap: return "TAP"
            case .splice: return "SPLICE"
            }
        }
    }

    /// A rule as upstream sees it: our `Rule` plus the weak (best-effort) flag.
    public struct WireRule: Hashable, Sendable {
        /// The rule itself (`owner` is not carried on the wire).
        public var rule: Rule
        /// Upstream's weak flag: a bind failure does not fail the rule.
        public var bestEffort: Bool

        /// Pairs a rule with its weak flag.
        public init(rule: Rule, bestEffort: Bool = false) {
            self.rule = rule
            self.bestEffort = bestEffort
        }
    }

    /// A malformed piece of a pesto v2 message.
    public struct WireError: Error, Hashable, Sendable, CustomStringConvertible {
        /// One sentence naming what was wrong and where.
        public let message: String

        /// Makes an error with the given sentence.
        public init(_ message: String) { self.message = message }

        public var description: String { message }
    }

    // MARK: - Server output

    /// The server's 20-byte hello: magic, version, pif name size, IFNAMSIZ (u32s big-endian).
    public static func hello() -> [UInt8] {
        var out = magic
        out.reserveCapacity(helloSize)
        appendU32(version, to: &out)
        appendU32(pifNameSize, to: &out)
        appendU32(ifnamsiz, to: &out)
        return out
    }

    /// The server's dump of its tables, terminated by a 0 pif byte.
    ///
    /// Each table is its pif byte, then 136 bytes of info (the name `HOST`/`SPLICE`,
    /// NUL-padded to 128 bytes; caps u32 at offset 128; rule count u32 at offset 132), then
    /// its rules. Capability bits upstream does not define are left out.
    public static func tableDump(_ tables: [(TableKind, Capabilities, [WireRule])]) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(1 + tables.reduce(0) { $0 + 1 + tableInfoSize + $1.2.count * ruleSize })
        let allCaps: Capabilities = [.ipv4, .ipv6, .tcp, .udp, .scan, .ifname]
        for (kind, caps, rules) in tables {
            out.append(Pif(kind).rawValue)
            var name = Array(kind.name.utf8.prefix(Int(pifNameSize) - 1))
            name += [UInt8](repeating: 0, count: Int(pifNameSize) - name.count)
            out += name
            appendU32(caps.intersection(allCaps).rawValue, to: &out)
            appendU32(UInt32(rules.count), to: &out)
            for rule in rules { out += encode(rule) }
        }
        out.append(Pif.none.rawValue)
        return out
    }

    /// A client upload: per table its pif byte, u32 rule count and rules; then a 0 pif byte.
    ///
    /// The server never sends this; it is here for clients and tests.
    public static func upload(_ tables: [(TableKind, [WireRule])]) -> [UInt8] {
        var out: [UInt8] = []
        for (kind, rules) in tables {
            out.append(Pif(kind).rawValue)
            appendU32(UInt32(rules.count), to: &out)
            for rule in rules { out += encode(rule) }
        }
        out.append(Pif.none.rawValue)
        return out
    }

    // MARK: - Rule codec

    /// Encodes a rule into its 56 bytes.
    ///
    /// A nil address becomes `::` with the dual-stack flag; IPv4 addresses are IPv4-mapped;
    /// a nil target is all zeros. The interface name is cut at its first NUL and at 15
    /// bytes, which only changes names `Rule.validate` rejects anyway.
    public static func encode(_ r: WireRule) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: ruleSize)
        let rule = r.rule
        var flags: UInt8 = 0
        if let address = rule.address {
            storeAddress(address, into: &out, at: 0)
        } else {
            flags |= flagDualStack
        }
        if let target = rule.targetAddress { storeAddress(target, into: &out, at: 16) }
        let name = rule.interface.utf8.prefix { $0 != 0 }.prefix(Int(ifnamsiz) - 1)
        for (i, byte) in name.enumerated() { out[32 + i] = byte }
        storeU16(rule.firstPort, into: &out, at: 48)
        storeU16(rule.lastPort, into: &out, at: 50)
        storeU16(rule.targetPort, into: &out, at: 52)
        out[54] = protocolNumber(rule.proto)
        if r.bestEffort { flags |= flagWeak }
        if rule.scan { flags |= flagScan }
        out[55] = flags
        return out
    }

    /// Decodes one 56-byte rule.
    ///
    /// Checks only what the layout itself requires (size, NUL-terminated UTF-8 interface
    /// name, protocol, flag bits, `::` with the dual-stack flag); everything else is left to
    /// `Rule.validate(capabilities:)`.
    ///
    /// - Throws: `WireError` naming the field at fault.
    public static func decodeRule(_ bytes: ArraySlice<UInt8>) throws(WireError) -> WireRule {
        guard bytes.count == ruleSize else {
            throw WireError("a rule is \(ruleSize) bytes long, not \(bytes.count).")
        }
        let base = bytes.startIndex
        func byte(_ offset: Int) -> UInt8 { bytes[base + offset] }
        func u16(_ offset: Int) -> UInt16 { UInt16(byte(offset)) << 8 | UInt16(byte(offset + 1)) }

        let flags = byte(55)
        let unknown = flags & ~knownFlags
        if unknown != 0 {
            throw WireError(
                "flags 0x\(hex(flags)) have unknown bits 0x\(hex(unknown)); "
                    + "only 0x01 (dual-stack), 0x02 (weak) and 0x04 (scan) exist.")
        }

        let proto: TransportProtocol
        switch byte(54) {
        case 6: proto = .tcp
        case 17: proto = .udp
        default: throw WireError("protocol \(byte(54)) is not supported; use 6 (TCP) or 17 (UDP).")
        }

        let listen = loadAddress(bytes, at: base)
        let address: IPAddress?
        if flags & flagDualStack != 0 {
            guard listen == .anyIPv6 else {
                throw WireError("the dual-stack flag (0x01) needs the address ::, not \(listen).")
            }
            address = nil
        } else {
            address = listen
        }

        let target = loadAddress(bytes, at: base + 16)
        let targetAddress: IPAddress? = target == .anyIPv6 ? nil : target

        guard byte(47) == 0 else {
            throw WireError(
                "the interface name is not NUL-terminated: byte 47 of the rule is 0x\(hex(byte(47))), not 0.")
        }
        let nameBytes = bytes[(base + 32)..<(base + 47)].prefix { $0 != 0 }
        guard let interface = String(validating: nameBytes, as: UTF8.self) else {
            throw WireError("the interface name is not valid UTF-8.")
        }

        let rule = Rule(
            proto: proto, address: address, interface: interface,
            firstPort: u16(48), lastPort: u16(50),
            targetAddress: targetAddress, targetPort: u16(52),
            scan: flags & flagScan != 0)
        return WireRule(rule: rule, bestEffort: flags & flagWeak != 0)
    }

    // MARK: - Upload parser

    /// Incremental parser for the client's upload.
    ///
    /// Feed bytes as they arrive, in pieces of any size; `feed` returns the complete upload
    /// (tables in the order they came) once the terminating pif 0 has been read, or throws on
    /// the first malformed piece. After either, the parser is finished: further bytes throw.
    /// It rejects pifs other than HOST (1) and SPLICE (3), a pif given twice, a rule count over
    /// the limit, and every rule `decodeRule` rejects. It never traps, whatever the input.
    public struct UploadParser: Sendable {
        /// Where the parser is in the upload.
        private enum State: Sendable {
            /// Waiting for a pif byte (or the terminating 0).
            case pif
            /// Collecting the rule count of the block for `kind`.
            case count(TableKind)
            /// Collecting the rest of the `remaining` rules of the block for `kind`.
            case rules(TableKind, remaining: UInt32)
            /// The upload was complete and has been returned.
            case done
            /// A malformed piece was found.
            case failed(WireError)
        }

        /// The largest rule count accepted per table.
        public let maxRulesPerTable: Int
        private var state = State.pif
        /// Bytes of the field being collected (count or rule).
        private var pending: [UInt8] = []
        /// The tables parsed so far.
        private var tables: [(TableKind, [WireRule])] = []

        /// Makes a parser that accepts at most `maxRulesPerTable` rules per table.
        public init(maxRulesPerTable: Int = PestoV2Wire.maxRulesPerTable) {
            self.maxRulesPerTable = maxRulesPerTable
            pending.reserveCapacity(ruleSize)
        }

        /// True once the upload has been returned or an error thrown.
        public var isFinished: Bool {
            switch state {
            case .done, .failed: return true
            default: return false
            }
        }

        /// Consumes the next bytes of the upload.
        ///
        /// - Returns: the tables uploaded, once the terminating pif 0 is among `bytes`;
        ///   nil while more bytes are needed.
        /// - Throws: `WireError` for the first malformed piece, for bytes after the
        ///   terminator, and again for any feed after an error.
        public mutating func feed(_ bytes: UnsafeRawBufferPointer) throws(WireError) -> [(TableKind, [WireRule])]? {
            var index = 0
            while index < bytes.count {
                switch state {
                case .failed(let error):
                    throw error
                case .done:
                    throw fail("\(bytes.count - index) bytes follow the terminating pif 0 of the upload.")
                case .pif:
                    let byte = bytes[index]
                    index += 1
                    try startBlock(pif: byte)
                    if case .done = state {
                        if index < bytes.count {
                            throw fail("\(bytes.count - index) bytes follow the terminating pif 0 of the upload.")
                        }
                        let result = tables
                        tables = []
                        return result
                    }
                case .count(let kind):
                    index += collect(4, from: bytes, at: index)
                    if pending.count == 4 {
                        let count = pending.reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
                        pending.removeAll(keepingCapacity: true)
                        if UInt64(count) > UInt64(clamping: max(maxRulesPerTable, 0)) {
                            throw fail(
                                "the \(Pif(kind)) table has \(ClientText.counted(count, "rule")); at most \(maxRulesPerTable) are allowed.")
                        }
                        tables[tables.count - 1].1.reserveCapacity(Int(min(count, 1024)))
                        state = count == 0 ? .pif : .rules(kind, remaining: count)
                    }
                case .rules(let kind, let remaining):
                    index += collect(ruleSize, from: bytes, at: index)
                    if pending.count == ruleSize {
                        let number = tables[tables.count - 1].1.count + 1
                        let rule: WireRule
                        do {
                            rule = try decodeRule(pending[...])
                        } catch {
                            throw fail("rule \(number) of the \(Pif(kind)) table: \(error.message)")
                        }
                        pending.removeAll(keepingCapacity: true)
                        tables[tables.count - 1].1.append(rule)
                        state = remaining <= 1 ? .pif : .rules(kind, remaining: remaining - 1)
                    }
                }
            }
            if case .failed(let error) = state { throw error }
            return nil
        }

        /// Consumes the next bytes of the upload; see `feed(_: UnsafeRawBufferPointer)`.
        public mutating func feed(_ bytes: [UInt8]) throws(WireError) -> [(TableKind, [WireRule])]? {
            // Array.withUnsafeBytes only rethrows `any Error`; carry the typed error out in a Result.
            let result = bytes.withUnsafeBytes { raw in
                Result { () throws(WireError) in try feed(raw) }
            }
            return try result.get()
        }

        /// Handles a pif byte: ends the upload on 0, starts a block on a table's pif.
        private mutating func startBlock(pif byte: UInt8) throws(WireError) {
            guard let pif = Pif(rawValue: byte) else {
                throw fail("pif \(byte) is unknown; tables are uploaded for pif 1 (HOST) or 3 (SPLICE).")
            }
            guard pif != .none else {
                state = .done
                return
            }
            guard let kind = pif.tableKind else {
                throw fail(
                    "pif \(byte) (\(pif)) has no forwarding table; tables are uploaded for pif 1 (HOST) or 3 (SPLICE).")
            }
            if tables.contains(where: { $0.0 == kind }) {
                throw fail("pif \(byte) (\(pif)) is given twice in the upload; each table may appear once.")
            }
            tables.append((kind, []))
            state = .count(kind)
        }

        /// Moves up to `size - pending.count` bytes from `bytes[index...]` into `pending`.
        private mutating func collect(_ size: Int, from bytes: UnsafeRawBufferPointer, at index: Int) -> Int {
            let take = min(size - pending.count, bytes.count - index)
            pending.append(contentsOf: bytes[index..<(index + take)])
            return take
        }

        /// Records `message` as the parser's final error and returns it.
        private mutating func fail(_ message: String) -> WireError {
            let error = WireError(message)
            state = .failed(error)
            pending = []
            tables = []
            return error
        }
    }

    // MARK: - Helpers

    /// Appends `value` big-endian.
    private static func appendU32(_ value: UInt32, to out: inout [UInt8]) {
        out += [
            UInt8(truncatingIfNeeded: value >> 24), UInt8(truncatingIfNeeded: value >> 16),
            UInt8(truncatingIfNeeded: value >> 8), UInt8(truncatingIfNeeded: value),
        ]
    }

    /// Stores `value` big-endian at `offset`.
    private static func storeU16(_ value: UInt16, into out: inout [UInt8], at offset: Int) {
        out[offset] = UInt8(truncatingIfNeeded: value >> 8)
        out[offset + 1] = UInt8(truncatingIfNeeded: value)
    }

    /// Stores the 16-byte (IPv4-mapped for IPv4) form of `address` at `offset`.
    private static func storeAddress(_ address: IPAddress, into out: inout [UInt8], at offset: Int) {
        var a6 = address.in6
        withUnsafeBytes(of: &a6) { raw in
            for i in 0..<16 { out[offset + i] = raw[i] }
        }
    }

    /// Reads the 16-byte address at `index`; IPv4-mapped addresses become IPv4.
    private static func loadAddress(_ bytes: ArraySlice<UInt8>, at index: Int) -> IPAddress {
        var a6 = in6_addr()
        withUnsafeMutableBytes(of: &a6) { raw in
            for i in 0..<16 { raw[i] = bytes[index + i] }
        }
        return IPAddress(in6: a6)
    }

    /// The IP protocol number of `proto`.
    private static func protocolNumber(_ proto: TransportProtocol) -> UInt8 {
        switch proto {
        case .tcp: return 6
        case .udp: return 17
        }
    }

    /// Two hex digits.
    private static func hex(_ byte: UInt8) -> String {
        let digits = String(byte, radix: 16)
        return byte < 0x10 ? "0" + digits : digits
    }
}

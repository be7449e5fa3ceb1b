// SPDX-License-Identifier: GPL-2.0-or-later

// The pesto v2 codec: byte-exact output, lossless round trips, precise rejections, no traps.

import PestoTestSupport
import Testing

@testable import PestoModel

@Suite("Pesto v2 wire codec")
struct PestoV2WireTests {
    typealias Wire = PestoV2Wire
    typealias WireRule = PestoV2Wire.WireRule

    static func ip(_ s: String) -> IPAddress { IPAddress(s)! }

    /// Builds a 56-byte rule from its fields, following the layout table of doc/pesto-v2-wire.md.
    static func rawRule(
        address: [UInt8] = [UInt8](repeating: 0, count: 16),
        target: [UInt8] = [UInt8](repeating: 0, count: 16),
        ifname: [UInt8] = [UInt8](repeating: 0, count: 16),
        first: UInt16 = 80, last: UInt16 = 80, targetPort: UInt16 = 8080,
        proto: UInt8 = 6, flags: UInt8 = 0
    ) -> [UInt8] {
        func be16(_ v: UInt16) -> [UInt8] { [UInt8(v >> 8), UInt8(v & 0xFF)] }
        let out = address + target + ifname + be16(first) + be16(last) + be16(targetPort) + [proto, flags]
        precondition(out.count == 56)
        return out
    }

    static let mapped10001: [UInt8] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 10, 0, 0, 1]
    static let v6doc: [UInt8] = [0x20, 0x01, 0x0D, 0xB8] + [UInt8](repeating: 0, count: 11) + [1]

    static func be32(_ v: UInt32) -> [UInt8] {
        [UInt8(v >> 24), UInt8((v >> 16) & 0xFF), UInt8((v >> 8) & 0xFF), UInt8(v & 0xFF)]
    }

    /// Parses `bytes` in one piece.
    static func parse(
        _ bytes: [UInt8], max: Int = Wire.maxRulesPerTable
    ) throws(Wire.WireError) -> [(TableKind, [WireRule])]? {
        var parser = Wire.UploadParser(maxRulesPerTable: max)
        return try parser.feed(bytes)
    }

    /// Parses `bytes` one byte at a time; fails the test if a result comes before the end.
    static func parseByteByByte(_ bytes: [UInt8]) throws(Wire.WireError) -> [(TableKind, [WireRule])]? {
        var parser = Wire.UploadParser()
        for (i, byte) in bytes.enumerated() {
            if let result = try parser.feed([byte]) {
                #expect(i == bytes.count - 1, "result before the last byte")
                return result
            }
        }
        return nil
    }

    /// Makes the comparison of parsed uploads easy: tuples are not Equatable.
    static func flat(_ tables: [(TableKind, [WireRule])]?) -> [String: [WireRule]]? {
        guard let tables else { return nil }
        var out: [String: [WireRule]] = [:]
        for (kind, rules) in tables { out[kind.rawValue] = rules }
        return out
    }

    /// Rules covering every field and flag.
    static let samples: [WireRule] = [
        WireRule(rule: Rule(proto: .tcp, firstPort: 80)),
        WireRule(rule: Rule(proto: .udp, firstPort: 53, targetPort: 5353), bestEffort: true),
        WireRule(rule: Rule(proto: .tcp, address: .anyIPv4, firstPort: 1000, lastPort: 1999, targetPort: 2000)),
        WireRule(rule: Rule(proto: .tcp, address: .anyIPv6, firstPort: 443)),
        WireRule(rule: Rule(proto: .udp, address: ip("127.0.0.1"), firstPort: 1, lastPort: 65535)),
        WireRule(
            rule: Rule(
                proto: .tcp, address: ip("::1"), firstPort: 22, targetAddress: ip("fe80::1"), targetPort: 2222)),
        WireRule(rule: Rule(proto: .tcp, address: ip("192.0.2.7"), firstPort: 8080, targetAddress: ip("10.0.0.1"))),
        WireRule(rule: Rule(proto: .tcp, address: ip("2001:db8::5"), interface: "eth0", firstPort: 80, targetPort: 81)),
        WireRule(rule: Rule(proto: .udp, interface: "abcdefghijklmno", firstPort: 9), bestEffort: true),
        WireRule(rule: Rule(proto: .tcp, firstPort: 1, lastPort: 1024, scan: true)),
        WireRule(
            rule: Rule(proto: .udp, address: .anyIPv4, firstPort: 5000, lastPort: 6000, scan: true), bestEffort: true),
        WireRule(rule: Rule(proto: .tcp, firstPort: 90, lastPort: 80)),  // reversed: passed through
        WireRule(rule: Rule(proto: .tcp, firstPort: 0, lastPort: 0, targetPort: 0)),  // ports 0: passed through
    ]

    // MARK: - Server output

    @Test("hello is the 20 bytes upstream expects")
    func hello() {
        let expected: [UInt8] = [
            0x62, 0x61, 0x73, 0x69, 0x6C, 0x3A, 0x73, 0x00,  // "basil:s\0"
            0, 0, 0, 2, 0, 0, 0, 128, 0, 0, 0, 16,
        ]
        #expect(Wire.hello() == expected)
        #expect(Wire.magic == Array("basil:s\0".utf8))
    }

    @Test("the table dump has pif, name, caps at 128, count at 132, rules and a 0 terminator")
    func tableDump() {
        let host = [Self.samples[0], Self.samples[2]]
        let splice = [Self.samples[5]]
        let hostCaps: Capabilities = [.ipv4, .ipv6, .tcp, .udp, .scan, .ifname]
        let dump = Wire.tableDump([(.host, hostCaps, host), (.splice, [.ipv6, .tcp], splice)])
        #expect(dump.count == 1 + 136 + 2 * 56 + 1 + 136 + 56 + 1)

        #expect(dump[0] == 1)
        let info = Array(dump[1..<137])
        #expect(Array(info[0..<5]) == Array("HOST\0".utf8))
        #expect(info[4..<128].allSatisfy { $0 == 0 })
        #expect(Array(info[128..<132]) == [0, 0, 0, 0x3F])
        #expect(Array(info[132..<136]) == [0, 0, 0, 2])
        #expect(Array(dump[137..<193]) == Wire.encode(host[0]))
        #expect(Array(dump[193..<249]) == Wire.encode(host[1]))

        let s = 249
        #expect(dump[s] == 3)
        #expect(Array(dump[(s + 1)..<(s + 8)]) == Array("SPLICE\0".utf8))
        #expect(Array(dump[(s + 1 + 128)..<(s + 1 + 132)]) == [0, 0, 0, 0x06])
        #expect(Array(dump[(s + 1 + 132)..<(s + 1 + 136)]) == [0, 0, 0, 1])
        #expect(Array(dump[(s + 137)..<(s + 193)]) == Wire.encode(splice[0]))
        #expect(dump.last == 0)
    }

    @Test("an empty dump is just the terminator; unknown caps bits are left out")
    func emptyDump() {
        #expect(Wire.tableDump([]) == [0])
        let dump = Wire.tableDump([(.host, Capabilities(rawValue: 0xFFFF_FFFF), [])])
        #expect(dump.count == 1 + 136 + 1)
        #expect(Array(dump[129..<133]) == [0, 0, 0, 0x3F])
        #expect(Array(dump[133..<137]) == [0, 0, 0, 0])
    }

    @Test("pifs map to table kinds and back")
    func pifs() {
        #expect(Wire.Pif(.host) == .host && Wire.Pif(.host).rawValue == 1)
        #expect(Wire.Pif(.splice) == .splice && Wire.Pif(.splice).rawValue == 3)
        #expect(Wire.Pif.host.tableKind == .host)
        #expect(Wire.Pif.splice.tableKind == .splice)
        #expect(Wire.Pif.tap.tableKind == nil)
        #expect(Wire.Pif.none.tableKind == nil)
    }

    // MARK: - Rule codec

    @Test("every sample survives encode then decode", arguments: samples.indices)
    func roundTrip(_ i: Int) throws {
        let bytes = Wire.encode(Self.samples[i])
        #expect(bytes.count == 56)
        #expect(try Wire.decodeRule(bytes[...]) == Self.samples[i])
    }

    @Test("decodeRule honours the slice's own indices")
    func sliceIndices() throws {
        let bytes = [0xAA, 0xBB] + Wire.encode(Self.samples[7]) + [0xCC]
        #expect(try Wire.decodeRule(bytes[2..<58]) == Self.samples[7])
    }

    @Test("a hand-built rule decodes field by field")
    func handBuilt() throws {
        let raw = Self.rawRule(
            address: Self.mapped10001, target: Self.mapped10001.dropLast() + [2],
            ifname: Array("veth0".utf8) + [UInt8](repeating: 0, count: 11),
            first: 0x1F90, last: 0x1F99, targetPort: 0x0050, proto: 17, flags: 0x06)
        let decoded = try Wire.decodeRule(raw[...])
        #expect(decoded.rule.address == Self.ip("10.0.0.1"))
        #expect(decoded.rule.targetAddress == Self.ip("10.0.0.2"))
        #expect(decoded.rule.interface == "veth0")
        #expect(decoded.rule.firstPort == 8080)
        #expect(decoded.rule.lastPort == 8089)
        #expect(decoded.rule.targetPort == 80)
        #expect(decoded.rule.proto == .udp)
        #expect(decoded.rule.scan)
        #expect(decoded.bestEffort)
        #expect(decoded.rule.owner == "")
        #expect(Wire.encode(decoded) == raw)
    }

    @Test("a hand-built rule matches what encode writes, byte for byte")
    func encodeLayout() {
        let rule = WireRule(
            rule: Rule(
                proto: .tcp, address: Self.ip("2001:db8::1"), interface: "lo",
                firstPort: 0x0102, lastPort: 0x0304, targetAddress: Self.ip("2001:db8::2"), targetPort: 0x0506))
        let bytes = Wire.encode(rule)
        #expect(Array(bytes[0..<16]) == Self.v6doc)
        #expect(Array(bytes[16..<32]) == Self.v6doc.dropLast() + [2])
        #expect(Array(bytes[32..<48]) == [0x6C, 0x6F] + [UInt8](repeating: 0, count: 14))
        #expect(Array(bytes[48..<54]) == [1, 2, 3, 4, 5, 6])
        #expect(bytes[54] == 6)
        #expect(bytes[55] == 0)
    }

    @Test("addresses: dual-stack is :: plus flag 0x01, wildcards keep their family, v4 is mapped")
    func addressMapping() throws {
        let dual = Wire.encode(WireRule(rule: Rule(proto: .tcp, firstPort: 80)))
        #expect(dual[0..<16].allSatisfy { $0 == 0 } && dual[55] == 0x01)
        #expect(dual[16..<32].allSatisfy { $0 == 0 })

        let any6 = try Wire.decodeRule(Self.rawRule()[...])
        #expect(any6.rule.address == .anyIPv6)
        #expect(any6.rule.targetAddress == nil)

        let mappedAny: [UInt8] = [UInt8](repeating: 0, count: 10) + [0xFF, 0xFF, 0, 0, 0, 0]
        let any4 = try Wire.decodeRule(Self.rawRule(address: mappedAny)[...])
        #expect(any4.rule.address == .anyIPv4)
        #expect(Array(Wire.encode(any4)[0..<16]) == mappedAny)

        let dualDecoded = try Wire.decodeRule(Self.rawRule(flags: 0x01)[...])
        #expect(dualDecoded.rule.address == nil)
        #expect(dualDecoded.rule.isDualStack)

        let v4 = Wire.encode(WireRule(rule: Rule(proto: .tcp, address: Self.ip("10.0.0.1"), firstPort: 80)))
        #expect(Array(v4[0..<16]) == Self.mapped10001)
    }

    @Test("bytes after the interface name's first NUL are ignored")
    func ifnameAfterNul() throws {
        let name: [UInt8] = Array("eth1".utf8) + [0, 0x41, 0x42] + [UInt8](repeating: 0, count: 9)
        #expect(try Wire.decodeRule(Self.rawRule(ifname: name)[...]).rule.interface == "eth1")
    }

    /// (raw rule, a fragment the message must contain).
    static let badRules: [([UInt8], String)] = [
        (
            rawRule(ifname: [UInt8](repeating: 0x41, count: 16)),
            "the interface name is not NUL-terminated: byte 47 of the rule is 0x41, not 0."
        ),
        (
            rawRule(ifname: [UInt8](repeating: 0, count: 15) + [1]),
            "byte 47 of the rule is 0x01"
        ),
        (rawRule(ifname: [0xFF, 0xFE] + [UInt8](repeating: 0, count: 14)), "the interface name is not valid UTF-8."),
        (rawRule(proto: 1), "protocol 1 is not supported; use 6 (TCP) or 17 (UDP)."),
        (rawRule(proto: 0), "protocol 0 is not supported"),
        (
            rawRule(flags: 0x08),
            "flags 0x08 have unknown bits 0x08; only 0x01 (dual-stack), 0x02 (weak) and 0x04 (scan) exist."
        ),
        (rawRule(flags: 0x83), "flags 0x83 have unknown bits 0x80"),
        (rawRule(address: mapped10001, flags: 0x01), "the dual-stack flag (0x01) needs the address ::, not 10.0.0.1."),
        (
            rawRule(address: [UInt8](repeating: 0, count: 10) + [0xFF, 0xFF, 0, 0, 0, 0], flags: 0x01),
            "needs the address ::, not 0.0.0.0."
        ),
        (rawRule(address: v6doc, flags: 0x03), "needs the address ::, not 2001:db8::1."),
    ]

    @Test("each malformed rule is rejected with its own message", arguments: badRules.indices)
    func badRule(_ i: Int) {
        let (raw, fragment) = Self.badRules[i]
        #expect {
            _ = try Wire.decodeRule(raw[...])
        } throws: { error in
            (error as? Wire.WireError)?.message.contains(fragment) ?? false
        }
    }

    @Test("decodeRule rejects slices that are not 56 bytes")
    func badSize() {
        #expect(throws: Wire.WireError("a rule is 56 bytes long, not 55.")) {
            _ = try Wire.decodeRule(Self.rawRule().dropLast())
        }
    }

    // MARK: - Upload parser

    static let upload: [UInt8] = Wire.upload([(.host, Array(samples[0..<7])), (.splice, Array(samples[7...]))])

    @Test("an upload parses the same in one piece and byte by byte")
    func uploadWholeAndByByte() throws {
        let whole = try Self.parse(Self.upload)
        let bytewise = try Self.parseByteByByte(Self.upload)
        #expect(whole != nil)
        #expect(Self.flat(whole) == Self.flat(bytewise))
        #expect(whole?.map(\.0) == [.host, .splice])
        #expect(whole?[0].1 == Array(Self.samples[0..<7]))
        #expect(whole?[1].1 == Array(Self.samples[7...]))
    }

    @Test("an upload parses the same in pieces of every size")
    func uploadChunks() throws {
        let expected = Self.flat(try Self.parse(Self.upload))
        for size in [2, 3, 5, 7, 55, 56, 57, 113, 1000] {
            var parser = Wire.UploadParser()
            var result: [(TableKind, [WireRule])]?
            var start = 0
            while start < Self.upload.count {
                let end = min(start + size, Self.upload.count)
                #expect(result == nil)
                result = try parser.feed(Array(Self.upload[start..<end]))
                start = end
            }
            #expect(Self.flat(result) == expected, "chunk size \(size)")
            #expect(parser.isFinished)
        }
    }

    @Test("the raw-buffer feed works on a buffer that is not an array's start")
    func rawBufferFeed() throws {
        let padded: [UInt8] = [9, 9] + Self.upload
        var parser = Wire.UploadParser()
        let result = try padded.withUnsafeBytes { raw throws(Wire.WireError) in
            try parser.feed(UnsafeRawBufferPointer(rebasing: raw[2...]))
        }
        #expect(Self.flat(result) == Self.flat(try Self.parse(Self.upload)))
    }

    @Test("edge uploads: empty, empty tables, incomplete")
    func edgeUploads() throws {
        let empty = try Self.parse([0])
        #expect(empty != nil && empty!.isEmpty)

        let emptyTables = try Self.parse([1, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0])
        #expect(emptyTables?.map(\.0) == [.host, .splice])
        #expect(emptyTables?.allSatisfy { $0.1.isEmpty } == true)

        #expect(try Self.parse([]) == nil)
        #expect(try Self.parse(Array(Self.upload.dropLast())) == nil)
        #expect(try Self.parse([1, 0, 0, 0, 1] + Self.rawRule().dropLast()) == nil)
    }

    @Test("a rule count at the limit is accepted")
    func atLimit() throws {
        let rules = [WireRule](repeating: Self.samples[1], count: 3)
        let result = try Self.parse(Wire.upload([(.host, rules)]), max: 3)
        #expect(result?.first?.1 == rules)
    }

    /// (upload bytes, parser limit, the exact message).
    static let badUploads: [([UInt8], Int, String)] = [
        (
            [2, 0, 0, 0, 0, 0], 10,
            "pif 2 (TAP) has no forwarding table; tables are uploaded for pif 1 (HOST) or 3 (SPLICE)."
        ),
        ([4], 10, "pif 4 is unknown; tables are uploaded for pif 1 (HOST) or 3 (SPLICE)."),
        ([0xFF], 10, "pif 255 is unknown; tables are uploaded for pif 1 (HOST) or 3 (SPLICE)."),
        (
            [1, 0, 0, 0, 0, 3, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0], 10,
            "pif 1 (HOST) is given twice in the upload; each table may appear once."
        ),
        ([3, 0, 0, 0, 0, 3], 10, "pif 3 (SPLICE) is given twice in the upload; each table may appear once."),
        ([1, 0, 0, 0, 4], 3, "the HOST table has 4 rules; at most 3 are allowed."),
        ([3, 0xFF, 0xFF, 0xFF, 0xFF], 65535, "the SPLICE table has 4294967295 rules; at most 65535 are allowed."),
        ([1, 0, 1, 0, 0], 65535, "the HOST table has 65536 rules; at most 65535 are allowed."),
        (
            [1, 0, 0, 0, 2] + rawRule() + rawRule(ifname: [UInt8](repeating: 0x41, count: 16)), 10,
            "rule 2 of the HOST table: the interface name is not NUL-terminated: byte 47 of the rule is 0x41, not 0."
        ),
        (
            [3, 0, 0, 0, 1] + rawRule(proto: 58), 10,
            "rule 1 of the SPLICE table: protocol 58 is not supported; use 6 (TCP) or 17 (UDP)."
        ),
        (
            [1, 0, 0, 0, 1] + rawRule(flags: 0x10), 10,
            "rule 1 of the HOST table: flags 0x10 have unknown bits 0x10; "
                + "only 0x01 (dual-stack), 0x02 (weak) and 0x04 (scan) exist."
        ),
        (
            [1, 0, 0, 0, 1] + rawRule(address: v6doc, flags: 0x01), 10,
            "rule 1 of the HOST table: the dual-stack flag (0x01) needs the address ::, not 2001:db8::1."
        ),
        ([0, 0], 10, "1 bytes follow the terminating pif 0 of the upload."),
        ([1, 0, 0, 0, 0, 0, 7, 7, 7], 10, "3 bytes follow the terminating pif 0 of the upload."),
    ]

    @Test(
        "each malformed upload is rejected with a precise message, whole and byte by byte",
        arguments: badUploads.indices)
    func badUpload(_ i: Int) {
        let (bytes, limit, message) = Self.badUploads[i]
        #expect(throws: Wire.WireError(message)) { _ = try Self.parse(bytes, max: limit) }

        // Byte by byte, the same error comes out (trailing bytes are counted per feed).
        var parser = Wire.UploadParser(maxRulesPerTable: limit)
        var thrown: Wire.WireError?
        for byte in bytes {
            do { _ = try parser.feed([byte]) } catch {
                thrown = error
                break
            }
        }
        if message.contains("follow the terminating") {
            #expect(thrown == Wire.WireError("1 bytes follow the terminating pif 0 of the upload."))
        } else {
            #expect(thrown == Wire.WireError(message))
        }
    }

    @Test("after an error or the end, every feed throws")
    func finished() throws {
        var parser = Wire.UploadParser()
        #expect(throws: Wire.WireError.self) { _ = try parser.feed([7]) }
        #expect(parser.isFinished)
        #expect(throws: Wire.WireError("pif 7 is unknown; tables are uploaded for pif 1 (HOST) or 3 (SPLICE).")) {
            _ = try parser.feed([0])
        }

        var done = Wire.UploadParser()
        #expect(try done.feed([0]) != nil)
        #expect(done.isFinished)
        #expect(throws: Wire.WireError("1 bytes follow the terminating pif 0 of the upload.")) {
            _ = try done.feed([0])
        }
    }

    @Test("decoded upload rules go through Rule.validate like any other")
    func validateAfterParse() throws {
        let reversed = try Self.parse(Wire.upload([(.host, [Self.samples[11]])]))
        #expect(throws: PestoError.self) {
            try reversed?.first?.1.first?.rule.validate(capabilities: [.ipv4, .ipv6, .tcp, .udp])
        }
    }

    // MARK: - Fuzz

    @Test("20,000 random byte strings never trap the parser")
    func fuzz() {
        var rng = SeededRandom(seed: 0x5EED_BA51_1CAF_E000)
        var completed = 0
        var rejected = 0
        for round in 0..<20_000 {
            var bytes: [UInt8]
            switch round % 4 {
            case 0:
                // Pure noise.
                bytes = (0..<Int.random(in: 0...300, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
            case 1:
                // Plausible headers with small counts, noisy rules.
                let pif: UInt8 = [1, 3][Int.random(in: 0...1, using: &rng)]
                let count = UInt32.random(in: 0...3, using: &rng)
                bytes = [pif] + Self.be32(count)
                bytes += (0..<Int.random(in: 0...200, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
            default:
                // A valid upload with a few bytes flipped or cut.
                bytes = Self.upload
                for _ in 0..<Int.random(in: 1...4, using: &rng) {
                    bytes[Int.random(in: 0..<bytes.count, using: &rng)] = UInt8.random(in: 0...255, using: &rng)
                }
                if Bool.random(using: &rng) { bytes.removeLast(Int.random(in: 0...60, using: &rng)) }
            }
            var parser = Wire.UploadParser(maxRulesPerTable: Int.random(in: 0...8, using: &rng))
            var start = 0
            do {
                while start < bytes.count {
                    let end = min(bytes.count, start + Int.random(in: 1...80, using: &rng))
                    if try parser.feed(Array(bytes[start..<end])) != nil { completed += 1 }
                    start = end
                }
            } catch {
                rejected += 1
                #expect(!error.message.isEmpty)
            }
        }
        #expect(completed + rejected > 0)
    }
}

// SPDX-License-Identifier: GPL-2.0-or-later

// PROXY protocol headers byte for byte, against the examples and layout of HAProxy's
// specification (proxy-protocol.txt): v1 text, v2 binary, IPv4, IPv6, and mixed families.

import Testing

@testable import PestoModel

@Suite("PROXY protocol headers")
struct ProxyProtocolTests {
    static func ip(_ s: String) -> IPAddress { IPAddress(s)! }

    @Test("v1 over IPv4 is the specification's text line")
    func v1IPv4() {
        let h = ProxyProtocolHeader.bytes(.v1, source: (Self.ip("192.168.0.1"), 56324), destination: (Self.ip("192.168.0.11"), 443))
        #expect(String(decoding: h, as: UTF8.self) == "PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n")
    }

    @Test("v1 over IPv6, and mixed families as TCP6 with the IPv4 address IPv4-mapped")
    func v1IPv6() {
        let h = ProxyProtocolHeader.bytes(.v1, source: (Self.ip("2001:db8::1"), 1), destination: (Self.ip("::1"), 65535))
        #expect(String(decoding: h, as: UTF8.self) == "PROXY TCP6 2001:db8::1 ::1 1 65535\r\n")
        let mixed = ProxyProtocolHeader.bytes(.v1, source: (Self.ip("10.0.0.1"), 5), destination: (Self.ip("fd00::2"), 6))
        #expect(String(decoding: mixed, as: UTF8.self) == "PROXY TCP6 ::ffff:10.0.0.1 fd00::2 5 6\r\n")
    }

    @Test("the longest v1 header fits maxLength (107 bytes)")
    func v1Longest() {
        let a = Self.ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")
        let h = ProxyProtocolHeader.bytes(.v1, source: (a, 65535), destination: (a, 65535))
        #expect(h.count == 104)
        #expect(h.count <= 107 && h.count <= ProxyProtocolHeader.maxLength)
    }

    @Test("v2 over IPv4: signature, PROXY command, TCP over IPv4, length 12, addresses then ports")
    func v2IPv4() {
        let h = ProxyProtocolHeader.bytes(.v2, source: (Self.ip("192.168.0.1"), 56324), destination: (Self.ip("192.168.0.11"), 443))
        #expect(h == ProxyProtocolHeader.v2Signature + [0x21, 0x11, 0x00, 0x0C, 192, 168, 0, 1, 192, 168, 0, 11, 0xDC, 0x04, 0x01, 0xBB])
        #expect(ProxyProtocolHeader.v2Signature == Array("\r\n\r\n\0\r\nQUIT\n".utf8))
    }

    @Test("v2 over IPv6 (length 36), and mixed families as IPv6 with the IPv4 address IPv4-mapped")
    func v2IPv6() {
        let h = ProxyProtocolHeader.bytes(.v2, source: (Self.ip("2001:db8::1"), 1), destination: (Self.ip("::1"), 2))
        let src: [UInt8] = [0x20, 0x01, 0x0D, 0xB8] + Array(repeating: 0, count: 11) + [1]
        let dst: [UInt8] = Array(repeating: 0, count: 15) + [1]
        #expect(h == ProxyProtocolHeader.v2Signature + [0x21, 0x21, 0x00, 0x24] + src + dst + [0, 1, 0, 2])
        #expect(h.count == 52)
        let mixed = ProxyProtocolHeader.bytes(.v2, source: (Self.ip("10.0.0.1"), 1), destination: (Self.ip("::1"), 2))
        let mapped: [UInt8] = Array(repeating: 0, count: 10) + [0xFF, 0xFF, 10, 0, 0, 1]
        #expect(mixed == ProxyProtocolHeader.v2Signature + [0x21, 0x21, 0x00, 0x24] + mapped + dst + [0, 1, 0, 2])
    }

    @Test("unknown addresses: v1 PROXY UNKNOWN, v2 LOCAL with family UNSPEC; none appends nothing")
    func unknownAndNone() {
        var b: [UInt8] = []
        ProxyProtocolHeader.appendUnknown(.v1, to: &b)
        #expect(String(decoding: b, as: UTF8.self) == "PROXY UNKNOWN\r\n")
        b = []
        ProxyProtocolHeader.appendUnknown(.v2, to: &b)
        #expect(b == ProxyProtocolHeader.v2Signature + [0x20, 0x00, 0x00, 0x00])
        #expect(ProxyProtocolHeader.bytes(.none, source: (.loopbackIPv4, 1), destination: (.loopbackIPv4, 2)).isEmpty)
    }

    @Test("the rule key: \"\", v1 and v2 parse; anything else is InvalidRule naming the value")
    func parsing() throws {
        #expect(try ProxyProtocolVersion(parsing: "") == ProxyProtocolVersion.none)
        #expect(try ProxyProtocolVersion(parsing: "v1") == .v1)
        #expect(try ProxyProtocolVersion(parsing: "v2") == .v2)
        for bad in ["V1", "1", "v3", "none", " v1"] {
            do {
                _ = try ProxyProtocolVersion(parsing: bad)
                Issue.record("\(bad) accepted")
            } catch {
                #expect(error.code == .invalidRule && error.message.contains("proxy-protocol"), "\(error.message)")
            }
        }
        let rule = try Rule(fields: [.proto: .text("tcp"), .firstPort: .port(80), .proxyProtocol: .text("v2")])
        #expect(rule.proxyProtocol == .v2 && rule[.proxyProtocol] == .text("v2"))
        #expect(try Rule(fields: [.proto: .text("tcp"), .firstPort: .port(80)]).proxyProtocol == .none)
    }
}

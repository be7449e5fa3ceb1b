// SPDX-License-Identifier: GPL-2.0-or-later

// The rtnetlink requests of transparent source: their bytes, against the layout of
// linux/netlink.h, rtnetlink.h and fib_rules.h written out by hand, the parsing of the
// kernel's acknowledgement, and (root) the requests applied to a real namespace and read
// back with ip(8).

import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoEngine
@testable import PestoModel

#if canImport(Glibc)
    import Glibc
#endif

@Suite("rtnetlink requests", .timeLimit(.minutes(10)))
struct RouteNetlinkTests {
    /// Little-endian bytes of a 16- and 32-bit value (the machine's order: netlink is host order).
    static func le16(_ v: UInt16) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }
    static func le32(_ v: UInt32) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }

    @Test("the fwmark rule: nlmsghdr, fib_rule_hdr, priority, table, mark and mask")
    func fwmarkRule() {
        let rule = RoutingRule(family: AF_INET6, priority: 28773, table: 28773, mark: 0x7065)
        let bytes = RouteNetlinkMessage.rule(rule, add: true, sequence: 9)
        var expected: [UInt8] = []
        expected += Self.le32(60)  // 16 header + 12 fib_rule_hdr + 4 attributes of 8
        expected += Self.le16(32)  // RTM_NEWRULE
        expected += Self.le16(0x1 | 0x4 | 0x400 | 0x200)  // REQUEST, ACK, CREATE, EXCL
        expected += Self.le32(9) + Self.le32(0)
        expected += [10, 0, 0, 0, 0, 0, 0, 1] + Self.le32(0)  // AF_INET6, action FR_ACT_TO_TBL
        expected += Self.le16(8) + Self.le16(6) + Self.le32(28773)  // FRA_PRIORITY
        expected += Self.le16(8) + Self.le16(15) + Self.le32(28773)  // FRA_TABLE
        expected += Self.le16(8) + Self.le16(10) + Self.le32(0x7065)  // FRA_FWMARK
        expected += Self.le16(8) + Self.le16(16) + Self.le32(0xFFFF_FFFF)  // FRA_FWMASK
        #expect(bytes == expected)
        // Deleting: RTM_DELRULE, neither CREATE nor EXCL, the same attributes.
        let delete = RouteNetlinkMessage.rule(rule, add: false, sequence: 9)
        #expect(Array(delete[4..<8]) == Self.le16(33) + Self.le16(0x1 | 0x4))
        #expect(delete[16...] == expected[16...])
    }

    @Test("a rule by input interface and protocol: the name NUL-terminated and padded")
    func interfaceRule() {
        let rule = RoutingRule(family: AF_INET, priority: 100, table: 200, inputInterface: "lo", ipProtocol: UInt8(IPPROTO_UDP))
        let bytes = RouteNetlinkMessage.rule(rule, add: true, sequence: 1)
        let attributes = Array(bytes[28...])
        var expected: [UInt8] = []
        expected += Self.le16(8) + Self.le16(6) + Self.le32(100)
        expected += Self.le16(8) + Self.le16(15) + Self.le32(200)
        expected += Self.le16(7) + Self.le16(3) + [0x6C, 0x6F, 0, 0]  // FRA_IIFNAME "lo\0", padded
        expected += Self.le16(5) + Self.le16(22) + [17, 0, 0, 0]  // FRA_IP_PROTO udp, padded
        #expect(attributes == expected)
        #expect(Array(bytes[0..<4]) == Self.le32(UInt32(bytes.count)))
    }

    @Test("local routes: the family's default, and one address")
    func localRoutes() throws {
        let all = RouteNetlinkMessage.route(.all(.ipv4, table: 28773), add: true, sequence: 3)
        var expected: [UInt8] = []
        expected += Self.le32(44) + Self.le16(24) + Self.le16(0x1 | 0x4 | 0x400 | 0x100)  // RTM_NEWROUTE, CREATE, REPLACE
        expected += Self.le32(3) + Self.le32(0)
        expected += [2, 0, 0, 0, 0, 4, 254, 2] + Self.le32(0)  // AF_INET, /0, RTPROT_STATIC, host scope, RTN_LOCAL
        expected += Self.le16(8) + Self.le16(15) + Self.le32(28773)  // RTA_TABLE
        expected += Self.le16(8) + Self.le16(4) + Self.le32(1)  // RTA_OIF lo
        #expect(all == expected)
        let one = RouteNetlinkMessage.route(
            LocalRoute(destination: try #require(IPAddress("2001:db8::7")), prefixLength: 128, table: 5), add: false, sequence: 4)
        #expect(Array(one[4..<8]) == Self.le16(25) + Self.le16(0x1 | 0x4))  // RTM_DELROUTE
        #expect(one[16] == 10 && one[17] == 128)
        // RTA_DST after RTA_TABLE: 16 bytes of the address in network order.
        #expect(Array(one[36..<40]) == Self.le16(20) + Self.le16(1))
        #expect(Array(one[40..<56]) == [0x20, 0x01, 0x0D, 0xB8] + [UInt8](repeating: 0, count: 11) + [7])
    }

    @Test("a UDP client's route: its address, and the target as preferred source")
    func clientRoute() throws {
        let route = LocalRoute(destination: .v4(0xC000_0207), prefixLength: 32, table: 28774, preferredSource: .loopbackIPv4)
        let bytes = RouteNetlinkMessage.route(route, add: true, sequence: 1)
        var expected: [UInt8] = []
        expected += Self.le16(8) + Self.le16(15) + Self.le32(28774)  // RTA_TABLE
        expected += Self.le16(8) + Self.le16(1) + [192, 0, 2, 7]  // RTA_DST
        expected += Self.le16(8) + Self.le16(4) + Self.le32(1)  // RTA_OIF
        expected += Self.le16(8) + Self.le16(7) + [127, 0, 0, 1]  // RTA_PREFSRC
        #expect(Array(bytes[28...]) == expected)
        #expect(bytes[17] == 32)
    }

    @Test("acknowledgements: success, an errno, and anything else")
    func acknowledgements() {
        func ack(_ error: Int32, sequence: UInt32, type: UInt16 = 2) -> [UInt8] {
            Self.le32(36) + Self.le16(type) + Self.le16(0) + Self.le32(sequence) + Self.le32(0)
                + withUnsafeBytes(of: error.littleEndian) { Array($0) } + [UInt8](repeating: 0, count: 16)
        }
        #expect(ack(0, sequence: 5).withUnsafeBytes { RouteNetlinkMessage.acknowledgement($0, sequence: 5) } == nil)
        #expect(
            ack(-EEXIST, sequence: 5).withUnsafeBytes { RouteNetlinkMessage.acknowledgement($0, sequence: 5) } == Errno(rawValue: EEXIST))
        #expect(ack(0, sequence: 4).withUnsafeBytes { RouteNetlinkMessage.acknowledgement($0, sequence: 5) } == Errno(rawValue: EPROTO))
        #expect(
            ack(0, sequence: 5, type: 3).withUnsafeBytes { RouteNetlinkMessage.acknowledgement($0, sequence: 5) } == Errno(rawValue: EPROTO)
        )
        #expect(
            [UInt8](repeating: 0, count: 8).withUnsafeBytes { RouteNetlinkMessage.acknowledgement($0, sequence: 0) }
                == Errno(rawValue: EPROTO))
    }

    @Test(
        "applied in a real namespace: ip(8) shows the rule and route, EEXIST and ENOENT come back",
        .enabled(if: getuid() == 0, "needs root for ip netns"))
    func realNamespace() throws {
        let ns = try TestNamespace()
        let rule = RoutingRule(family: AF_INET, priority: 28773, table: 28773, mark: 0x7065)
        let route = LocalRoute.all(.ipv6, table: 28773)
        /// The errno of a request, nil for success.
        func errno(_ r: Result<Void, Errno>) -> Errno? {
            if case .failure(let e) = r { return e }
            return nil
        }
        let results: [Errno?]? = ns.namespace.perform {
            guard let netlink = try? RouteNetlink() else { return nil }
            return [
                netlink.request(rule, add: true), netlink.request(rule, add: true), netlink.request(route, add: true),
                netlink.request(route, add: true),
            ].map(errno)
        }
        #expect(results == [nil, Errno(rawValue: EEXIST), nil, nil])
        let rules = try run("/usr/sbin/ip", ["-n", ns.name, "rule", "show"]).out
        #expect(rules.contains("28773:\tfrom all fwmark 0x7065 lookup 28773"), "\(rules)")
        let routes = try run("/usr/sbin/ip", ["-n", ns.name, "-6", "route", "show", "table", "28773"]).out
        #expect(routes.split(separator: "\n").count == 1 && routes.contains("local default dev lo"), "\(routes)")
        let removed: [Errno?]? = ns.namespace.perform {
            guard let netlink = try? RouteNetlink() else { return nil }
            return [netlink.request(rule, add: false), netlink.request(rule, add: false), netlink.request(route, add: false)].map(errno)
        }
        #expect(removed == [nil, Errno(rawValue: ENOENT), nil])
        #expect(try !run("/usr/sbin/ip", ["-n", ns.name, "rule", "show"]).out.contains("28773"))
    }
}

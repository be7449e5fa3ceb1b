// SPDX-License-Identifier: GPL-2.0-or-later

// Transparent source end to end: pestod started with --netns relays TCP connections into the
// namespace from the client's own address (rule key `source` "client"), and installs and
// removes the policy routing that brings the server's replies back, in that namespace only.
//
// The clients use addresses of TEST-NET (192.0.2.x, 2001:db8:7065::x) added to the host's
// loopback for the test: addresses the namespace does not have, so without pestod's routing
// the server's replies to them would find no route (127.0.0.x would be local there anyway).
// The server is a listening socket made inside the namespace; the test accepts from it and
// reads the peer address the kernel gives.
//
// pestod runs in process (InProcessPestod.swift, its engine given the namespace as --netns
// gives it), the clients on helper threads while the test's thread turns the loop; the two
// cases that stop pestod (SIGTERM, a takeover) start it as a process on a private bus.

import Foundation
import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoDBus
@testable import PestoService

@Suite(
    "pestod transparent source", .serialized, .enabled(if: getuid() == 0, "needs root for ip netns and addresses"), .timeLimit(.minutes(10))
)
struct TransparentSourceTests {
    /// Client addresses on the host's loopback, removed when the value goes away.
    final class ClientAddresses {
        let v4: IPAddress
        let v6: IPAddress
        init() throws {
            let n = UInt32.random(in: 1...254)
            v4 = .v4(0xC000_0200 | n)  // 192.0.2.n
            v6 = try #require(IPAddress("2001:db8:7065::\(String(n, radix: 16))"))
            let a = try run("/usr/sbin/ip", ["addr", "add", "\(v4)/32", "dev", "lo"])
            guard a.status == 0 else { throw HarnessError("ip addr add \(v4): \(a.err)") }
            let b = try run("/usr/sbin/ip", ["-6", "addr", "add", "\(v6)/128", "dev", "lo", "nodad"])
            guard b.status == 0 else { throw HarnessError("ip addr add \(v6): \(b.err)") }
        }
        deinit {
            _ = try? run("/usr/sbin/ip", ["addr", "del", "\(v4)/32", "dev", "lo"])
            _ = try? run("/usr/sbin/ip", ["-6", "addr", "del", "\(v6)/128", "dev", "lo"])
        }
    }

    /// An in-process pestod forwarding into `ns` (`pestod --netns`).
    static func pestod(_ ns: TestNamespace) throws -> InProcessPestod {
        var configuration = EngineConfiguration()
        configuration.namespacePath = ns.path
        return try InProcessPestod(configuration: configuration)
    }

    /// A TCP rule of the HOST table: dual stack on `port`, to `targetPort` in the namespace.
    static func rule(_ port: UInt16, to targetPort: UInt16, source: String?, extra: [(String, DBusValue)] = []) -> DBusValue {
        var fields: [(String, DBusValue)] = [
            ("protocol", .string("tcp")), ("first-port", .uint16(port)), ("target-port", .uint16(targetPort)),
        ]
        if let source { fields.append(("source", .string(source))) }
        return .vardict(fields + extra)
    }

    /// A listening TCP socket of the namespace on `address:port`.
    static func server(_ ns: TestNamespace, _ address: IPAddress, _ port: UInt16) throws -> Int32 {
        try #require(ns.namespace.perform { TestSockets.bound(address: address, port: port) })
    }

    /// Connects from `source` (kernel-chosen port) to `destination:port`, accepts the relayed
    /// connection on `server`, checks a byte each way, and returns the client's own port and
    /// the peer address the server saw.
    static func relay(from source: IPAddress, to destination: IPAddress, port: UInt16, server: Int32) -> (
        clientPort: UInt16, peer: (address: IPAddress, port: UInt16)
    )? {
        let fd = socket(source.family.socketDomain, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        guard TestSockets.withSocketAddress(source, 0, { bind(fd, $0, $1) == 0 }),
            TestSockets.withSocketAddress(destination, port, { connect(fd, $0, $1) == 0 })
        else { return nil }
        var local = SocketAddress()
        guard local.withMutableSockaddr({ getsockname(fd, $0, $1) }) == 0, let clientPort = local.endpoint?.port else { return nil }
        var pfd = pollfd(fd: server, events: Int16(POLLIN), revents: 0)
        guard poll(&pfd, 1, 10_000) == 1 else { return nil }
        var peer = SocketAddress()
        let accepted = peer.withMutableSockaddr { accept(server, $0, $1) }
        guard accepted >= 0, let endpoint = peer.endpoint else { return nil }
        defer { close(accepted) }
        TestSockets.setTimeouts(accepted, milliseconds: 10_000)
        TestSockets.setTimeouts(fd, milliseconds: 10_000)
        var byte: UInt8 = 7
        guard write(fd, &byte, 1) == 1, read(accepted, &byte, 1) == 1, byte == 7 else { return nil }
        byte = 9
        guard write(accepted, &byte, 1) == 1, read(fd, &byte, 1) == 1, byte == 9 else { return nil }
        return (clientPort, endpoint)
    }

    /// `ip rule` and the routes of pestod's table in the namespace, both families.
    static func routing(_ ns: TestNamespace) throws -> String {
        var out = ""
        for family in ["-4", "-6"] {
            out += try run("/usr/sbin/ip", ["-n", ns.name, family, "rule", "show"]).out
            out += try run("/usr/sbin/ip", ["-n", ns.name, family, "route", "show", "table", "\(TransparentSource.table)"]).out
        }
        return out
    }

    @Test(
        "TCP over IPv4 and IPv6: the server sees the client's address with source=client, pestod's by default",
        .timeLimit(.minutes(2)))
    func serverSeesClient() throws {
        let clients = try ClientAddresses()
        let ns = try TestNamespace()
        let f = try Self.pestod(ns)
        let p = Array(TestSockets.freePorts(3))
        let server4 = try Self.server(ns, .loopbackIPv4, p[2])
        let server6 = try Self.server(ns, .loopbackIPv6, p[2])
        defer {
            close(server4)
            close(server6)
        }
        #expect(try !Self.routing(ns).contains("28773"), "no routing before a client rule is active")
        try f.table("Insert", [.uint32(1), Self.rule(p[0], to: p[2], source: "client")])
        try f.table("Insert", [.uint32(2), Self.rule(p[1], to: p[2], source: nil)])
        try f.table("Activate", [.uint32(1)])
        try f.table("Activate", [.uint32(2)])
        let routing = try Self.routing(ns)
        #expect(routing.contains("28773:\tfrom all fwmark 0x7065 lookup 28773"), "\(routing)")
        #expect(routing.contains("local default dev lo"), "\(routing)")
        // Only in the namespace pestod was given: its own namespace's routing is untouched.
        for family in ["-4", "-6"] {
            #expect(try !run("/usr/sbin/ip", [family, "rule", "show"]).out.contains("28773"))
        }
        for (client, server) in [(clients.v4, server4), (clients.v6, server6)] {
            let seen = try #require(
                f.serving { Self.relay(from: client, to: client, port: p[0], server: server) }, "source=client from \(client)")
            #expect(seen.peer.address == client && seen.peer.port == seen.clientPort, "source=client from \(client): \(seen.peer)")
            let plain = try #require(
                f.serving { Self.relay(from: client, to: client, port: p[1], server: server) }, "default from \(client)")
            #expect(plain.peer.address != client, "default source from \(client): the server saw \(plain.peer.address)")
            #expect(plain.peer.address.family == client.family)
        }
        // The rule reads back with its source; the default reads "pestod".
        let read = try f.table("Read", [.uint32(1)]).first?.vardictValue ?? []
        #expect(read.first { $0.0 == "source" }?.1.stringValue == "client")
        let plainRead = try f.table("Read", [.uint32(2)]).first?.vardictValue ?? []
        #expect(plainRead.first { $0.0 == "source" }?.1.stringValue == "pestod")
    }

    /// A UDP socket of the namespace bound to `address:port`.
    static func udpServer(_ ns: TestNamespace, _ address: IPAddress, _ port: UInt16) throws -> Int32 {
        try #require(ns.namespace.perform { TestSockets.bound(Int32(SOCK_DGRAM.rawValue), address: address, port: port, listen: false) })
    }

    /// Sends a datagram from `source` (kernel-chosen port, connected) to `destination:port`,
    /// receives it on `server`, answers it there, and returns the client's own port and the
    /// peer address the server saw once the answer came back to the client.
    static func udpRelay(from source: IPAddress, to destination: IPAddress, port: UInt16, server: Int32) -> (
        clientPort: UInt16, peer: (address: IPAddress, port: UInt16)
    )? {
        let fd = socket(source.family.socketDomain, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        guard TestSockets.withSocketAddress(source, 0, { bind(fd, $0, $1) == 0 }),
            TestSockets.withSocketAddress(destination, port, { connect(fd, $0, $1) == 0 })
        else { return nil }
        var local = SocketAddress()
        guard local.withMutableSockaddr({ getsockname(fd, $0, $1) }) == 0, let clientPort = local.endpoint?.port else { return nil }
        var byte: UInt8 = 7
        guard write(fd, &byte, 1) == 1 else { return nil }
        var pfd = pollfd(fd: server, events: Int16(POLLIN), revents: 0)
        guard poll(&pfd, 1, 10_000) == 1 else { return nil }
        var peer = SocketAddress()
        let n = peer.withMutableSockaddr { recvfrom(server, &byte, 1, 0, $0, $1) }
        guard n == 1, byte == 7, let endpoint = peer.endpoint else { return nil }
        byte = 9
        guard peer.withSockaddr({ sendto(server, &byte, 1, 0, $0, $1) }) == 1 else { return nil }
        pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        guard poll(&pfd, 1, 10_000) == 1, read(fd, &byte, 1) == 1, byte == 9 else { return nil }
        return (clientPort, endpoint)
    }

    @Test(
        "UDP over IPv4 and IPv6: the server sees the client's address and its answer comes back; routes per address",
        .timeLimit(.minutes(2)))
    func udpServerSeesClient() throws {
        let clients = try ClientAddresses()
        let ns = try TestNamespace()
        let f = try Self.pestod(ns)
        let p = Array(TestSockets.freePorts(3))
        let server4 = try Self.udpServer(ns, .loopbackIPv4, p[2])
        let server6 = try Self.udpServer(ns, .loopbackIPv6, p[2])
        defer {
            close(server4)
            close(server6)
        }
        func udp(_ port: UInt16, source: String?) -> DBusValue {
            var fields: [(String, DBusValue)] = [
                ("protocol", .string("udp")), ("first-port", .uint16(port)), ("target-port", .uint16(p[2])),
            ]
            if let source { fields.append(("source", .string(source))) }
            return .vardict(fields)
        }
        try f.table("Insert", [.uint32(1), udp(p[0], source: "client")])
        try f.table("Insert", [.uint32(2), udp(p[1], source: nil)])
        try f.table("Activate", [.uint32(1)])
        try f.table("Activate", [.uint32(2)])
        for (client, server) in [(clients.v4, server4), (clients.v6, server6)] {
            let seen = try #require(
                f.serving { Self.udpRelay(from: client, to: client, port: p[0], server: server) }, "source=client from \(client)")
            #expect(seen.peer.address == client && seen.peer.port == seen.clientPort, "source=client from \(client): \(seen.peer)")
            let family = client.family == .ipv4 ? "-4" : "-6"
            let routes = try run("/usr/sbin/ip", ["-n", ns.name, family, "route", "show", "table", "\(TransparentSource.udpTable)"]).out
            #expect(routes.contains("local \(client) dev lo"), "\(routes)")
            let plain = try #require(
                f.serving { Self.udpRelay(from: client, to: client, port: p[1], server: server) }, "default from \(client)")
            #expect(plain.peer.address != client, "default source from \(client): the server saw \(plain.peer.address)")
        }
        let rules = try Self.routing(ns)
        #expect(rules.contains("28774:\tfrom all iif lo ipproto udp lookup 28774"), "\(rules)")
        // Deactivating the rule closes its flows: the addresses' routes and the rules go.
        try f.table("Deactivate", [.uint32(1)])
        for family in ["-4", "-6"] {
            let left = try run("/usr/sbin/ip", ["-n", ns.name, family, "route", "show", "table", "\(TransparentSource.udpTable)"])
            #expect(left.out.isEmpty, "\(left.out)\(left.err)")
        }
        #expect(try !Self.routing(ns).contains("2877"))
    }

    @Test(
        "a client address and port already taken in the namespace: that connection is reset, counted and logged once",
        .timeLimit(.minutes(2)))
    func addressInUse() throws {
        let clients = try ClientAddresses()
        let ns = try TestNamespace()
        let f = try Self.pestod(ns)
        let p = Array(TestSockets.freePorts(3))
        let server = try Self.server(ns, .loopbackIPv4, p[2])
        defer { close(server) }
        try f.table("Insert", [.uint32(1), Self.rule(p[0], to: p[2], source: "client")])
        try f.table("Activate", [.uint32(1)])
        // A socket of the namespace holds the client's address and port (p[1]): bound with
        // IP_FREEBIND (the address is not the namespace's) and listening.
        let squatter: Int32 = ns.namespace.perform {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            var one: Int32 = 1
            _ = setsockopt(fd, Int32(IPPROTO_IP), IP_FREEBIND, &one, socklen_t(MemoryLayout<Int32>.size))
            guard TestSockets.withSocketAddress(clients.v4, p[1], { bind(fd, $0, $1) == 0 }), listen(fd, 1) == 0 else {
                close(fd)
                return -1
            }
            return fd
        }
        try #require(squatter >= 0)
        defer { close(squatter) }
        let client = clients.v4
        for _ in 0..<2 {
            // The client on a helper thread, the loop relaying (here: resetting) it.
            let outcome = f.serving { () -> (bound: Bool, connected: Bool, read: Int, errno: Int32) in
                let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
                defer { close(fd) }
                var one: Int32 = 1
                _ = setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
                guard TestSockets.withSocketAddress(client, p[1], { bind(fd, $0, $1) == 0 }) else { return (false, false, 0, 0) }
                guard TestSockets.withSocketAddress(client, p[0], { connect(fd, $0, $1) == 0 }) else { return (true, false, 0, 0) }
                TestSockets.setTimeouts(fd, milliseconds: 10_000)
                var byte: UInt8 = 0
                let n = read(fd, &byte, 1)
                let readErrno = errno
                // The client's port is free again only once its connection is gone.
                var linger = linger(l_onoff: 1, l_linger: 0)
                _ = setsockopt(fd, SOL_SOCKET, SO_LINGER, &linger, socklen_t(MemoryLayout<linger>.size))
                return (true, true, n, readErrno)
            }
            try #require(outcome.bound)
            try #require(outcome.connected)
            #expect(outcome.read < 0 && outcome.errno == ECONNRESET, "read gave \(outcome.read), errno \(outcome.errno)")
        }
        // Another port of the same client still goes through, from the client's address.
        let seen = try #require(f.serving { Self.relay(from: client, to: client, port: p[0], server: server) })
        #expect(seen.peer.address == clients.v4)
        let logged = f.log.split(separator: "\n").filter { $0.contains("could not be made from its client's address") }
        #expect(logged.count == 1, "\(f.log)")
    }

    @Test(
        "the routing is installed at activation, removed after deactivation, and not duplicated by a leftover",
        .timeLimit(.minutes(2)))
    func routingFollowsRules() throws {
        let ns = try TestNamespace()
        // A leftover of a killed pestod: the same rule, already there.
        _ = try run("/usr/sbin/ip", ["-n", ns.name, "rule", "add", "fwmark", "0x7065", "lookup", "28773", "pref", "28773"])
        let f = try PestodFixture(pestodArguments: ["--netns", ns.path])
        let p = Array(TestSockets.freePorts(3))
        try f.table("Insert", [.uint32(1), Self.rule(p[0], to: p[2], source: "client")])
        try f.table("Insert", [.uint32(2), Self.rule(p[1], to: p[2], source: "client")])
        try f.table("Activate", [.uint32(1)])
        try f.table("Activate", [.uint32(2)])
        let installed = try Self.routing(ns)
        #expect(installed.components(separatedBy: "fwmark 0x7065 lookup 28773").count - 1 == 2, "one rule per family: \(installed)")
        #expect(try run("/usr/sbin/ip", ["netns", "exec", ns.name, "cat", "/proc/sys/net/ipv4/tcp_fwmark_accept"]).out == "1\n")
        try f.table("Deactivate", [.uint32(1)])
        #expect(try Self.routing(ns).contains("fwmark 0x7065"), "still used by rule 2")
        try f.table("Deactivate", [.uint32(2)])
        let removed = try Self.routing(ns)
        #expect(!removed.contains("0x7065") && !removed.contains("local default"), "\(removed)")
        #expect(try run("/usr/sbin/ip", ["netns", "exec", ns.name, "cat", "/proc/sys/net/ipv4/tcp_fwmark_accept"]).out == "0\n")
        // Active again, then pestod stops: it removes the routing on its way out.
        try f.table("Activate", [.uint32(1)])
        #expect(try Self.routing(ns).contains("fwmark 0x7065"))
        kill(f.pestod.pid, SIGTERM)
        #expect(f.pestod.waitUntilExit() == 0, "pestod exits cleanly")
        #expect(try !Self.routing(ns).contains("0x7065"))
    }

    @Test("source=client is refused with InvalidRule and no change where it cannot work", .timeLimit(.minutes(2)))
    func refused() throws {
        let ns = try TestNamespace()
        let f = try Self.pestod(ns)
        let port = TestSockets.freePorts(1).lowerBound
        let before = try f.snapshot()
        let bad: [DBusValue] = [
            Self.rule(port, to: port, source: "client", extra: [("proxy-protocol", .string("v2"))]),
            Self.rule(port, to: port, source: "Client"),
            Self.rule(port, to: port, source: "peer"),
            .vardict([
                ("protocol", .string("udp")), ("first-port", .uint16(port)), ("source", .string("client")),
                ("proxy-protocol", .string("v1")),
            ]),
        ]
        for rule in bad {
            #expect(
                f.errorName { () throws(DBusErrorReply) in try f.table("Insert", [.uint32(1), rule]) }
                    == "top.passt.Pesto1.Error.InvalidRule", "\(rule)")
            #expect(
                f.errorName { () throws(DBusErrorReply) in
                    try f.table(
                        "Apply", [.array(element: "(ua{sv})", [.structure([.uint32(1), rule])]), .array(element: "u", []), .vardict([])])
                }
                    == "top.passt.Pesto1.Error.InvalidRule", "Apply \(rule)")
        }
        // The SPLICE table's targets are pestod's own side: no transparent source there.
        #expect(
            f.errorName { () throws(DBusErrorReply) in
                _ = try f.call(
                    path: PestoBusNames.tablePath(.splice), interface: PestodFixture.tableInterface, member: "Insert",
                    [.uint32(1), Self.rule(port, to: port, source: "client")])
            } == "top.passt.Pesto1.Error.InvalidRule")
        #expect(try f.snapshot() == before)
        // Without --netns there is no namespace to be transparent in.
        let plain = try InProcessPestod()
        #expect(
            plain.errorName { () throws(DBusErrorReply) in
                try plain.table("Insert", [.uint32(1), Self.rule(port, to: port, source: "client")])
            }
                == "top.passt.Pesto1.Error.InvalidRule")
    }

    @Test("replies of the same server to a client that reaches it by another path are not captured", .timeLimit(.minutes(2)))
    func otherPathNotCaptured() throws {
        let ns = try TestNamespace()
        // A veth into the namespace: the other path.
        let n = UInt32.random(in: 1...250)
        let hostEnd = "pth\(n)"
        let nsEnd = "ptn\(n)"
        let hostAddress = "10.70.\(n).1"
        let nsAddress = "10.70.\(n).2"
        let add = try run("/usr/sbin/ip", ["link", "add", hostEnd, "type", "veth", "peer", "name", nsEnd, "netns", ns.name])
        try #require(add.status == 0, "\(add.err)")
        defer { _ = try? run("/usr/sbin/ip", ["link", "del", hostEnd]) }
        _ = try run("/usr/sbin/ip", ["addr", "add", "\(hostAddress)/24", "dev", hostEnd])
        _ = try run("/usr/sbin/ip", ["link", "set", hostEnd, "up"])
        _ = try run("/usr/sbin/ip", ["-n", ns.name, "addr", "add", "\(nsAddress)/24", "dev", nsEnd])
        _ = try run("/usr/sbin/ip", ["-n", ns.name, "link", "set", nsEnd, "up"])
        try ns.waitForLocalRoute(nsAddress)

        let clients = try ClientAddresses()
        let f = try Self.pestod(ns)
        let p = Array(TestSockets.freePorts(2))
        // The servers listen on every IPv4 address of the namespace.
        let server = try Self.server(ns, .anyIPv4, p[1])
        let udpServer = try Self.udpServer(ns, .anyIPv4, p[1])
        defer {
            close(server)
            close(udpServer)
        }
        try f.table("Insert", [.uint32(1), Self.rule(p[0], to: p[1], source: "client")])
        try f.table("Activate", [.uint32(1)])
        let udpRule: DBusValue = .vardict([
            ("protocol", .string("udp")), ("first-port", .uint16(p[0])), ("target-port", .uint16(p[1])), ("source", .string("client")),
        ])
        try f.table("Insert", [.uint32(2), udpRule])
        try f.table("Activate", [.uint32(2)])
        let client = clients.v4
        let through = try #require(f.serving { Self.relay(from: client, to: client, port: p[0], server: server) })
        #expect(through.peer.address == clients.v4)
        // Directly over the veth, from the host's end: the server's replies go back out of it.
        let host = try #require(IPAddress(hostAddress))
        let nsSide = try #require(IPAddress(nsAddress))
        let direct = try #require(Self.relay(from: host, to: nsSide, port: p[1], server: server), "the direct connection failed")
        #expect(direct.peer.address == host)
        // UDP likewise, while a transparent flow of the other client exists.
        let udpThrough = try #require(f.serving { Self.udpRelay(from: client, to: client, port: p[0], server: udpServer) })
        #expect(udpThrough.peer.address == clients.v4)
        let udpDirect = try #require(Self.udpRelay(from: host, to: nsSide, port: p[1], server: udpServer), "the direct UDP exchange failed")
        #expect(udpDirect.peer.address == host)
    }

    @Test(
        "a takeover keeps a transparent connection and flow working; the successor counts them: the connection keeps the routing after its rule goes, the flow's route goes with the flow",
        .timeLimit(.minutes(3))
    )
    func survivesTakeover() throws {
        let clients = try ClientAddresses()
        let ns = try TestNamespace()
        let arguments = ["--netns", ns.path, "--runtime-dir", "RUNTIME"]
        let f = try PestodFixture(pestodArguments: arguments)
        let p = Array(TestSockets.freePorts(3))
        let server = try Self.server(ns, .loopbackIPv4, p[2])
        let udpServer = try Self.udpServer(ns, .loopbackIPv4, p[2])
        defer {
            close(server)
            close(udpServer)
        }
        try f.table("Insert", [.uint32(1), Self.rule(p[0], to: p[2], source: "client")])
        try f.table(
            "Insert",
            [
                .uint32(2),
                .vardict([
                    ("protocol", .string("udp")), ("first-port", .uint16(p[1])), ("target-port", .uint16(p[2])),
                    ("source", .string("client")),
                ]),
            ])
        try f.table("Activate", [.uint32(1)])
        try f.table("Activate", [.uint32(2)])

        // A long TCP connection from the client's address, and a connected UDP client.
        let tcp = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        let udp = socket(AF_INET, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        defer {
            close(tcp)
            close(udp)
        }
        try #require(TestSockets.withSocketAddress(clients.v4, 0, { bind(tcp, $0, $1) == 0 }))
        try #require(TestSockets.withSocketAddress(clients.v4, p[0], { connect(tcp, $0, $1) == 0 }))
        try #require(TestSockets.withSocketAddress(clients.v4, 0, { bind(udp, $0, $1) == 0 }))
        try #require(TestSockets.withSocketAddress(clients.v4, p[1], { connect(udp, $0, $1) == 0 }))
        TestSockets.setTimeouts(tcp, milliseconds: 10_000)
        TestSockets.setTimeouts(udp, milliseconds: 10_000)
        var pfd = pollfd(fd: server, events: Int16(POLLIN), revents: 0)
        try #require(poll(&pfd, 1, 10_000) == 1)
        var peer = SocketAddress()
        let accepted = peer.withMutableSockaddr { accept(server, $0, $1) }
        try #require(accepted >= 0)
        defer { close(accepted) }
        #expect(peer.endpoint?.address == clients.v4, "the server sees the client: \(String(describing: peer.endpoint))")
        TestSockets.setTimeouts(accepted, milliseconds: 10_000)
        TestSockets.setTimeouts(udpServer, milliseconds: 10_000)

        /// One byte each way on the TCP connection and (with `udp`) one datagram each way on the flow.
        func exchange(_ what: String, udp withUDP: Bool = true) {
            var byte: UInt8 = 1
            #expect(write(tcp, &byte, 1) == 1 && read(accepted, &byte, 1) == 1, "\(what): TCP client → server")
            byte = 2
            #expect(write(accepted, &byte, 1) == 1 && read(tcp, &byte, 1) == 1 && byte == 2, "\(what): TCP server → client")
            guard withUDP else { return }
            byte = 3
            #expect(write(udp, &byte, 1) == 1, "\(what): UDP send")
            var from = SocketAddress()
            let n = from.withMutableSockaddr { recvfrom(udpServer, &byte, 1, 0, $0, $1) }
            #expect(n == 1 && from.endpoint?.address == clients.v4, "\(what): UDP client → server from the client's address")
            byte = 4
            #expect(from.withSockaddr({ sendto(udpServer, &byte, 1, 0, $0, $1) }) == 1)
            #expect(read(udp, &byte, 1) == 1 && byte == 4, "\(what): UDP server → client")
        }
        exchange("before the takeover")
        #expect(try f.takeOver(arguments) == 0, "the old pestod exits with 0")
        exchange("after the takeover")
        let udpRoutes = {
            try run("/usr/sbin/ip", ["-n", ns.name, "route", "show", "table", "\(TransparentSource.udpTable)"]).out
        }
        #expect(try udpRoutes().contains("\(clients.v4)"), "the flow's client address has its route")
        // The rules go. The TCP connection still uses the routing, so it stays; the UDP flow
        // ends with its rule's listener, and its client address's route goes with it.
        try f.table("Deactivate", [.uint32(1)])
        try f.table("Deactivate", [.uint32(2)])
        #expect(try Self.routing(ns).contains("fwmark 0x7065"), "still used by the connection")
        #expect(try !udpRoutes().contains("\(clients.v4)"), "the flow's route went with the flow")
        exchange("after deactivation", udp: false)
        kill(f.pestod.pid, SIGTERM)
        #expect(f.pestod.waitUntilExit() == 0, "pestod exits cleanly: \(f.log.suffix(3000))")
        #expect(try !Self.routing(ns).contains("0x7065"), "removed at exit")
    }
}

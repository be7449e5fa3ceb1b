// SPDX-License-Identifier: GPL-2.0-or-later

// The PROXY protocol end to end: pestod relays to a real haproxy that accepts only
// connections starting with a PROXY header (`bind ... accept-proxy`) and answers every HTTP
// request with the client address and port, and the destination, it read from the header.
// pestod runs in process (InProcessPestod.swift); the clients run on helper threads while the
// test's thread turns the loop that serves them.

import Foundation
import PestoModel
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoDBus
@testable import PestoService

/// A haproxy serving one HTTP frontend per address, each behind `accept-proxy`, that answers
/// "src src_port dst dst_port" (what the PROXY header said).
final class HAProxyTarget {
    static let executable = "/usr/sbin/haproxy"
    private(set) var process: ChildProcess! = nil
    let directory: URL

    /// Starts haproxy with a frontend on each of `binds` (address, port); returns once it
    /// reports READY=1, every frontend listening.
    init(binds: [(IPAddress, UInt16)]) throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("pesto-haproxy-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        var config = """
            global
                maxconn 64
            defaults
                mode http
                timeout connect 5s
                timeout client 5s
                timeout server 5s
            frontend fe
            """
        for (address, port) in binds {
            let text = address.family == .ipv6 ? "[\(address)]" : "\(address)"
            config += "\n    bind \(text):\(port) accept-proxy"
        }
        config += "\n    http-request return status 200 content-type text/plain lf-string \"%[src] %[src_port] %[dst] %[dst_port]\"\n"
        let file = directory.appendingPathComponent("haproxy.cfg")
        try config.write(to: file, atomically: true, encoding: .utf8)
        // -Ws: master-worker mode with systemd's readiness protocol, so the test waits for
        // READY=1 (sent once every frontend listens) instead of polling the ports.
        process = try ChildProcess.startReady(
            Self.executable, ["-Ws", "-db", "-f", file.path],
            notifyPath: directory.appendingPathComponent("notify.sock").path, stderr: .devNull)
    }

    /// Stops haproxy: SIGTERM makes the master stop its worker, then exit (a SIGKILL would
    /// leave the worker behind).
    func stop() {
        if process.isRunning { kill(process.pid, SIGTERM) }
        _ = process.waitUntilExit()
        try? FileManager.default.removeItem(at: directory)
    }

    /// Sends an HTTP request on a connection made from `source` (port chosen by the kernel)
    /// to `address:port`, and returns the client's own port with the response body (haproxy's
    /// view of the connection), or nil.
    static func ask(from source: IPAddress, to address: IPAddress, port: UInt16) -> (clientPort: UInt16, body: String)? {
        let fd = socket(address.family.socketDomain, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        guard TestSockets.withSocketAddress(source, 0, { bind(fd, $0, $1) == 0 }),
            TestSockets.withSocketAddress(address, port, { connect(fd, $0, $1) == 0 })
        else { return nil }
        var local = SocketAddress()
        guard local.withMutableSockaddr({ getsockname(fd, $0, $1) }) == 0, let clientPort = local.endpoint?.port else { return nil }
        let request = Array("GET / HTTP/1.0\r\n\r\n".utf8)
        guard request.withUnsafeBytes({ write(fd, $0.baseAddress, $0.count) }) == request.count else { return nil }
        var response: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&pfd, 1, 10_000) == 1 else { return nil }
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n <= 0 { break }
            response += chunk[0..<n]
        }
        let text = String(decoding: response, as: UTF8.self)
        guard let split = text.range(of: "\r\n\r\n") else { return nil }
        return (clientPort, String(text[split.upperBound...]))
    }
}

@Suite("pestod PROXY protocol (in process)", .serialized, .timeLimit(.minutes(10)))
struct ProxyProtocolRelayTests {
    /// A TCP rule on `address:port` to `target:targetPort` sending `version`'s header.
    func rule(_ address: IPAddress, _ port: UInt16, to target: IPAddress, _ targetPort: UInt16, _ version: String) -> DBusValue {
        .vardict([
            ("protocol", .string("tcp")), ("address", .string("\(address)")), ("first-port", .uint16(port)),
            ("target-address", .string("\(target)")), ("target-port", .uint16(targetPort)), ("proxy-protocol", .string(version)),
        ])
    }

    @Test(
        "haproxy behind pestod sees the real client, over IPv4 (v1 and v2) and IPv6 (v1 and v2)",
        .enabled(if: FileManager.default.isExecutableFile(atPath: HAProxyTarget.executable), "needs haproxy"), .timeLimit(.minutes(2)))
    func haproxySeesClient() throws {
        let f = try InProcessPestod()
        let ports = TestSockets.freePorts(6)
        let p = Array(ports)
        let haproxy = try HAProxyTarget(binds: [(.loopbackIPv4, p[0]), (.loopbackIPv6, p[1])])
        defer { haproxy.stop() }
        let cases: [(listen: IPAddress, port: UInt16, target: IPAddress, targetPort: UInt16, version: String)] = [
            (.loopbackIPv4, p[2], .loopbackIPv4, p[0], "v1"),
            (.loopbackIPv4, p[3], .loopbackIPv4, p[0], "v2"),
            (.loopbackIPv6, p[4], .loopbackIPv6, p[1], "v1"),
            (.loopbackIPv6, p[5], .loopbackIPv6, p[1], "v2"),
        ]
        for (n, c) in cases.enumerated() {
            try f.table("Insert", [.uint32(UInt32(n + 1)), rule(c.listen, c.port, to: c.target, c.targetPort, c.version)])
            try f.table("Activate", [.uint32(UInt32(n + 1))])
        }
        for c in cases {
            // pestod reaches a loopback IPv4 target from 127.0.0.2-254; the client is 127.0.0.1.
            let answer = try #require(
                f.serving { HAProxyTarget.ask(from: c.listen, to: c.listen, port: c.port) }, "\(c.version) to \(c.listen)")
            #expect(answer.body == "\(c.listen) \(answer.clientPort) \(c.listen) \(c.port)", "\(c.version) over \(c.listen.family)")
        }
        // The rule as stored and read back carries the key.
        let read = try f.table("Read", [.uint32(2)])
        let fields = read.first?.vardictValue ?? []
        #expect(fields.first { $0.0 == "proxy-protocol" }?.1.stringValue == "v2")
    }

    @Test("a PROXY header goes out before any data, even when the client sends nothing")
    func headerBeforeData() throws {
        let f = try InProcessPestod()
        let ports = TestSockets.freePorts(2)
        let listener = try #require(TestSockets.bound(port: ports.upperBound))
        defer { close(listener) }
        try f.table("Insert", [.uint32(1), rule(.loopbackIPv4, ports.lowerBound, to: .loopbackIPv4, ports.upperBound, "v1")])
        try f.table("Activate", [.uint32(1)])
        // The client and the target's side on a helper thread, the loop relaying between them.
        let outcome = f.serving { () -> (got: String, expected: String, relayed: Bool)? in
            guard case .success(let client) = TestSockets.connect(port: ports.lowerBound) else { return nil }
            defer { close(client) }
            var local = SocketAddress()
            _ = local.withMutableSockaddr { getsockname(client, $0, $1) }
            var peer = SocketAddress()
            let target = peer.withMutableSockaddr { accept(listener, $0, $1) }
            guard target >= 0 else { return nil }
            defer { close(target) }
            let expected = "PROXY TCP4 127.0.0.1 127.0.0.1 \(local.endpoint?.port ?? 0) \(ports.lowerBound)\r\n"
            var got: [UInt8] = []
            var chunk = [UInt8](repeating: 0, count: 256)
            while got.count < expected.utf8.count {
                var pfd = pollfd(fd: target, events: Int16(POLLIN), revents: 0)
                guard poll(&pfd, 1, 10_000) == 1 else { break }
                let n = chunk.withUnsafeMutableBytes { read(target, $0.baseAddress, $0.count) }
                if n <= 0 { break }
                got += chunk[0..<n]
            }
            // Then the client's bytes follow, relayed as usual.
            var byte: UInt8 = 7
            let wrote = write(client, &byte, 1) == 1
            byte = 0
            var pfd = pollfd(fd: target, events: Int16(POLLIN), revents: 0)
            let relayed = wrote && poll(&pfd, 1, 10_000) == 1 && read(target, &byte, 1) == 1 && byte == 7
            return (String(decoding: got, as: UTF8.self), expected, relayed)
        }
        let o = try #require(outcome, "connect or accept failed")
        #expect(o.got == o.expected)
        #expect(o.relayed)
    }

    @Test("proxy-protocol is refused for UDP rules and for unknown values, with InvalidRule and no change")
    func refused() throws {
        let f = try InProcessPestod()
        let port = TestSockets.freePorts(1).lowerBound
        for (proto, value) in [("udp", "v2"), ("udp", "v1"), ("tcp", "v3"), ("tcp", "V1")] {
            let fields: DBusValue = .vardict([
                ("protocol", .string(proto)), ("first-port", .uint16(port)), ("proxy-protocol", .string(value)),
            ])
            do {
                _ = try f.table("Insert", [.uint32(1), fields])
                Issue.record("\(proto) rule with proxy-protocol \(value) was accepted")
            } catch {
                #expect(error.name == "top.passt.Pesto1.Error.InvalidRule", "\(proto) \(value): \(error.name)")
            }
        }
        #expect(throws: DBusErrorReply.self) { _ = try f.table("Read", [.uint32(1)]) }
    }
}

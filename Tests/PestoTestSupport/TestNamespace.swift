// SPDX-License-Identifier: GPL-2.0-or-later

// TestNamespace: a real network namespace for a test (root only), made and removed with ip(8).

import PestoEngine
import PestoModel
import PestoSystem

#if canImport(Glibc)
    import Glibc
#endif

/// A network namespace made with `ip netns add`, deleted when the value goes away.
public final class TestNamespace {
    /// The name `ip netns` knows it by.
    public let name: String
    /// Its bind mount under /run/netns.
    public let path: String
    public let namespace: NetworkNamespace

    /// Adds the namespace (root only) and brings its loopback up.
    public init() throws {
        name = "pesto-test-\(UInt32.random(in: 0...UInt32.max))"
        path = "/run/netns/\(name)"
        let add = try run("/usr/sbin/ip", ["netns", "add", name])
        guard add.status == 0 else { throw HarnessError("ip netns add failed: \(add.err)") }
        _ = try run("/usr/sbin/ip", ["-n", name, "link", "set", "lo", "up"])
        namespace = try NetworkNamespace(path: path)
    }

    deinit { _ = try? run("/usr/sbin/ip", ["netns", "del", name]) }

    /// An echo server listening on 127.0.0.1:port inside the namespace.
    public func echoServer(port: UInt16) -> EchoServer? {
        let fd = namespace.perform { TestSockets.bound(address: .loopbackIPv4, port: port) }
        return fd.flatMap { EchoServer(port: port, listeningFD: $0) }
    }

    /// Waits until `address` (already added to an interface) has its local route, that is,
    /// until the namespace accepts packets for it. An IPv6 address on an interface whose
    /// carrier has not come up yet (a veth pair just set up: the kernel reports the carrier
    /// from a work queue) has none, and a datagram sent to it meanwhile is lost.
    ///
    /// The wait is on the kernel's own notices: `ip monitor route`, proved subscribed by a
    /// marker route it must report, then the route table is checked after every notice. The
    /// monitor subscribes some time after it starts, so a marker added before that is not
    /// reported: until one is, the marker is deleted and added again every 100 ms.
    public func waitForLocalRoute(_ address: String, timeoutMilliseconds: Int32 = 20_000) throws {
        let family = address.contains(":") ? "-6" : "-4"
        func present() throws -> Bool {
            let shown = try run("/usr/sbin/ip", ["-n", name, family, "route", "show", "table", "local", address])
            return shown.status == 0 && shown.out.contains(address)
        }
        let monitor = try ChildProcess("/usr/sbin/ip", ["-n", name, "monitor", "route"])
        defer { monitor.kill() }
        let marker = ["-n", name, "route", "add", "192.0.2.77/32", "dev", "lo", "table", "4077"]
        let unmark = ["-n", name, "route", "del", "192.0.2.77/32", "dev", "lo", "table", "4077"]
        let added = try run("/usr/sbin/ip", marker)
        guard added.status == 0 else { throw HarnessError("ip route add (marker) failed: \(added.err)") }
        let deadline = MonotonicInstant.now.adding(milliseconds: Int(timeoutMilliseconds))
        var subscribed = false
        while !subscribed {
            guard millisecondsLeft(deadline) > 0 else { throw HarnessError("ip monitor route never reported the marker route") }
            guard let line = monitor.readLine(timeoutMilliseconds: min(100, millisecondsLeft(deadline))) else {
                // Not subscribed yet when the marker came: show it again.
                _ = try run("/usr/sbin/ip", unmark)
                _ = try run("/usr/sbin/ip", marker)
                continue
            }
            subscribed = line.contains("192.0.2.77")
        }
        _ = try run("/usr/sbin/ip", unmark)
        while try !present() {
            guard monitor.readLine(timeoutMilliseconds: millisecondsLeft(deadline)) != nil else {
                throw HarnessError("\(address) in \(name) never got its local route")
            }
        }
    }

    /// A TCP connection made from inside the namespace.
    public func connect(port: UInt16) -> Result<Int32, Errno> {
        namespace.perform { TestSockets.connect(.loopbackIPv4, port: port) }
    }
}

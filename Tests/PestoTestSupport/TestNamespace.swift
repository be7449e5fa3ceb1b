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

    /// A TCP connection made from inside the namespace.
    public func connect(port: UInt16) -> Result<Int32, Errno> {
        namespace.perform { TestSockets.connect(.loopbackIPv4, port: port) }
    }
}

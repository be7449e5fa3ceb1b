// SPDX-License-Identifier: GPL-2.0-or-later

// The TCP listener's options that its accepted connections inherit, so the relay need not set
// them on each connection (Listener.swift, TCPRelay.swift).

import CPestoSys
import PestoModel
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoEngine

#if canImport(Glibc)
    import Glibc
#endif

@Suite("TCP listener options", .timeLimit(.minutes(10)))
struct TCPListenerOptionsTests {
    @Test("a TCP listener has TCP_NODELAY, and so has every connection it accepts (the relay no longer sets it on the client)")
    func acceptedConnectionsInheritNoDelay() throws {
        let port = TestSockets.freePorts(1).lowerBound
        let factory = KernelListenerFactory(families: [.ipv4, .ipv6])
        let listener = try factory.openListener(for: Rule(proto: .tcp, address: .loopbackIPv4, firstPort: port), port: port).get()
        defer { factory.closeListener(listener) }
        #expect(TestSockets.option(listener, level: Int32(IPPROTO_TCP), name: TCP_NODELAY) == 1)
        let client = try TestSockets.connect(port: port).get()
        defer { close(client) }
        var pfd = pollfd(fd: listener, events: Int16(POLLIN), revents: 0)
        #expect(poll(&pfd, 1, 5_000) == 1)
        let accepted = pesto_accept4(listener, nil, nil, Int32(SOCK_CLOEXEC.rawValue))
        try #require(accepted >= 0)
        defer { close(accepted) }
        #expect(TestSockets.option(accepted, level: Int32(IPPROTO_TCP), name: TCP_NODELAY) == 1)
    }
}

// SPDX-License-Identifier: GPL-2.0-or-later

// ListenerAdoption: a table activated with handed-over listeners installs those very sockets
// (same inode), and opens a new socket where the handed-over one is not the rule's kind.

import CPestoSys
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoEngine
@testable import PestoModel

#if canImport(Glibc)
    import Glibc
#endif

@Suite("listener adoption", .timeLimit(.minutes(10)))
struct ListenerAdoptionTests {
    @Test(
        "activation installs the handed-over listener of each port; a socket of the wrong kind is refused, closed and replaced by a new one"
    )
    func adoption() throws {
        let loop = try EventLoop()
        let ports = TestSockets.freePorts(3)
        let (p, q, r) = (ports.lowerBound, ports.lowerBound + 1, ports.upperBound)
        let handed = try #require(TestSockets.bound(port: p))
        let handedInode = TestSockets.inode(handed)
        // Port q: a UDP socket handed over for a TCP rule. Port r: nothing handed over.
        let wrong = try #require(TestSockets.bound(Int32(SOCK_DGRAM.rawValue), port: q, listen: false))
        let adoption = ListenerAdoption()
        let rule = Rule(proto: .tcp, address: .loopbackIPv4, firstPort: p, lastPort: r)
        adoption.add(dup(handed), table: .host, rule: rule, port: p)
        adoption.add(dup(wrong), table: .host, rule: rule, port: q)
        close(handed)
        close(wrong)
        var config = EngineConfiguration()
        config.capabilities = [.ipv4, .tcp, .udp]
        let engine = try ForwardingEngine(loop: loop, configuration: config, adoption: adoption)
        try engine.host.insert(id: 1, rule: rule)
        let counts = try engine.host.activate(id: 1)
        #expect(counts == .init(bound: 3, failed: 0))
        #expect(adoption.adopted == 1 && adoption.refused == 1 && adoption.waitingCount == 0)
        let fds = try engine.host.listeners(of: 1)
        #expect(TestSockets.inode(fds[0].fd) == handedInode)
        #expect(TestSockets.option(fds[1].fd, level: SOL_SOCKET, name: SO_ACCEPTCONN) == 1)
        try engine.host.deactivate(id: 1)
        #expect(ports.allSatisfy(TestSockets.isFree))
    }
}

// SPDX-License-Identifier: GPL-2.0-or-later

// The property pesto exists for: changing one rule never touches another rule's sockets.

import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoEngine
@testable import PestoModel

#if canImport(Glibc)
    import Glibc
#endif

@Suite("Isolation between rules", .timeLimit(.minutes(10)))
struct IsolationTests {
    @Test("rule A's listeners are the same objects and keep accepting while rule B churns 100 times")
    func ruleChurnLeavesOthersAlone() throws {
        let table = ForwardingTable(
            kind: .host, capabilities: [.ipv4, .ipv6, .tcp, .udp], factory: KernelListenerFactory(families: [.ipv4, .ipv6]))
        let aPorts = TestSockets.freePorts(4)
        try table.insert(
            id: 100, rule: Rule(proto: .tcp, address: .loopbackIPv4, firstPort: aPorts.lowerBound, lastPort: aPorts.upperBound))
        try table.activate(id: 100)
        let original = try table.listeners(of: 100)
        let identity = original.map { ($0.fd, TestSockets.inode($0.fd)) }
        #expect(original.count == 4)

        let bPorts = TestSockets.freePorts(8)
        var accepted = 0
        for round in 0..<100 {
            // B's ID sorts before A's on even rounds and after on odd ones, so A's entry moves in the array.
            let bID: UInt32 = round % 2 == 0 ? 50 : 150
            try table.insert(id: bID, rule: Rule(proto: .tcp, firstPort: bPorts.lowerBound, lastPort: bPorts.upperBound))
            try table.activate(id: bID)
            let (port, fd) = original[round % original.count]
            if TestSockets.connectAndAccept(listener: fd, port: port) { accepted += 1 }
            try table.deactivate(id: bID)
            try table.delete(id: bID)
            let (port2, fd2) = original[(round + 1) % original.count]
            if TestSockets.connectAndAccept(listener: fd2, port: port2) { accepted += 1 }
        }
        #expect(accepted == 200, "every connection to rule A during the churn was accepted")
        let now = try table.listeners(of: 100)
        #expect(now.map(\.fd) == original.map(\.fd))
        #expect(now.map { TestSockets.inode($0.fd) } == identity.map(\.1))
        #expect(try table.status(100) == RuleStatus(active: true, bound: 4, failed: 0, lastError: nil))
        try table.deactivate(id: 100)
    }
}

// SPDX-License-Identifier: GPL-2.0-or-later

// First-match tables through the editor (in process): a transaction that changed which rule
// wins a port is rolled back, by the lock's holder leaving or by a failing Apply, and the
// range's very sockets serve the port again, won by the range.

import PestoModel
import PestoTestSupport
import Testing

@testable import PestoEngine
@testable import PestoService

#if canImport(Glibc)
    import Glibc
#endif

@Suite("first-match tables: rollbacks (in process)", .timeLimit(.minutes(10)))
struct OverlapEditorTests {
    /// An editor over one first-match HOST table with a range rule 100 active on `ports`.
    struct Rig {
        let factory = ScriptedListenerFactory()
        let table: ForwardingTable
        let editor: TablesEditor
        let observer = RecordingObserver()
        let ports: ClosedRange<UInt16>

        init() throws {
            table = ForwardingTable(kind: .host, capabilities: [.ipv4, .ipv6, .tcp, .udp], overlapPolicy: .firstMatch, factory: factory)
            editor = TablesEditor(tables: [table])
            editor.observer = observer
            ports = TestSockets.freePorts(4)
            _ = try editor.submitted(.insert(.host, 100, Self.tcp(ports.lowerBound, last: ports.upperBound)), sender: "a")
            _ = try editor.submitted(.activate(.host, 100), sender: "a")
            _ = observer.take()
        }

        static func tcp(_ port: UInt16, last: UInt16? = nil) -> Rule {
            Rule(proto: .tcp, address: .loopbackIPv4, firstPort: port, lastPort: last)
        }

        /// Every listening socket with its inode.
        var sockets: [String] { table.listeningDescriptors.map { "\($0)@\(TestSockets.inode($0) ?? 0)" } }
    }

    @Test("the lock holder leaves after activating a carve-out: rolled back, the range wins the port again on the same socket")
    func holderLeavesAfterCarveOut() throws {
        let rig = try Rig()
        let carved = rig.ports.lowerBound + 1
        let before = rig.sockets
        _ = try rig.editor.submitted(.lock, sender: "b")
        _ = try rig.editor.submitted(.insert(.host, 5, Rig.tcp(carved)), sender: "b")
        #expect(try rig.editor.submitted(.activate(.host, 5), sender: "b").result == .counts(.init(bound: 1, failed: 0)))
        #expect(try rig.table.portsWon(100) == 3 && rig.table.portsWon(5) == 1)
        #expect(rig.observer.take() == ["lock b", "added 5", "state 5 active 1/0", "won 100"])
        #expect(rig.editor.holderLeft("b") == 2)
        #expect(rig.table.ids == [100])
        #expect(try rig.table.portsWon(100) == 4)
        #expect(rig.observer.take() == ["state 5 inactive 0/0", "won 100", "removed 5", "lock -"])
        #expect(rig.sockets == before, "no socket was opened or closed")
        #expect(rig.factory.opens == 4 && rig.factory.closed.isEmpty)
    }

    @Test("an Apply that moves a port to a new rule and fails is rolled back: the old winner wins it again")
    func applyRollbackRestoresWinner() throws {
        let rig = try Rig()
        let carved = rig.ports.lowerBound + 2
        let taken = TestSockets.freePorts(1).lowerBound
        let holder = try #require(TestSockets.bound(port: taken))
        defer { close(holder) }
        let before = rig.sockets
        var request = ApplyRequest()
        // 5 takes the carved port from the range; 6 cannot bind, so the whole Apply fails.
        request.inserts = [(5, Rig.tcp(carved)), (6, Rig.tcp(taken))]
        #expect(throws: PestoError.self) { try rig.editor.submitted(.apply(.host, request), sender: "a") }
        #expect(rig.table.ids == [100])
        #expect(try rig.table.portsWon(100) == 4)
        #expect(rig.sockets == before)
        #expect(rig.observer.take().allSatisfy { $0 == "won 100" }, "only the recount is reported: no rule came or went")
    }

    @Test("an Apply that replaces the range by a new one hands its sockets over unclosed")
    func applyReplacesRange() throws {
        let rig = try Rig()
        let before = rig.sockets
        var request = ApplyRequest()
        request.inserts = [(200, Rig.tcp(rig.ports.lowerBound, last: rig.ports.upperBound))]
        request.removes = [100]
        let (result, _) = try rig.editor.submitted(.apply(.host, request), sender: "a")
        #expect(result == .applied([(200, .init(bound: 4, failed: 0))]))
        #expect(try rig.table.ids == [200] && rig.table.portsWon(200) == 4)
        #expect(rig.sockets == before, "the new rule serves the ports on the old rule's sockets")
        #expect(rig.factory.opens == 4 && rig.factory.closed.isEmpty)
    }
}

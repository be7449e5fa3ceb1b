// SPDX-License-Identifier: GPL-2.0-or-later

// CallerUIDs: a caller's uid is asked of the bus daemon once per connection, shared by the
// questions asked meanwhile, and forgotten when the caller leaves.

import PestoTestSupport
import Testing

@testable import PestoDBus
@testable import PestoEngine
@testable import PestoModel
@testable import PestoService

#if canImport(Glibc)
    import Glibc
#endif

@Suite("caller uids remembered per connection", .serialized, .timeLimit(.minutes(10)))
struct CallerUIDsTests {
    @Test("questions asked before the answer share one; the uid is remembered until senderLeft; unknown names are never remembered")
    func rememberedAndForgotten() throws {
        let f = try PestodFixture()  // for its bus
        let loop = try EventLoop()
        let connection = try DBusConnection(.address(f.address))
        connection.attach(to: loop, kind: EngineEventKind.dbus)
        defer {
            connection.detach()
            loop.removeAllHandlers()
        }
        let peer = try DBusConnection(.address(f.address))
        let uids = CallerUIDs(connection: connection)

        var answers: [CallerUIDs.Answer] = []
        for _ in 0..<3 { uids.uid(of: peer.uniqueName) { answers.append($0) } }
        #expect(answers.isEmpty, "the bus daemon has not answered yet")
        #expect(loop.turn(until: { answers.count == 3 }, "the three answers"))
        #expect(answers.allSatisfy { (try? $0.get()) == getuid() })
        #expect(uids.rememberedCount == 1)

        // Known now: answered before returning, with no round trip.
        var atOnce: CallerUIDs.Answer?
        uids.uid(of: peer.uniqueName) { atOnce = $0 }
        #expect((try? atOnce?.get()) == getuid())

        // A name nobody has is an error, and is not remembered.
        var missing: CallerUIDs.Answer?
        uids.uid(of: ":1.999999") { missing = $0 }
        #expect(loop.turn(until: { missing != nil }, "the answer about a missing name"))
        if case .failure(let error) = missing {
            #expect(error.name == "org.freedesktop.DBus.Error.NameHasNoOwner", "\(error)")
        } else {
            Issue.record("a missing name has no uid: \(String(describing: missing))")
        }
        #expect(uids.rememberedCount == 1)

        // Leaving forgets; a question in flight when its name leaves is dropped, not remembered.
        uids.senderLeft(peer.uniqueName)
        #expect(uids.rememberedCount == 0)
        var dropped = false
        uids.uid(of: peer.uniqueName) { _ in dropped = true }
        uids.senderLeft(peer.uniqueName)
        var later: CallerUIDs.Answer?
        uids.uid(of: ":1.999998") { later = $0 }  // a round trip queued after the dropped one
        #expect(loop.turn(until: { later != nil }, "a later answer"))
        #expect(!dropped)
        #expect(uids.rememberedCount == 0)
    }
}

// SPDX-License-Identifier: GPL-2.0-or-later

// Authorisation of changes: with --authorize root, only uid 0 may change the tables.

import Foundation
import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoDBus
@testable import PestoService

@Suite("pestod authorisation", .serialized, .timeLimit(.minutes(10)))
struct AuthorizationTests {
    static let isRoot = getuid() == 0

    @Test(
        "root may change; an unprivileged caller gets AccessDenied for every change and Lock, and may still read",
        .enabled(if: isRoot, "needs root to run a client as another user"))
    func rootOnly() throws {
        let f = try PestodFixture(pestodArguments: ["--authorize", "root"])
        let p = TestSockets.freePorts(2).lowerBound
        try f.table("Insert", [.uint32(1), PestodFixture.rule(p)])
        try f.table("Activate", [.uint32(1)])
        try f.table("Insert", [.uint32(2), PestodFixture.rule(p + 1)])
        let before = try f.snapshot()

        // pesto-test-peer as nobody (uid 65534), through setpriv.
        let peer = try ChildProcess(
            "/usr/bin/setpriv", ["--reuid=65534", "--regid=65534", "--clear-groups", Products.path("pesto-test-peer"), f.address])
        let ready = peer.readLine() ?? ""
        #expect(ready.hasPrefix("ready"), "\(ready)")
        for line in ["Insert 3 \(p + 1)", "Activate 2", "Deactivate 1", "Delete 2", "Lock"] {
            let answer = peer.ask(line)
            #expect(
                answer.hasPrefix("error \(DBusErrorReply.accessDenied): Not authorized to top.passt.Pesto1.modify: uid 65534 is not root"),
                "\(line): \(answer)")
        }
        #expect(peer.ask("Unlock").hasPrefix("error \(PestoBusNames.errorPrefix)NotLocked"))
        #expect(try f.snapshot() == before)
        // Reads are open to everyone.
        let status = try run(
            "/usr/bin/setpriv",
            [
                "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/busctl", "--address=\(f.address)",
                "call", PestodFixture.dest, PestodFixture.hostPath, PestodFixture.tableInterface, "Status", "u", "1",
            ])
        #expect(status.out == "buusu true 1 0 \"\" 1\n", "\(status.err)")

        // Root's calls are authorised too, and run in the order sent.
        try f.table("Activate", [.uint32(2)])
        try f.table("Deactivate", [.uint32(2)])
        try f.table("Delete", [.uint32(2)])
        #expect(try f.table("List").first?.arrayValue?.count == 1)
    }
}

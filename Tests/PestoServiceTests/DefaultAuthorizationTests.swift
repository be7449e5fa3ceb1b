// SPDX-License-Identifier: GPL-2.0-or-later

// The authorisation pestod chooses when --authorize is not given: on a bus given with
// --address (which other local users may reach) it is polkit, falling back to uid 0 when
// polkit does not answer, never "none"; choosing none there is logged as a warning.

import Foundation
import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoDBus
@testable import PestoService

@Suite("pestod default authorisation", .serialized, .timeLimit(.minutes(10)))
struct DefaultAuthorizationTests {
    static let isRoot = getuid() == 0

    /// busctl as nobody (uid 65534) against the fixture's bus.
    func busctlAsNobody(_ f: PestodFixture, _ args: [String]) throws -> (status: Int32, out: String, err: String) {
        try run(
            "/usr/bin/setpriv", ["--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/busctl", "--address=\(f.address)"] + args)
    }

    @Test(
        "--address without --authorize: a non-root caller is refused every change and Lock; root may change",
        .enabled(if: isRoot, "needs root to run a client as another user"))
    func addressDefaultsToPolkit() throws {
        let f = try PestodFixture(authorizeNone: false)
        #expect(f.log.contains("authorisation of changes: polkit"), "\(f.log)")
        #expect(!f.log.contains("--authorize none"))
        let p = TestSockets.freePorts(2).lowerBound
        try f.table("Insert", [.uint32(1), PestodFixture.rule(p)])
        let before = try f.snapshot()

        // pesto-test-peer as nobody (uid 65534): it prints each reply's error name and message.
        let peer = try ChildProcess(
            "/usr/bin/setpriv", ["--reuid=65534", "--regid=65534", "--clear-groups", Products.path("pesto-test-peer"), f.address])
        let ready = peer.readLine() ?? ""
        #expect(ready.hasPrefix("ready"), "\(ready)")
        for line in ["Insert 2 \(p + 1)", "Activate 1", "Delete 1", "Lock"] {
            let answer = peer.ask(line)
            // polkit is not on this private bus, so only uid 0 may change.
            #expect(
                answer.hasPrefix("error \(DBusErrorReply.accessDenied): Not authorized to top.passt.Pesto1.modify: uid 65534 is not root"),
                "\(line): \(answer)")
        }
        #expect(try f.snapshot() == before)
        // Reads stay open.
        let status = try busctlAsNobody(
            f, ["call", PestodFixture.dest, PestodFixture.hostPath, PestodFixture.tableInterface, "Status", "u", "1"])
        #expect(status.out == "buusu false 0 0 \"\" 0\n", "\(status.err)")
        // Root passes the same check.
        #expect(try f.table("Activate", [.uint32(1)]) == [.uint32(1), .uint32(0)])
    }

    @Test(
        "--authorize none on --address is obeyed and logged as a warning",
        .enabled(if: isRoot, "needs root to run a client as another user"))
    func explicitNoneWarns() throws {
        let f = try PestodFixture(pestodArguments: ["--authorize", "none"])
        let warning = f.log.split(separator: "\n").filter { $0.contains("warning") && $0.contains("--authorize none") }
        #expect(warning.count == 1, "\(f.log)")
        #expect(f.log.contains("authorisation of changes: none"))
        let p = TestSockets.freePorts(1).lowerBound
        let r = try busctlAsNobody(
            f,
            [
                "call", PestodFixture.dest, PestodFixture.hostPath, PestodFixture.tableInterface,
                "Insert", "ua{sv}", "1", "3", "protocol", "s", "tcp", "address", "s", "127.0.0.1", "first-port", "q", "\(p)",
            ])
        #expect(r.status == 0, "\(r.err)")
    }
}

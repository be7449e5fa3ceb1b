// SPDX-License-Identifier: GPL-2.0-or-later

// examples/follow-tables.py (doc/live-model.md) against a real pestod: the Gio subscriber
// prints the table once pestod is on the bus and then follows every change from signals,
// including pestod leaving the bus and coming back. Skipped without python3-gi.

import Foundation
import PestoDBus
import PestoModel
import PestoService
import PestoTestSupport
import Testing

/// Whether /usr/bin/python3 has Gio (python3-gi).
private let gioAvailable = (try? run("/usr/bin/python3", ["-c", "from gi.repository import Gio"]))?.status == 0

/// examples/follow-tables.py, run against pestod on a private bus.
@Suite("Gio live-model example", .timeLimit(.minutes(10)))
struct LiveModelExampleTests {
    /// Reads the example's lines until one contains `text`; returns that line, or nil at end or timeout.
    private func line(_ child: ChildProcess, containing text: String) -> String? {
        while let line = child.readLine() {
            if line.contains(text) { return line }
        }
        Issue.record("follow-tables.py never printed \"\(text)\"")
        return nil
    }

    @Test(
        "follow-tables.py prints the table, then rules added, changed, removed, the lock, and pestod leaving and returning",
        .enabled(if: gioAvailable, "needs python3-gi"))
    func followsFromSignals() throws {
        let fixture = try PestodFixture(pestodArguments: ["--authorize", "none"])
        let port = TestSockets.freePorts(1).lowerBound
        try fixture.table("Insert", [.uint32(1), PestodFixture.rule(port, [("owner", .string("before"))])])
        let example = Products.repository.appendingPathComponent("examples/follow-tables.py").path
        let child = try ChildProcess("/usr/bin/python3", [example, "--address", fixture.address])

        // The initial dump, from GetManagedObjects.
        let first = line(child, containing: "HOST rule 1:")
        #expect(first == "HOST rule 1: tcp 127.0.0.1/\(port) -> default/\(port): inactive, owner before")
        #expect(line(child, containing: "following") != nil)

        // Changes, from signals.
        try fixture.table("Activate", [.uint32(1)])
        #expect(
            line(child, containing: "active, 1 bound")
                == "HOST rule 1: tcp 127.0.0.1/\(port) -> default/\(port): active, 1 bound, owner before")
        try fixture.table("Insert", [.uint32(2), PestodFixture.rule(port &+ 1, [("interface", .string("lo"))])])
        #expect(
            line(child, containing: "added") == "added HOST rule 2: tcp 127.0.0.1%lo/\(port + 1) -> default/\(port + 1): inactive, owner -")
        try fixture.table("Delete", [.uint32(2)])
        #expect(line(child, containing: "removed") == "removed rule 2 (\(PestodFixture.hostPath)/rules/2)")
        try fixture.manager("Lock")
        #expect(line(child, containing: "lock:")?.hasPrefix("lock: held by :") == true)
        try fixture.manager("Unlock")
        #expect(line(child, containing: "lock:") == "lock: free")

        // pestod leaves and comes back (empty: no state file).
        fixture.pestod.kill()
        #expect(line(child, containing: "pestod is not running") != nil)
        try fixture.startPestod(["--authorize", "none"])
        #expect(line(child, containing: "pestod appeared as") != nil)
        #expect(line(child, containing: "following") != nil)
        try fixture.table("Insert", [.uint32(3), PestodFixture.rule(port)])
        #expect(line(child, containing: "added")?.hasPrefix("added HOST rule 3:") == true)
        child.kill()
    }
}

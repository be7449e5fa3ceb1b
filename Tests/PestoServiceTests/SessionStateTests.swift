// SPDX-License-Identifier: GPL-2.0-or-later

// Persistence under bus activation: the session activation file starts `pestod --session`
// without --state, so the session daemon must keep its tables in $XDG_STATE_HOME/pesto/state
// by itself, or every rule vanishes when the activated daemon exits. Here pestod runs with
// --session against a private bus (DBUS_SESSION_BUS_ADDRESS), is killed, and is started again.

import Foundation
import PestoDBus
import PestoEngine
import PestoModel
import PestoTestSupport
import Testing

@testable import PestoService

@Suite("pestod --session: default state file", .serialized, .timeLimit(.minutes(10)))
struct SessionStateTests {
    /// Starts `pestod --session [extra]` on the fixture's bus with XDG_STATE_HOME=`stateHome`.
    func startSessionPestod(_ f: PestodFixture, stateHome: String, _ extra: [String] = []) throws -> ChildProcess {
        let notifyPath = f.directory.url.appendingPathComponent("notify-session-\(UUID().uuidString.prefix(6))").path
        let logPath = f.directory.url.appendingPathComponent("session-pestod.log").path
        return try ChildProcess.startReady(
            Products.path("pestod"), ["--session", "--log-level", "debug"] + extra,
            environment: ["DBUS_SESSION_BUS_ADDRESS": f.address, "XDG_STATE_HOME": stateHome],
            notifyPath: notifyPath, stderr: .file(logPath), logPath: logPath)
    }

    @Test("pestod --session without --state saves to $XDG_STATE_HOME/pesto/state and restores after a kill")
    func sessionDefaultState() throws {
        let f = try PestodFixture()
        f.pestod.kill()  // the fixture's own pestod (with --address) gives way to a --session one
        let stateHome = f.directory.url.appendingPathComponent("xdg-state").path  // not there yet
        let port = TestSockets.freePorts(1).lowerBound
        var pestod = try startSessionPestod(f, stateHome: stateHome)
        let added = try run(Products.path("pestoctl"), ["--address", f.address, "-A", "-t", "127.0.0.1/\(port)"])
        #expect(added.status == 0, "\(added.err)")
        let committed = try f.table("List")
        #expect(FileManager.default.fileExists(atPath: stateHome + "/pesto/state"))
        pestod.kill()  // SIGKILL, as an activated daemon may end

        pestod = try startSessionPestod(f, stateHome: stateHome)
        #expect(try f.table("List") == committed)
        pestod.kill()

        // --no-state: a fresh start with nothing restored.
        pestod = try startSessionPestod(f, stateHome: stateHome, ["--no-state"])
        #expect(try f.table("List").first?.arrayValue?.isEmpty == true)
        pestod.kill()
    }
}

// SPDX-License-Identifier: GPL-2.0-or-later

// The upgrade request (UpgradeRequest.swift) without systemd: `pestod --reload-request PID`,
// as the unit's ExecReload= runs it, makes the running pestod start its own executable with
// its arguments plus --replace; the new one takes over and the old one exits, every listener
// keeping its inode and a relayed connection its bytes.

import Foundation
import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoDBus
@testable import PestoService

@Suite("pestod upgrade on reload request", .serialized, .timeLimit(.minutes(10)))
struct UpgradeRequestTests {
    @Test(
        "pestod --reload-request PID: the running pestod starts its executable with --replace, which takes over (same listeners, same inodes, a relayed connection going on); the request returns once the old one has exited"
    )
    func reloadRequestUpgrades() throws {
        let f = try PestodFixture(pestodArguments: TakeoverTests.arguments)
        let ports = TestSockets.freePorts(11)
        let targetPort = TestSockets.freePorts(1).lowerBound
        let listener = try TakeoverRelayTests.targetListener(port: targetPort)
        defer { close(listener) }
        try f.table("Insert", [.uint32(1), PestodFixture.rule(ports.lowerBound, [("target-port", .uint16(targetPort))])])
        try f.table("Activate", [.uint32(1)])
        try f.table("Insert", [.uint32(2), PestodFixture.rule(ports.lowerBound + 1, [("last-port", .uint16(ports.upperBound))])])
        try f.table("Activate", [.uint32(2)])
        let before = try f.snapshot()
        #expect(before.sockets.count == 11)
        let connection = try TakeoverRelayTests.relayed(port: ports.lowerBound, target: listener)
        defer {
            close(connection.client)
            close(connection.target)
        }
        let up = StreamDirection("up", from: connection.client, to: connection.target)
        let down = StreamDirection("down", from: connection.target, to: connection.client)
        let oldPID = f.pestod.pid

        let request = try run(Products.path("pestod"), ["--reload-request", "\(oldPID)"])
        #expect(request.status == 0, "\(request.err)")
        #expect(request.err.contains("has handed over to its successor"), "\(request.err)")
        #expect(f.pestod.waitUntilExit() == 0)
        let newPID = try #require(
            try f.client.call(
                "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "GetConnectionUnixProcessID",
                [.string(PestodFixture.dest)]
            ).first?.uint32Value)
        defer { kill(pid_t(newPID), SIGKILL) }
        #expect(pid_t(newPID) != oldPID)
        #expect(f.log.contains("upgrade requested (SIGUSR2): started"), "\(f.log)")
        #expect(f.log.contains("1 relayed connections and 0 UDP flows (0 refused)"), "\(f.log)")
        #expect(listeningSocketsOf(pid: pid_t(newPID)) == before.sockets)
        #expect(try f.table("List") == before.rules)
        // The connection goes on through the new pestod, every byte in order.
        #expect(up.waitForRead(beyond: up.read + 65_536) && down.waitForRead(beyond: down.read + 65_536))
        up.stop()
        down.stop()
        #expect(up.finish(), "\(up.problems)")
        #expect(down.finish(), "\(down.problems)")
    }

    @Test("pestod --reload-request of a process that does not exist fails with an error")
    func reloadRequestOfNothing() throws {
        // A PID that was just reaped: nothing runs under it.
        let pid = try ChildProcess.spawn("/bin/true", [])
        _ = ChildProcess.waitExit(pid)
        let request = try run(Products.path("pestod"), ["--reload-request", "\(pid)"])
        #expect(request.status == 1)
        #expect(request.err.contains("Cannot send SIGUSR2 to pestod \(pid)"), "\(request.err)")
    }

    @Test(
        "pestod --reload-request PID of a process whose command line names the running pestod's --runtime-dir but which is not that pestod: refused with a message, nothing sent (SIGUSR2 ended such a process before)",
        .timeLimit(.minutes(2))
    )
    func reloadRequestOfAnotherProcess() throws {
        let f = try PestodFixture(pestodArguments: TakeoverTests.arguments)
        // A shell waiting on its stdin (no child of its own), named like a pestod's arguments.
        let other = try ChildProcess("/bin/sh", ["-c", "read line", "sh", "--runtime-dir", f.runtimePath], stdout: .devNull)
        defer { other.kill() }
        let request = try run(Products.path("pestod"), ["--reload-request", "\(other.pid)"])
        #expect(request.status == 1)
        #expect(request.err.contains("is not the pestod serving"), "\(request.err)")
        #expect(other.isRunning, "the other process was signalled")
        _ = try f.table("List")  // a round trip: the running pestod is untouched and serving
        #expect(f.pestod.isRunning)
        #expect(!f.log.contains("upgrade requested"), "\(f.log)")
        // The running pestod itself is still accepted: the check tells the two apart.
        #expect(ReloadRequest.listens(pid: f.pestod.pid, on: f.runtimePath + "/takeover.sock"))
        #expect(!ReloadRequest.listens(pid: other.pid, on: f.runtimePath + "/takeover.sock"))
    }

    @Test(
        "a pestod without a takeover socket: --reload-request refuses at once and sends nothing, and SIGUSR2 does not end it (it ended the demo's pestod before)"
    )
    func reloadRequestWithoutTakeoverSocket() throws {
        let f = try PestodFixture()  // no --runtime-dir, no $RUNTIME_DIRECTORY
        let request = try run(Products.path("pestod"), ["--reload-request", "\(f.pestod.pid)"])
        #expect(request.status == 1)
        #expect(request.err.contains("has no takeover socket"), "\(request.err)")
        #expect(!request.err.contains("handed over"), "\(request.err)")
        kill(f.pestod.pid, SIGUSR2)
        _ = try f.table("List")  // a round trip: pestod has handled the signal by its answer
        #expect(f.pestod.isRunning, "SIGUSR2 ended pestod: \(f.log)")
        #expect(try f.table("List").first?.arrayValue != nil)
    }

    @Test(
        "the running pestod dies instead of handing over: --reload-request says so and exits 1, never claiming a handover"
    )
    func reloadRequestWhenTheOldDies() throws {
        let f = try PestodFixture(pestodArguments: TakeoverTests.arguments)
        try f.manager("Lock")  // the successor waits for the lock, so the old one is still there
        let errPath = f.directory.file("reload-request.err")
        let request = try ChildProcess(
            Products.path("pestod"), ["--reload-request", "\(f.pestod.pid)"], stdout: .devNull, stderr: .file(errPath))
        let deadline = MonotonicInstant.now.adding(milliseconds: 20_000)
        while !f.log.contains("takeover waits"), MonotonicInstant.now < deadline {
            usleep(10_000)  // a log file has no readiness signal
        }
        #expect(f.log.contains("takeover waits"), "\(f.log)")
        kill(f.pestod.pid, SIGKILL)
        #expect(request.waitUntilExit() == 1)
        let err = readTextFile(errPath) ?? ""
        #expect(err.contains("no successor opened"), "\(err)")
        #expect(!err.contains("handed over to its successor"), "\(err)")
    }

    @Test(
        "a successor's takeover socket is told from the old one at the same path even when the file system gives it the old inode number (ext4 does, right after the unlink)"
    )
    func successorSocketToldApartFromTheOld() throws {
        let dir = try TemporaryDirectory()
        let path = dir.file("takeover.sock")
        var inodeReused = 0
        for _ in 0..<20 {
            let old = try UnixListener.open(path: path, type: Int32(SOCK_STREAM.rawValue), backlog: 1, name: "old socket")
            guard case .success(let before) = Sys.lstat(path) else {
                Issue.record("no old socket")
                return
            }
            #expect(!ReloadRequest.isAnotherFile(before, than: before))
            close(old)  // the old pestod exits without unlinking; its successor replaces the file
            let new = try UnixListener.open(path: path, type: Int32(SOCK_STREAM.rawValue), backlog: 1, name: "new socket")
            defer { close(new) }
            guard case .success(let after) = Sys.lstat(path) else {
                Issue.record("no new socket")
                return
            }
            if after.st_ino == before.st_ino { inodeReused += 1 }
            #expect(ReloadRequest.isAnotherFile(after, than: before))
            _ = Sys.unlink(path)
        }
        // Not an expectation (another file system may never reuse it): what this one did.
        print("inode number reused by the new socket in \(inodeReused) of 20 rounds")
    }
}

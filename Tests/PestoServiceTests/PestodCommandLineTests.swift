// SPDX-License-Identifier: GPL-2.0-or-later

// pestod's own command line as a new user meets it: the version, a short --help, the
// messages of a mistaken start (an unknown log level, a second pestod, a missing namespace),
// the default runtime directory of --replace, and journald's priority prefixes.

import Foundation
import PestoModel
import PestoTestSupport
import Testing

@testable import PestoDBus
@testable import PestoService

@Suite("pestod's command line", .serialized, .timeLimit(.minutes(10)))
struct PestodCommandLineTests {
    static let isRoot = getuid() == 0

    @Test("pestod --version, pestoctl --version and the Manager's ProductVersion give the one product version")
    func oneVersion() throws {
        let pestod = try run(Products.path("pestod"), ["--version"])
        #expect(pestod.status == 0)
        #expect(pestod.out.hasPrefix("pestod \(ProductVersion.current) "), "\(pestod.out)")
        #expect(pestod.out.contains("version \(PestoBusNames.version)"), "the interface's version beside it")
        let pestoctl = try run(Products.path("pestoctl"), ["--version"])
        #expect(pestoctl.status == 0)
        #expect(pestoctl.out.hasPrefix("pestoctl \(ProductVersion.current) "), "\(pestoctl.out)")
        let f = try PestodFixture()
        let reply = try f.client.call(
            PestodFixture.dest, PestodFixture.managerPath, "org.freedesktop.DBus.Properties", "Get",
            [.string(PestodFixture.managerInterface), .string("ProductVersion")])
        #expect(reply.first?.variantValue?.stringValue == ProductVersion.current)
    }

    @Test("pestod --help is short, opens with what pestod is, and leaves the descriptor arithmetic to pestod(8)")
    func shortHelp() throws {
        let r = try run(Products.path("pestod"), ["--help"])
        #expect(r.status == 0)
        let lines = r.out.split(separator: "\n", omittingEmptySubsequences: false)
        #expect(lines.count <= 60, "\(lines.count) lines")
        #expect(lines.first?.hasPrefix("OVERVIEW: Keep a live port-forwarding table") == true, "\(lines.first ?? "")")
        #expect(!r.out.contains("RLIMIT_NOFILE") && !r.out.contains("E - min"))
        #expect(r.out.contains("pestod(8)"))
    }

    @Test("--log-level loud names the levels there are")
    func unknownLogLevel() throws {
        let r = try run(Products.path("pestod"), ["--log-level", "loud"])
        #expect(r.status != 0)
        #expect(r.err.contains("loud") && r.err.contains("trace, debug, info, notice, warning, error, critical"), "\(r.err)")
    }

    @Test("a second pestod on the same bus says so and suggests --replace", .timeLimit(.minutes(2)))
    func secondPestod() throws {
        let f = try PestodFixture()
        let r = try run(Products.path("pestod"), ["--address", f.address, "--authorize", "none", "--no-state"])
        #expect(r.status == 1)
        #expect(r.err.contains("another process owns it") && r.err.contains("pestod --replace"), "\(r.err)")
        #expect(r.err.contains("--runtime-dir"), "with --address there is no default runtime directory")
    }

    @Test("--replace with --address and no runtime directory says which option to give")
    func replaceNeedsRuntimeDirectory() throws {
        let r = try run(Products.path("pestod"), ["--address", "unix:path=/nonexistent/bus", "--replace"])
        #expect(r.status != 0)
        #expect(r.err.contains("--runtime-dir DIR"), "\(r.err)")
    }

    @Test("a missing --netns path is named once, with its errno, what to give instead, and no stray period")
    func missingNamespace() throws {
        let r = try run(Products.path("pestod"), ["--address", "unix:path=/nonexistent/bus", "--netns", "/nonexistent/ns"])
        #expect(r.status == 64, "a usage error")
        #expect(r.err.contains("--netns /nonexistent/ns: ENOENT"), "\(r.err)")
        #expect(r.err.contains("/run/netns/NAME (see ip netns list) or /proc/PID/ns/net"), "\(r.err)")
        #expect(!r.err.contains(".:"), "\(r.err)")
    }

    @Test("a --netns path that is no namespace: the error and its errno, joined without a stray period")
    func notANamespace() throws {
        // A file, but not a namespace: setns(2) refuses it once pestod opens it, before the bus.
        let directory = try TemporaryDirectory()
        #expect(FileManager.default.createFile(atPath: directory.file("ns"), contents: nil))
        let r = try run(Products.path("pestod"), ["--address", "unix:path=/nonexistent/bus", "--netns", directory.file("ns")])
        #expect(r.status == 1)
        #expect(r.err.contains(directory.file("ns")) && r.err.contains(": EINVAL"), "\(r.err)")
        #expect(!r.err.contains(".:"), "\(r.err)")
    }

    @Test(
        "pestod --session --replace finds the running one in $XDG_RUNTIME_DIR/pesto without --runtime-dir",
        .enabled(if: isRoot), .timeLimit(.minutes(2)))
    func sessionDefaultRuntimeDirectory() throws {
        let f = try PestodFixture()
        f.pestod.kill()  // the fixture's own pestod (with --address) gives way to --session ones
        let runtime = f.directory.file("xdg-runtime")
        try FileManager.default.createDirectory(atPath: runtime, withIntermediateDirectories: false)
        let environment = ["DBUS_SESSION_BUS_ADDRESS": f.address, "XDG_RUNTIME_DIR": runtime, "RUNTIME_DIRECTORY": ""]
        func start(_ extra: [String], _ name: String) throws -> ChildProcess {
            try ChildProcess.startReady(
                Products.path("pestod"), ["--session", "--no-state", "--log-level", "debug"] + extra, environment: environment,
                notifyPath: f.directory.file("notify-\(name)"), stderr: .file(f.directory.file("\(name).log")),
                logPath: f.directory.file("\(name).log"))
        }
        let first = try start([], "first")
        #expect(FileManager.default.fileExists(atPath: runtime + "/pesto/takeover.sock"))
        let second = try start(["--replace"], "second")
        defer { second.kill() }
        #expect(first.waitUntilExit() == 0, "the first pestod handed over and exited")
        #expect(second.isRunning)
    }

    @Test(
        "pestod --reload-request finds a --session pestod's default runtime directory as pestod does, and the upgrade completes",
        .enabled(if: isRoot), .timeLimit(.minutes(2)))
    func reloadRequestFindsDefaultRuntimeDirectory() throws {
        let f = try PestodFixture()
        f.pestod.kill()
        let runtime = f.directory.file("xdg-runtime")
        try FileManager.default.createDirectory(atPath: runtime, withIntermediateDirectories: false)
        let log = f.directory.file("session.log")
        let running = try ChildProcess.startReady(
            Products.path("pestod"), ["--session", "--no-state"],
            environment: ["DBUS_SESSION_BUS_ADDRESS": f.address, "XDG_RUNTIME_DIR": runtime, "RUNTIME_DIRECTORY": ""],
            notifyPath: f.directory.file("notify-session"), stderr: .file(log), logPath: log)
        let request = try run(Products.path("pestod"), ["--reload-request", "\(running.pid)"], timeoutMilliseconds: 30_000)
        #expect(request.status == 0, "\(request.err)")
        guard request.status == 0 else { return running.kill() }  // it stays in charge: do not wait for its exit
        #expect(running.waitUntilExit() == 0)
        // The successor (started by the old pestod, not our child) owns the name now.
        let successor = try f.client.call(
            "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "GetConnectionUnixProcessID",
            [.string(PestodFixture.dest)]
        ).first?.uint32Value
        if let successor { kill(pid_t(successor), SIGKILL) }
        #expect(successor != nil && pid_t(successor!) != running.pid)
    }

    @Test("journald: with $JOURNAL_STREAM naming stderr every line starts with its priority; otherwise with the time")
    func journalPriorities() throws {
        let directory = try TemporaryDirectory()
        let log = directory.file("stderr")
        #expect(FileManager.default.createFile(atPath: log, contents: nil))
        var st = stat()
        #expect(stat(log, &st) == 0)
        let stream = "\(st.st_dev):\(st.st_ino)"
        // Info lines (descriptors, limits), then a critical one: the bus cannot be reached.
        let arguments = ["--address", "unix:path=/nonexistent/bus", "--no-state"]
        let journal = try ChildProcess(
            Products.path("pestod"), arguments, environment: ["JOURNAL_STREAM": stream], stdin: .devNull, stdout: .devNull,
            stderr: .file(log))
        #expect(journal.waitUntilExit() == 1)
        let lines = (try String(contentsOfFile: log, encoding: .utf8)).split(separator: "\n")
        #expect(!lines.isEmpty)
        #expect(lines.allSatisfy { $0.first == "<" }, "\(lines)")
        #expect(lines.contains { $0.hasPrefix("<6>info pestod:") }, "\(lines)")
        #expect(lines.last?.hasPrefix("<2>critical pestod:") == true, "\(lines)")

        // Another file's device and inode (inherited from a parent, say): no prefixes.
        let other = try ChildProcess(
            Products.path("pestod"), arguments, environment: ["JOURNAL_STREAM": "\(st.st_dev):\(st.st_ino + 1)"], stdin: .devNull,
            stdout: .devNull, stderr: .file(log))
        #expect(other.waitUntilExit() == 1)
        let plain = (try String(contentsOfFile: log, encoding: .utf8)).split(separator: "\n")
        #expect(!plain.isEmpty && plain.allSatisfy { $0.first?.isNumber == true }, "\(plain)")
        #expect(plain.last?.contains(" critical pestod:") == true)
    }

    @Test("the journal's priorities follow sd-daemon(3), and JOURNAL_STREAM must name the very file")
    func journalStreamParsing() {
        #expect(StderrLogHandler.isJournalStream("8:12345", device: 8, inode: 12345))
        #expect(!StderrLogHandler.isJournalStream("8:12345", device: 8, inode: 12346))
        #expect(!StderrLogHandler.isJournalStream("8:", device: 8, inode: 0))
        #expect(!StderrLogHandler.isJournalStream("garbage", device: 0, inode: 0))
        #expect(
            [.trace, .debug, .info, .notice, .warning, .error, .critical].map(StderrLogHandler.priority) == [7, 7, 6, 5, 4, 3, 2])
    }
}

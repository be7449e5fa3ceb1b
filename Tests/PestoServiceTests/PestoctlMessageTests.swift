// SPDX-License-Identifier: GPL-2.0-or-later

// pestoctl's messages and output as a new user meets them: each names the user's own input,
// the real cause and the next step (an identical rule added again, an overlapping one, the
// wrong bus), --json for every command that prints (watch included), timestamps and rule
// text in watch lines, the default owner tag, and the shared rule for choosing IDs.

import Foundation
import PestoModel
import PestoTestSupport
import Testing

@testable import PestoDBus
@testable import PestoService

@Suite("pestoctl's messages", .serialized, .timeLimit(.minutes(10)))
struct PestoctlMessageTests {
    static let isRoot = getuid() == 0

    /// The HOST table's rules: ID → (owner, active).
    func rules(_ f: PestodFixture) throws -> [UInt32: (owner: String, active: Bool)] {
        var out: [UInt32: (String, Bool)] = [:]
        for entry in try f.table("List").first?.arrayValue ?? [] {
            guard let e = entry.structValue, let id = e[0].uint32Value, let d = e[1].vardictValue else { continue }
            out[id] = (d.first { $0.0 == "owner" }?.1.stringValue ?? "", e[2].structValue?[0].boolValue ?? false)
        }
        return out
    }

    @Test("adding an identical rule again names the user's spec, the rule there and the next step", .timeLimit(.minutes(2)))
    func identicalRuleAgain() throws {
        let f = try PestodFixture()
        let p = TestSockets.freePorts(1).lowerBound
        #expect(try f.pestoctl(["-A", "-t", "127.0.0.1/\(p)"]).status == 0)
        let r = try f.pestoctl(["-A", "-t", "127.0.0.1/\(p)"])
        #expect(r.status == 1)
        #expect(
            r.err.contains(
                "-A -t 127.0.0.1/\(p): the HOST table already has this rule (ID 10: -t 127.0.0.1/\(p), active); nothing was changed."),
            "\(r.err)")
        #expect(r.err.contains("pestoctl -D -t 127.0.0.1/\(p)"), "\(r.err)")
        #expect(!r.err.contains("Rule 20") && !r.err.contains("deactivate rule"), "\(r.err)")
        #expect(try rules(f).keys.sorted() == [10])
    }

    @Test("an overlapping rule names the rule it overlaps by its spec and says what to do", .timeLimit(.minutes(2)))
    func overlappingRule() throws {
        let f = try PestodFixture()
        let p = TestSockets.freePorts(3).lowerBound
        #expect(try f.pestoctl(["-A", "-t", "127.0.0.1/\(p)-\(p + 2)"]).status == 0)
        let r = try f.pestoctl(["-A", "-t", "127.0.0.1/\(p + 1)"])
        #expect(r.status == 1)
        #expect(
            r.err.contains(
                "-t 127.0.0.1/\(p + 1) (-t 127.0.0.1/\(p + 1)) overlaps the HOST table's active rule 10, -t 127.0.0.1/\(p)-\(p + 2)"),
            "\(r.err)")
        #expect(r.err.contains("pestoctl -D -t 127.0.0.1/\(p)-\(p + 2)") && r.err.contains("rolled back"), "\(r.err)")
        #expect(!r.err.contains("Rule 20"), "\(r.err)")
        #expect(try rules(f).keys.sorted() == [10])
    }

    @Test("a file given as a spec (pesto's socket PATH after -t) is named, with where PATH goes")
    func pathAsSpec() throws {
        let directory = try TemporaryDirectory()
        let path = directory.file("pesto.sock")
        #expect(FileManager.default.createFile(atPath: path, contents: nil))
        let r = try run(Products.path("pestoctl"), ["--address", "unix:path=/nonexistent/bus", "-A", "-t", path])
        #expect(r.status == 1, "refused as a bad spec, before the bus is reached")
        #expect(
            r.err.contains("\"\(path)\" is a file, not a port spec: upstream pesto's control socket PATH goes after the options"),
            "\(r.err)")
    }

    @Test("rules pestoctl adds carry the owner tag pestoctl, or --owner's", .timeLimit(.minutes(2)))
    func ownerTag() throws {
        let f = try PestodFixture()
        let p = TestSockets.freePorts(2).lowerBound
        #expect(try f.pestoctl(["-A", "-t", "127.0.0.1/\(p)"]).status == 0)
        #expect(try f.pestoctl(["-A", "--owner", "podman", "-t", "127.0.0.1/\(p + 1)"]).status == 0)
        let r = try rules(f)
        #expect(r[10]?.owner == "pestoctl")
        #expect(r[20]?.owner == "podman")
        #expect(try f.pestoctl(["--owner", "x"]).status == 2, "--owner is only for updates")
    }

    @Test("IDs follow the shared rule: highest rounded down to a multiple of 10, plus 10, then steps of 10", .timeLimit(.minutes(2)))
    func sharedIDRule() throws {
        let f = try PestodFixture()
        let p = TestSockets.freePorts(3).lowerBound
        _ = try f.table("Insert", [.uint32(37), RuleCodec.encode(Rule(proto: .udp, address: .init("127.0.0.1"), firstPort: p))])
        let r = try f.pestoctl(["--json", "-A", "-t", "127.0.0.1/\(p + 1),\(p + 2)"])
        #expect(r.status == 0, "\(r.err)")
        let parsed = try JSONSerialization.jsonObject(with: Data(r.out.utf8)) as? [String: Any]
        let added = parsed?["added"] as? [[String: Any]]
        #expect(added?.compactMap { $0["id"] as? Int } == [40, 50], "\(r.out)")
        #expect(added?.first?["rule"] as? String == "-t 127.0.0.1/\(p + 1)")
        #expect(try rules(f).keys.sorted() == [37, 40, 50])
    }

    @Test("watch: every line has its time and names the rule; --json gives one object a line", .timeLimit(.minutes(2)))
    func watchLines() throws {
        let f = try PestodFixture()
        let p = TestSockets.freePorts(1).lowerBound
        let text = try ChildProcess(Products.path("pestoctl"), ["--address", f.address, "watch"])
        let json = try ChildProcess(Products.path("pestoctl"), ["--address", f.address, "--json", "watch"])
        // The time, as pestod's log gives it: 2026-12-08T01:02:03+0000.
        let stamp = #/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} /#
        let first = text.readLine() ?? ""
        #expect(first.contains(stamp) && first.hasSuffix(" watching"), "\(first)")
        let firstJSON = json.readLine() ?? ""
        #expect(firstJSON.contains("\"event\": \"watching\""), "\(firstJSON)")
        #expect(try f.pestoctl(["-t", "127.0.0.1/\(p)"]).status == 0)

        var lines: [String] = []
        while let line = text.readLine(timeoutMilliseconds: 5000) {
            lines.append(line)
            if line.hasSuffix(" unlocked") { break }
        }
        #expect(lines.allSatisfy { $0.contains(stamp) }, "\(lines)")
        #expect(lines.contains { $0.hasSuffix(" HOST rule 10 added: -t 127.0.0.1/\(p), owner pestoctl") }, "\(lines)")
        #expect(lines.contains { $0.hasSuffix(" HOST rule 10 (-t 127.0.0.1/\(p)): active, 1 bound, 0 failed") }, "\(lines)")

        var objects: [[String: Any]] = []
        while let line = json.readLine(timeoutMilliseconds: 5000) {
            let object = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any]
            #expect(object?["time"] is String, "\(line)")
            objects.append(object ?? [:])
            if object?["event"] as? String == "lock", object?["owner"] as? String == "" { break }
        }
        let state = objects.first { $0["event"] as? String == "rule-state" }
        #expect(state?["table"] as? String == "HOST" && state?["id"] as? Int == 10 && state?["active"] as? Bool == true)
        #expect(state?["rule"] as? String == "-t 127.0.0.1/\(p)")
        #expect(objects.contains { $0["event"] as? String == "rule-added" && $0["owner"] as? String == "pestoctl" })
        f.pestod.kill()
        #expect(text.waitUntilExit() == 0 && json.waitUntilExit() == 0, "the service leaving ends the watch")
    }

    @Test("watch shows a refused upload from an upstream pesto client", .timeLimit(.minutes(2)))
    func watchRefusedUpload() throws {
        let f = try PestodFixture(pestodArguments: ["--control", "CONTROL"])
        let watcher = try ChildProcess(Products.path("pestoctl"), ["--address", f.address, "watch"])
        #expect(watcher.readLine()?.hasSuffix(" watching") == true)
        #expect(WireClient.pesto(path: f.controlPath, rules: [WireClient.specRule(listen: "224.0.0.1", port: 5000)]) == .uploaded)
        let line = watcher.readLine(timeoutMilliseconds: 5000) ?? ""
        #expect(line.contains("control socket \(f.controlPath): upload refused: ") && line.contains("224.0.0.1"), "\(line)")
        #expect(line.contains("(1 rule: -t 224.0.0.1/5000)"), "\(line)")
        watcher.kill()
    }

    @Test(
        "EACCES on a port below 1024 says the port is privileged and what pestod needs",
        .enabled(if: isRoot && unprivilegedPortStart() > 999), .timeLimit(.minutes(2)))
    func privilegedPort() throws {
        let f = try PestodFixture()
        f.pestod.kill()
        // pestod as root without CAP_NET_BIND_SERVICE, as a user's pestod would be.
        let log = f.directory.file("pestod-nocap.log")
        let pestod = try ChildProcess.startReady(
            "/usr/bin/setpriv",
            [
                "--bounding-set=-net_bind_service", "--inh-caps=-net_bind_service", Products.path("pestod"), "--address", f.address,
                "--authorize", "none",
            ], notifyPath: f.directory.file("notify-nocap"), stderr: .file(log), logPath: log)
        defer { pestod.kill() }
        let r = try f.pestoctl(["-A", "-t", "127.0.0.1/999"])
        #expect(r.status == 1)
        #expect(r.err.contains("-t 127.0.0.1/999: not every socket could be bound"), "\(r.err)")
        #expect(
            r.err.contains("(EACCES: ports below 1024 are privileged; pestod must run as root or with CAP_NET_BIND_SERVICE"), "\(r.err)")
        #expect(try rules(f).isEmpty, "rolled back")
        // Kept with --best-effort, the rule's status says the same.
        #expect(try f.pestoctl(["--best-effort", "-A", "-t", "127.0.0.1/999"]).status == 0)
        let status = try f.pestoctl(["status", "10"])
        #expect(
            status.out.contains(
                "HOST rule 10 (-t 127.0.0.1/999): active, 0 bound, 1 failed, last error EACCES: ports below 1024 are privileged"),
            "\(status.out)")
    }

    /// The lowest port an unprivileged process may bind (net.ipv4.ip_unprivileged_port_start).
    static func unprivilegedPortStart() -> Int {
        (try? String(contentsOfFile: "/proc/sys/net/ipv4/ip_unprivileged_port_start", encoding: .utf8))
            .flatMap { Int($0.trimmingCharacters(in: .whitespacesAndNewlines)) } ?? 0
    }

    @Test(
        "a non-root pestoctl with no session bus is told why and to try --system, without libdbus's X11 autolaunch words",
        .enabled(if: isRoot), .timeLimit(.minutes(2)))
    func noSessionBus() throws {
        let f = try PestodFixture()
        let r = try run(
            "/usr/bin/env",
            [
                "-u", "DBUS_SESSION_BUS_ADDRESS", "DBUS_SYSTEM_BUS_ADDRESS=\(f.address)", "/usr/bin/setpriv", "--reuid=65534",
                "--regid=65534", "--clear-groups", Products.path("pestoctl"),
            ])
        #expect(r.status == 3)
        #expect(r.err.contains("there is no session bus (DBUS_SESSION_BUS_ADDRESS is not set)"), "\(r.err)")
        #expect(r.err.contains("try \"pestoctl --system\" (DBUS_SYSTEM_BUS_ADDRESS is \(f.address))"), "\(r.err)")
        #expect(!r.err.contains("DISPLAY") && !r.err.contains("autolaunch"), "\(r.err)")
    }

    @Test("pestod not on the bus pestoctl chose: the other bus is named", .timeLimit(.minutes(2)))
    func serviceOnTheOtherBus() throws {
        let f = try PestodFixture()
        f.pestod.kill()
        let r = try run(Products.path("pestoctl"), ["--session"], environment: ["DBUS_SESSION_BUS_ADDRESS": f.address])
        #expect(r.status == 3)
        #expect(r.err.contains("is not on the session bus") && r.err.contains("pestoctl --system"), "\(r.err)")
    }
}

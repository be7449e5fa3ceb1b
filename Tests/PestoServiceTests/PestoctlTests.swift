// SPDX-License-Identifier: GPL-2.0-or-later

// pestoctl against a real pestod on a private bus: upstream pesto's man page examples,
// rejected updates leaving the table byte-for-byte unchanged, exit statuses, and a client
// killed in the middle of an update.

import Foundation
import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoDBus
@testable import PestoService

@Suite("pestoctl", .serialized, .timeLimit(.minutes(10)))
struct PestoctlTests {
    static let isRoot = getuid() == 0

    /// A table's rules as "proto first-last->target active" strings, in ID order.
    func rules(_ f: PestodFixture, _ kind: TableKind = .host) throws -> [String] {
        let reply = try f.client.call(PestodFixture.dest, PestoBusNames.tablePath(kind), PestodFixture.tableInterface, "List")
        return (reply.first?.arrayValue ?? []).map { item in
            let s = item.structValue!
            var fields: [String: DBusValue] = [:]
            for (k, v) in s[1].vardictValue! { fields[k] = v }
            let first = fields["first-port"]!.uint16Value!
            let last = fields["last-port"]!.uint16Value!
            let range = first == last ? "\(first)" : "\(first)-\(last)"
            let active = s[2].structValue![0].boolValue! ? "active" : "inactive"
            return "\(fields["protocol"]!.stringValue!) \(range) \(active)"
        }
    }

    /// The IDs of the HOST table's rules.
    func ids(_ f: PestodFixture) throws -> [UInt32] {
        (try f.table("List").first?.arrayValue ?? []).map { $0.structValue![0].uint32Value! }
    }

    @Test("pesto -t PORT -U PORT: replaces the HOST and the SPLICE table", .enabled(if: isRoot))
    func replaceBothTables() throws {
        let ns = try TestNamespace()
        let f = try PestodFixture(pestodArguments: ["--netns", ns.path])
        let p = TestSockets.freePorts(4)
        let (a, b, c, d) = (p.lowerBound, p.lowerBound + 1, p.lowerBound + 2, p.lowerBound + 3)
        // Something to replace: a TCP and a UDP rule; as with pesto, -t replaces both.
        var r = try f.pestoctl(["-t", "127.0.0.1/\(c)", "-u", "127.0.0.1/\(d)"])
        #expect(r.status == 0, "\(r.err)")
        #expect(try rules(f) == ["tcp \(c) active", "udp \(d) active"])

        r = try f.pestoctl(["-t", "127.0.0.1/\(a)", "-U", "\(b)"])
        #expect(r.status == 0, "\(r.err)")
        #expect(try rules(f) == ["tcp \(a) active"])
        #expect(try rules(f, .splice) == ["udp \(b) active"])
        #expect(try ids(f) == [30])

        // The listing shows both tables.
        let show = try f.pestoctl([])
        #expect(show.status == 0)
        #expect(show.out.contains("HOST"))
        #expect(show.out.contains("SPLICE"))
        #expect(show.out.contains("-t 127.0.0.1/\(a)"))
        #expect(show.out.contains("-U \(b) "), "\(show.out)")
        let json = try f.pestoctl(["--json"])
        #expect(json.status == 0)
        let parsed = try JSONSerialization.jsonObject(with: Data(json.out.utf8)) as? [String: Any]
        let tables = parsed?["tables"] as? [[String: Any]]
        #expect(tables?.map { $0["name"] as? String } == ["HOST", "SPLICE"])
        #expect((tables?[1]["rules"] as? [[String: Any]])?.first?["first-port"] as? Int == Int(b))
    }

    @Test("pesto -A -t P1 -D -t P2 -U P3: add, delete, and -U needs a SPLICE table")
    func addDelete() throws {
        let f = try PestodFixture()
        let p = TestSockets.freePorts(3)
        let (a, b, c) = (p.lowerBound, p.lowerBound + 1, p.lowerBound + 2)
        var r = try f.pestoctl(["-q", "-t", "127.0.0.1/\(b)"])
        #expect(r.status == 0, "\(r.err)")
        #expect(r.out.isEmpty)
        // No SPLICE table here: -U is refused (exit 1, as pesto) before anything changes.
        let before = try f.table("List")
        r = try f.pestoctl(["-A", "-t", "127.0.0.1/\(a)", "-D", "-t", "127.0.0.1/\(b)", "-U", "\(c)"])
        #expect(r.status == 1)
        #expect(r.err.contains("SPLICE"))
        #expect(try f.table("List") == before)
        // Without the -U, the add and the delete go through.
        r = try f.pestoctl(["-A", "-t", "127.0.0.1/\(a)", "-D", "-t", "127.0.0.1/\(b)"])
        #expect(r.status == 0, "\(r.err)")
        #expect(try rules(f) == ["tcp \(a) active"])
        #expect(f.listeningSockets().count == 1)
    }

    @Test("pesto -A -t P1 -D -t P2 -U P3 with a SPLICE table", .enabled(if: isRoot))
    func addDeleteSplice() throws {
        let ns = try TestNamespace()
        let f = try PestodFixture(pestodArguments: ["--netns", ns.path])
        let p = TestSockets.freePorts(4)
        let (a, b, c, d) = (p.lowerBound, p.lowerBound + 1, p.lowerBound + 2, p.lowerBound + 3)
        var r = try f.pestoctl(["-t", "127.0.0.1/\(b)", "-U", "\(d)"])
        #expect(r.status == 0, "\(r.err)")
        // -D -U c matches nothing: as with pesto, exit 1 and nothing is applied.
        let before = try f.snapshot()
        r = try f.pestoctl(["-A", "-t", "127.0.0.1/\(a)", "-D", "-t", "127.0.0.1/\(b)", "-U", "\(c)"])
        #expect(r.status == 1)
        #expect(r.err.contains("the SPLICE table has no rule -U \(c)"), "\(r.err)")
        #expect(try f.snapshot().rules == before.rules)
        r = try f.pestoctl(["-A", "-t", "127.0.0.1/\(a)", "-D", "-t", "127.0.0.1/\(b)", "-U", "\(d)"])
        #expect(r.status == 0, "\(r.err)")
        #expect(try rules(f) == ["tcp \(a) active"])
        #expect(try rules(f, .splice).isEmpty)
    }

    @Test("pesto -A -t P1 -C HOST -A -t P2 -D -u P3: options apply in order; P3 went with -C, so -D fails")
    func clearInOrder() throws {
        let f = try PestodFixture()
        let p = TestSockets.freePorts(4)
        let (a, b, c, d) = (p.lowerBound, p.lowerBound + 1, p.lowerBound + 2, p.lowerBound + 3)
        var r = try f.pestoctl(["-t", "127.0.0.1/\(d)", "-u", "127.0.0.1/\(c)"])
        #expect(r.status == 0, "\(r.err)")
        let before = try f.table("List")
        r = try f.pestoctl(["-A", "-t", "127.0.0.1/\(a)", "-C", "HOST", "-A", "-t", "127.0.0.1/\(b)", "-D", "-u", "127.0.0.1/\(c)"])
        #expect(r.status == 1)
        #expect(try f.table("List") == before)
        r = try f.pestoctl(["-D", "-u", "127.0.0.1/\(c)", "-A", "-t", "127.0.0.1/\(a)", "-C", "HOST", "-A", "-t", "127.0.0.1/\(b)"])
        #expect(r.status == 0, "\(r.err)")
        #expect(try rules(f) == ["tcp \(b) active"])
    }

    @Test("-C HOST -A -T P: the SPLICE part of the man page example", .enabled(if: isRoot))
    func clearAndSplice() throws {
        let ns = try TestNamespace()
        let f = try PestodFixture(pestodArguments: ["--netns", ns.path])
        let p = TestSockets.freePorts(4)
        let (a, b, c, e) = (p.lowerBound, p.lowerBound + 1, p.lowerBound + 2, p.lowerBound + 3)
        var r = try f.pestoctl(["-u", "127.0.0.1/\(c)", "-t", "127.0.0.1/\(e)"])
        #expect(r.status == 0, "\(r.err)")
        r = try f.pestoctl(["-A", "-t", "127.0.0.1/\(a)", "-C", "HOST", "-A", "-T", "\(e)", "-t", "127.0.0.1/\(b)"])
        #expect(r.status == 0, "\(r.err)")
        #expect(try rules(f) == ["tcp \(b) active"])
        #expect(try rules(f, .splice) == ["tcp \(e) active"])
    }

    @Test("a conflicting update exits 1 and leaves List byte-for-byte as before")
    func conflict() throws {
        let f = try PestodFixture()
        let p = TestSockets.freePorts(3)
        let (a, b, c) = (p.lowerBound, p.lowerBound + 1, p.lowerBound + 2)
        // A rule made by someone else, directly, on the wildcard address.
        try f.table("Insert", [.uint32(5), .vardict([("protocol", .string("udp")), ("first-port", .uint16(c))])])
        try f.table("Activate", [.uint32(5)])
        var r = try f.pestoctl(["-A", "-t", "127.0.0.1/\(a)-\(b)"])
        #expect(r.status == 0, "\(r.err)")
        let before = try f.snapshot()
        // Removing a-b and adding a is fine; adding UDP c on 127.0.0.1 conflicts with the active
        // dual-stack rule 5, after a-b was already deactivated: all of it must be undone.
        r = try f.pestoctl(["-D", "-t", "127.0.0.1/\(a)-\(b)", "-A", "-t", "127.0.0.1/\(a)", "-u", "127.0.0.1/\(c)"])
        #expect(r.status == 1)
        #expect(r.err.contains("rolled back"), "\(r.err)")
        let after = try f.snapshot()
        #expect(after.rules == before.rules)
        // The same addresses listen again; the removed rule was deactivated and re-activated
        // by the rollback (the proposals' order: deactivate before activate), so inodes are new.
        func addresses(_ s: PestodFixture.Snapshot) -> [String] {
            s.sockets.map { String($0.split(separator: " ").prefix(2).joined(separator: " ")) }
        }
        #expect(addresses(after) == addresses(before))
    }

    @Test("a bind failure of an explicit spec is rolled back; best effort tolerates it")
    func bindFailure() throws {
        let f = try PestodFixture()
        let p = TestSockets.freePorts(2)
        // Someone outside pestod holds the second port.
        let holder = try #require(TestSockets.bound(address: .loopbackIPv4, port: p.upperBound))
        defer { close(holder) }
        let before = try f.table("List")
        var r = try f.pestoctl(["-t", "127.0.0.1/\(p.lowerBound)-\(p.upperBound)"])
        #expect(r.status == 1)
        #expect(r.err.contains("EADDRINUSE"), "\(r.err)")
        #expect(try f.table("List") == before)
        // Exclusion-only (best effort) spec over the ephemeral-free space: binds most ports, fine.
        r = try f.pestoctl(["-t", "127.0.0.1/~1-\(p.lowerBound - 1),~\(p.upperBound + 1)-65535"])
        #expect(r.status == 0, "\(r.err)")
        #expect(try rules(f) == ["tcp \(p.lowerBound)-\(p.upperBound) active"])
    }

    @Test("usage errors exit 2, bad specs 1 (as pesto), an unreachable service exits 3")
    func exitStatuses() throws {
        let f = try PestodFixture()
        for args in [["--bogus"], ["-t"], ["status", "1", "2"], ["status", "x"], ["-A"], ["stray", "more"]] {
            let r = try f.pestoctl(args)
            #expect(r.status == 2, "\(args): \(r.status) \(r.err)")
            #expect(!r.err.isEmpty)
        }
        for args in [["-t", "1-0"], ["-t", "70000"], ["-C", "NOWHERE"]] {
            let r = try f.pestoctl(args)
            #expect(r.status == 1, "\(args): \(r.status) \(r.err)")
            #expect(!r.err.isEmpty)
        }
        let dir = try TemporaryDirectory()
        let gone = try run(Products.path("pestoctl"), ["--address", "unix:path=\(dir.url.path)/none", "-t", "1"])
        #expect(gone.status == 3)
        // A bus without pestod on it.
        f.pestod.kill()
        let noService = try f.pestoctl([])
        #expect(noService.status == 3, "\(noService.err)")
    }

    @Test("status ID shows a rule's state; a missing rule exits 1")
    func status() throws {
        let f = try PestodFixture()
        let port = TestSockets.freePorts(1).lowerBound
        var r = try f.pestoctl(["--id", "7", "-t", "127.0.0.1/\(port)"])
        #expect(r.status == 0, "\(r.err)")
        #expect(try ids(f) == [7])
        r = try f.pestoctl(["status", "7"])
        #expect(r.status == 0)
        #expect(r.out.contains("active, 1 bound, 0 failed"), "\(r.out)")
        r = try f.pestoctl(["--json", "status", "7", "--table", "HOST"])
        #expect(r.out.contains("\"bound\": 1"))
        r = try f.pestoctl(["status", "8"])
        #expect(r.status == 1)
        // --id on a taken ID is refused, nothing changes.
        let before = try f.table("List")
        r = try f.pestoctl(["--id", "7", "-A", "-t", "127.0.0.1/\(port &+ 1)"])
        #expect(r.status == 1)
        #expect(try f.table("List") == before)
    }

    @Test("pestoctl killed mid-update (after Insert, under the lock) leaves the table as before")
    func killedMidUpdate() throws {
        let f = try PestodFixture()
        let signals = try SignalCollector(address: f.address)
        let p = TestSockets.freePorts(2)
        var r = try f.pestoctl(["-t", "127.0.0.1/\(p.lowerBound)"])
        #expect(r.status == 0, "\(r.err)")
        let before = try f.snapshot()
        signals.forget()
        let child = try ChildProcess(
            Products.path("pestoctl"), ["--address", f.address, "-t", "127.0.0.1/\(p.upperBound)"],
            environment: ["PESTOCTL_TEST_PAUSE_AFTER": "insert"])
        #expect(child.readLine() == "paused")
        // The insert is there, uncommitted, under pestoctl's lock.
        #expect(try f.table("List").first?.arrayValue?.count == 2)
        child.kill()
        f.waitForLockRelease(signals)
        let after = try f.snapshot()
        #expect(after.rules == before.rules)
        #expect(after.sockets == before.sockets)
        r = try f.pestoctl([])
        #expect(r.status == 0)
    }

    @Test("another client holding the lock: exit 1, nothing changes")
    func lockedElsewhere() throws {
        let f = try PestodFixture()
        let port = TestSockets.freePorts(1).lowerBound
        let other = try DBusConnection(.address(f.address))
        try f.manager("Lock", on: other)
        let before = try f.table("List")
        let r = try f.pestoctl(["-t", "127.0.0.1/\(port)"])
        #expect(r.status == 1)
        #expect(r.err.contains("locked by"), "\(r.err)")
        #expect(try f.table("List") == before)
        // Reading needs no lock; "status" names the holder.
        #expect(try f.pestoctl([]).status == 0)
        let status = try f.pestoctl(["status"])
        #expect(status.status == 0)
        #expect(status.out == "locked by \(other.uniqueName)\n", "\(status.out)")
        #expect(try f.pestoctl(["--json", "status"]).out.contains("\"locked\": true"))
        try f.manager("Unlock", on: other)
        #expect(try f.pestoctl(["status"]).out == "unlocked\n")
        #expect(try f.pestoctl(["-t", "127.0.0.1/\(port)"]).status == 0)
    }

    @Test("re-giving the table keeps its rules undisturbed; none clears the table; -q prints nothing")
    func unchangedAndNone() throws {
        let f = try PestodFixture()
        let p = TestSockets.freePorts(2)
        var r = try f.pestoctl(["-t", "127.0.0.1/\(p.lowerBound)", "-u", "127.0.0.1/\(p.upperBound)"])
        #expect(r.status == 0, "\(r.err)")
        let before = try f.snapshot()
        r = try f.pestoctl(["-t", "127.0.0.1/\(p.lowerBound)", "-u", "127.0.0.1/\(p.upperBound)"])
        #expect(r.status == 0)
        #expect(r.out == "Nothing to change.\n")
        let after = try f.snapshot()
        #expect(after.rules == before.rules)
        #expect(after.sockets == before.sockets)  // same inodes: never closed
        r = try f.pestoctl(["-q", "-u", "none"])
        #expect(r.status == 0)
        #expect(r.out.isEmpty && r.err.isEmpty)
        #expect(try rules(f).isEmpty)
    }

    @Test("watch prints rule and lock changes as they happen")
    func watch() throws {
        let f = try PestodFixture()
        let port = TestSockets.freePorts(1).lowerBound
        let watcher = try ChildProcess(Products.path("pestoctl"), ["--address", f.address, "watch"])
        // Each line starts with its time (PestoctlMessageTests checks the format).
        #expect(watcher.readLine()?.hasSuffix(" watching") == true)
        #expect(try f.pestoctl(["-t", "127.0.0.1/\(port)"]).status == 0)
        var lines: [String] = []
        while let line = watcher.readLine(timeoutMilliseconds: 5000) {
            lines.append(line)
            if line.hasSuffix(" unlocked") { break }
        }
        #expect(lines.contains { $0.contains(" locked by :") }, "\(lines)")
        #expect(lines.contains { $0.hasSuffix(" HOST rule 10 added: -t 127.0.0.1/\(port), owner pestoctl") }, "\(lines)")
        #expect(lines.contains { $0.hasSuffix(" HOST rule 10 (-t 127.0.0.1/\(port)): active, 1 bound, 0 failed") }, "\(lines)")
        #expect(lines.last?.hasSuffix(" unlocked") == true)
        // The service leaving ends the watch.
        f.pestod.kill()
        #expect(watcher.readLine(timeoutMilliseconds: 5000) == nil)
        #expect(watcher.waitUntilExit() == 0)
    }
}

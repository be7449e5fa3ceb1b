// SPDX-License-Identifier: GPL-2.0-or-later

// Persistent state: committed tables survive kill -9; uncommitted ones do not; a bad file
// is reported and moved aside.

import Foundation
import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoDBus
@testable import PestoService

@Suite("pestod state file", .serialized, .timeLimit(.minutes(10)))
struct StateFileTests {
    @Test("render and parse round-trip; every malformed line is refused with its number")
    func format() throws {
        let entries = [
            StateFile.Entry(
                table: .host, id: 5, active: true,
                rule: Rule(
                    proto: .tcp, address: IPAddress("127.0.0.1"), interface: "eth0", firstPort: 80, lastPort: 90,
                    targetAddress: IPAddress("10.0.0.1"), targetPort: 8080, owner: "ctr 1/ü%=")),
            StateFile.Entry(table: .splice, id: 4_000_000_000, active: false, rule: Rule(proto: .udp, firstPort: 53, scan: true)),
            StateFile.Entry(table: .host, id: 6, active: true, rule: Rule(proto: .tcp, firstPort: 443, proxyProtocol: .v2)),
            StateFile.Entry(table: .host, id: 7, active: true, rule: Rule(proto: .tcp, firstPort: 444, source: .client)),
        ]
        let text = StateFile.render(entries)
        #expect(text.contains(" proxy-protocol=v2 source=pestod\n"))
        #expect(text.contains(" proxy-protocol= source=client\n"))
        #expect(try StateFile.parse(text) == entries)
        // A file written before proxy-protocol and source existed lacks them: its rules load
        // without them.
        let older = text.replacing(" proxy-protocol=v2", with: "").replacing(" proxy-protocol=", with: "")
            .replacing(" source=pestod", with: "").replacing(" source=client", with: "")
        #expect(!older.contains("proxy-protocol") && !older.contains("source="))
        #expect(try StateFile.parse(older).map(\.rule.proxyProtocol) == [.none, .none, .none, .none])
        #expect(try StateFile.parse(older).map(\.rule.source) == [.pestod, .pestod, .pestod, .pestod])
        // Any other missing field is still an error.
        #expect(throws: PestoError.self) { try StateFile.parse(older.replacing(" owner=", with: " ")) }
        for (bad, line) in [
            ("nope\n", 1), (StateFile.header + "\nrule host x active\n", 2),
            (text.replacing("protocol=tcp", with: "protocol=sctp"), 2),
            (text.replacing("owner=", with: "owner=%G"), 2),
            (text + "rule elsewhere 1 active\n", 6),
        ] {
            #expect(throws: PestoError.self) { try StateFile.parse(bad) }
            do { _ = try StateFile.parse(bad) } catch { #expect(error.message.hasPrefix("line \(line):"), "\(error.message)") }
        }
    }

    @Test("committed rules survive kill -9 and come back active; uncommitted ones do not")
    func survivesKill() throws {
        let f = try PestodFixture(pestodArguments: ["--state", "STATE"])
        let ports = TestSockets.freePorts(3)
        try f.table("Insert", [.uint32(1), PestodFixture.rule(ports.lowerBound, [("owner", .string("ctr 1"))])])
        try f.table("Activate", [.uint32(1)])
        try f.table("Insert", [.uint32(2), PestodFixture.rule(ports.lowerBound + 1)])
        let committed = try f.table("List")
        try f.manager("Lock")
        try f.table("Insert", [.uint32(3), PestodFixture.rule(ports.lowerBound + 2)])  // never committed
        let saved = try StateStore.read(f.statePath).live
        #expect(saved.map(\.id) == [1, 2] && saved[0].active && saved[0].rule.owner == "ctr 1" && !saved[1].active)

        f.pestod.kill()  // SIGKILL
        try f.startPestod(["--state", "STATE"])
        #expect(try f.table("List") == committed)
        #expect(f.listeningSockets().count == 1)
        #expect(f.log.contains("restored 2 of 2 rules"))
    }

    @Test("an unusable state file is reported, moved aside, and pestod starts empty")
    func corruptFile() throws {
        let dir = try TemporaryDirectory()
        let path = dir.url.appendingPathComponent("state").path
        try "pestod-state 1\nrule host 1 active protocol=tcp\n".write(toFile: path, atomically: true, encoding: .utf8)
        let f = try PestodFixture(pestodArguments: ["--state", path])
        #expect(try f.table("List").first?.arrayValue?.isEmpty == true)
        #expect(f.log.contains("is unusable (line 2:"))
        let aside = try FileManager.default.contentsOfDirectory(atPath: dir.url.path).filter { $0.hasPrefix("state.bad-") }
        #expect(aside.count == 1)
        // And the next commit is saved in the new store.
        try f.table("Insert", [.uint32(7), PestodFixture.rule(TestSockets.freePorts(1).lowerBound)])
        #expect(try StateStore.read(path).live.map(\.id) == [7])
    }
}

/// The state directory on a small tmpfs of its own that the test fills up, so that the
/// store's next write fails (ENOSPC, SQLITE_FULL) as on a full disk; undone by `umount`.
/// (A read-only remount is refused while the store has its files open for writing.)
struct FullFileSystem {
    let path: String

    /// Whether this machine lets the tests mount a tmpfs (root, a mount namespace that allows it).
    static let available: Bool = {
        guard getuid() == 0, let dir = try? TemporaryDirectory() else { return false }
        let p = dir.url.path
        defer { withExtendedLifetime(dir) {} }
        guard (try? run("/usr/bin/mount", ["-t", "tmpfs", "-o", "size=1m", "tmpfs", p]))?.status == 0 else { return false }
        _ = try? run("/usr/bin/umount", [p])
        return true
    }()

    /// Mounts a 4 MiB tmpfs on `path` (still with room).
    init(_ path: String) throws {
        self.path = path
        guard try run("/usr/bin/mount", ["-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", path]).status == 0 else {
            throw HarnessError("cannot mount a tmpfs on \(path)")
        }
    }

    var filler: String { path + "/filler" }

    /// Takes every free block (`true`) or gives them back.
    func set(full: Bool) throws {
        guard full else {
            unlink(filler)
            return
        }
        let fd = open(filler, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        guard fd >= 0 else { throw HarnessError("cannot create \(filler)") }
        defer { close(fd) }
        let block = [UInt8](repeating: 0, count: 4096)
        while write(fd, block, block.count) > 0 {}
        while write(fd, block, 1) > 0 {}
    }

    func unmount() { _ = try? run("/usr/bin/umount", [path]) }
}

@Suite("pestod state file: saving before acknowledging, restoring without loss", .serialized, .timeLimit(.minutes(10)))
struct StateFileHardeningTests {
    static let saveFailed = PestoBusNames.errorPrefix + "SaveFailed"

    /// The LockOwner property.
    static func lockOwner(_ f: PestodFixture) throws -> String? {
        let v = try f.client.call(
            PestodFixture.dest, PestodFixture.managerPath, "org.freedesktop.DBus.Properties", "Get",
            [.string(PestodFixture.managerInterface), .string("LockOwner")])
        return v.first?.variantValue?.stringValue
    }

    /// The IDs of `table` in the state store at `path`.
    static func savedIDs(_ path: String, _ table: TableKind = .host) throws -> [UInt32] {
        try StateStore.read(path).live.filter { $0.table == table }.map(\.id)
    }

    @Test("a batch saves once and answers everyone; an unsaved batch is undone newest first and everyone gets SaveFailed")
    func commitBatch() throws {
        let store = ScriptedStore()
        var performed: [TableOperation] = []
        let batch = CommitBatch(store: store, perform: { op in performed.append(op) })
        let rule = Rule(proto: .tcp, firstPort: 80)
        var first = Journal()
        first.record(.insert(.host, 1, rule))
        first.record(.activate(.host, 1))
        var second = Journal()
        second.record(.delete(.host, 2, rule))
        var outcomes: [String] = []
        func note(_ who: String) -> (PestoError?) -> Void { { outcomes.append("\(who) \($0?.code.name ?? "saved")") } }

        batch.flush()  // nothing waiting: no save
        #expect(store.recorded.isEmpty && batch.saves == 0)
        batch.add(first, completion: note("a"))
        batch.add(second, completion: note("b"))
        batch.submit()
        #expect(outcomes.isEmpty, "nobody is answered before the save")
        #expect(
            store.recorded == [[.insert(.host, 1, rule), .setActive(.host, 1, true), .delete(.host, 2)]], "one batch, the changes only")
        // A change committed while the batch is being saved waits for the next one.
        batch.add(second, completion: note("c"))
        batch.submit()
        #expect(store.recorded.count == 1, "one batch with the store at a time")
        store.finishRecording()
        #expect(outcomes == ["a saved", "b saved"] && store.recorded.count == 2, "the next batch goes once the first is saved")
        store.finishRecording()
        #expect(outcomes == ["a saved", "b saved", "c saved"] && performed.isEmpty && batch.isEmpty)

        // A failed batch: it and the changes committed after it are undone, newest first.
        store.fails = true
        outcomes = []
        batch.add(first, completion: note("a"))
        batch.submit()
        batch.add(second, completion: note("b"))
        store.finishRecording()
        #expect(outcomes == ["a SaveFailed", "b SaveFailed"])
        #expect(performed == [.insert(.host, 2, rule), .deactivate(.host, 1), .delete(.host, 1, rule)], "newest first")
        #expect(batch.isEmpty && store.recorded.count == 3, "the later change was never handed to the store")

        // flush() waits for the store.
        store.fails = false
        outcomes = []
        batch.add(first, completion: note("a"))
        batch.flush()
        #expect(outcomes == ["a saved"] && batch.isEmpty)
    }

    @Test(
        "a change that cannot be saved is undone and answered SaveFailed (D-Bus and control socket); once writable it is saved and survives kill -9",
        .enabled(if: FullFileSystem.available, "needs root and a mount namespace that allows a tmpfs mount"))
    func unwritableDirectory() throws {
        let dir = try TemporaryDirectory()
        let path = dir.url.appendingPathComponent("state").path
        let mount = try FullFileSystem(dir.url.path)
        defer {
            mount.unmount()
            withExtendedLifetime(dir) {}
        }
        let f = try PestodFixture(pestodArguments: ["--state", path, "--control", "CONTROL"])
        let ports = TestSockets.freePorts(3)
        let p = ports.lowerBound
        try f.table("Insert", [.uint32(1), PestodFixture.rule(p)])
        let before = try f.table("List")
        let file = try StateStore.read(path).live

        try mount.set(full: true)
        #expect(
            f.errorName { () throws(DBusErrorReply) in try f.table("Insert", [.uint32(2), PestodFixture.rule(p + 1)]) } == Self.saveFailed)
        #expect(f.errorName { () throws(DBusErrorReply) in try f.table("Activate", [.uint32(1)]) } == Self.saveFailed)
        #expect(f.errorName { () throws(DBusErrorReply) in try f.table("Delete", [.uint32(1)]) } == Self.saveFailed)
        #expect(try f.table("List") == before, "every unsaved change was undone")
        #expect(f.listeningSockets().isEmpty, "the unsaved activation closed its sockets again")

        // An upload on the control socket: applied, not saved, undone, logged.
        let client = try #require(WireClient(path: f.controlPath))
        _ = try #require(client.readHelloAndDump())
        client.send([1] + WireClient.be32(1) + WireClient.rule(first: p + 2) + [0])
        shutdown(client.fd, Int32(SHUT_WR))
        var byte: UInt8 = 0
        #expect(recv(client.fd, &byte, 1, 0) == 0, "pestod ends the session once the save failed")
        close(client.fd)
        #expect(f.log.contains("control socket: update (0 kept, 1 added, 0 removed) undone"))
        #expect(try f.table("List") == before)
        #expect(try StateStore.read(path).live == file)

        try mount.set(full: false)
        try f.table("Insert", [.uint32(2), PestodFixture.rule(p + 1)])
        let committed = try f.table("List")
        f.pestod.kill()
        try f.startPestod(["--state", path])
        #expect(try f.table("List") == committed)
        #expect(f.log.contains("restored 2 of 2 rules"))
    }

    @Test(
        "a Commit that cannot be saved answers SaveFailed, undoes the transaction and keeps the lock with an empty journal",
        .enabled(if: FullFileSystem.available, "needs root and a mount namespace that allows a tmpfs mount"))
    func unsavedCommit() throws {
        let dir = try TemporaryDirectory()
        let path = dir.url.appendingPathComponent("state").path
        let mount = try FullFileSystem(dir.url.path)
        defer {
            mount.unmount()
            withExtendedLifetime(dir) {}
        }
        let f = try PestodFixture(pestodArguments: ["--state", path])
        let p = TestSockets.freePorts(3).lowerBound
        try f.table("Insert", [.uint32(1), PestodFixture.rule(p)])
        try f.table("Activate", [.uint32(1)])
        let before = try f.table("List")

        try f.manager("Lock")
        try f.table("Deactivate", [.uint32(1)])
        try f.table("Delete", [.uint32(1)])
        try f.table("Insert", [.uint32(2), PestodFixture.rule(p + 1)])
        try f.table("Activate", [.uint32(2)])
        try mount.set(full: true)
        #expect(f.errorName { () throws(DBusErrorReply) in try f.manager("Commit") } == Self.saveFailed)
        #expect(try f.table("List") == before, "the whole transaction was undone")
        #expect(try Self.lockOwner(f) == f.client.uniqueName, "the lock stays held")
        try f.manager("Rollback")  // the journal is empty: nothing to undo
        #expect(try f.table("List") == before)
        #expect(try Self.savedIDs(path) == [1])

        // The holder redoes its work and commits once the state can be written.
        try mount.set(full: false)
        try f.table("Insert", [.uint32(3), PestodFixture.rule(p + 2)])
        try f.manager("Commit")
        try f.manager("Unlock")
        #expect(try Self.savedIDs(path) == [1, 3])
    }

    @Test("a symlink planted at the store's temporary path is not followed", .timeLimit(.minutes(2)))
    func plantedSymlink() throws {
        let dir = try TemporaryDirectory()
        let path = dir.url.appendingPathComponent("state").path
        let target = dir.url.appendingPathComponent("precious").path
        try "precious\n".write(toFile: target, atomically: false, encoding: .utf8)
        #expect(symlink(target, path + ".new") == 0)
        let f = try PestodFixture(pestodArguments: ["--state", path])
        try f.table("Insert", [.uint32(4), PestodFixture.rule(TestSockets.freePorts(1).lowerBound)])
        #expect(try String(contentsOfFile: target, encoding: .utf8) == "precious\n", "the link's target is untouched")
        var st = stat()
        #expect(lstat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFREG, "the store is a file, not the link")
        #expect(try Self.savedIDs(path) == [4])
        #expect(access(path + ".new", F_OK) != 0, "nothing is left at the temporary path")
    }

    @Test("unusable state files moved aside never replace an earlier one")
    func uniqueBadNames() throws {
        let dir = try TemporaryDirectory()
        let path = dir.url.appendingPathComponent("state").path
        // Earlier copies under every name a timestamp could give during this test.
        let now = time(nil)
        for t in (now - 1)...(now + 60) { try "earlier \(t)\n".write(toFile: "\(path).bad-\(t)", atomically: false, encoding: .utf8) }
        try "first bad file\n".write(toFile: path, atomically: false, encoding: .utf8)
        let f = try PestodFixture(pestodArguments: ["--state", path])
        try "second bad file\n".write(toFile: path, atomically: false, encoding: .utf8)
        f.pestod.kill()
        try f.startPestod(["--state", path])

        var contents: [String] = []
        // A store moved aside takes its WAL along (state.bad-T-wal): those are not counted.
        for name in try FileManager.default.contentsOfDirectory(atPath: dir.url.path)
        where name.hasPrefix("state.bad-") && !name.hasSuffix("-wal") {
            contents.append(try String(contentsOfFile: dir.url.appendingPathComponent(name).path, encoding: .utf8))
        }
        #expect(contents.count == 62 + 2)
        for t in (now - 1)...(now + 60) { #expect(contents.contains("earlier \(t)\n")) }
        #expect(contents.contains("first bad file\n") && contents.contains("second bad file\n"))
        #expect(try StateStore.read(path).live.isEmpty, "a new, empty store took their place")
    }

    @Test("rules that cannot be restored (no SPLICE table, too many, conflicting) stay in the file and come back later; counts are right")
    func carriedRules() throws {
        let dir = try TemporaryDirectory()
        let path = dir.url.appendingPathComponent("state").path
        let p = TestSockets.freePorts(3).lowerBound
        func rule(_ port: UInt16) -> Rule { Rule(proto: .tcp, address: IPAddress("127.0.0.1"), firstPort: port) }
        let saved = [
            StateFile.Entry(table: .host, id: 1, active: true, rule: rule(p)),
            StateFile.Entry(table: .host, id: 2, active: true, rule: rule(p)),  // conflicts with 1
            StateFile.Entry(table: .host, id: 3, active: true, rule: rule(p + 1)),  // over --max-rules 2
            StateFile.Entry(table: .splice, id: 4, active: true, rule: rule(p + 2)),  // no SPLICE table without --netns
        ]
        try StateFile.render(saved).write(toFile: path, atomically: false, encoding: .utf8)

        let f = try PestodFixture(pestodArguments: ["--state", path, "--max-rules", "2"])
        #expect(f.log.contains("restored 1 of 4 rules"), "\(f.log)")
        #expect(f.log.contains("3 rules could not be restored (first: "))
        #expect(f.log.components(separatedBy: "not restored").count == 4, "one debug line per rule")
        #expect(f.log.components(separatedBy: "could not be restored").count == 2, "one summary warning")
        var stored = try StateStore.read(path)
        #expect(stored.live == [saved[0]], "the old file was migrated")
        #expect(stored.carried.sorted { $0.id < $1.id } == Array(saved[1...]), "three rules carried")
        let rows = try #require(try f.table("List").first?.arrayValue)
        #expect(rows.count == 1, "only rule 1 is in the table")

        try f.table("Insert", [.uint32(9), PestodFixture.rule(p + 1)])  // a save
        stored = try StateStore.read(path)
        #expect(stored.live.map(\.id) == [1, 9])
        #expect(stored.carried.sorted { $0.id < $1.id } == Array(saved[1...]), "carried unchanged")

        // Without the limit, rule 3 is restored too; 2 (conflict) and 4 (no SPLICE table) are carried again.
        try f.table("Delete", [.uint32(9)])
        f.pestod.kill()
        try f.startPestod(["--state", path])
        #expect(f.log.contains("restored 2 of 4 rules"), "\(f.log)")
        #expect(try f.table("List").first?.arrayValue?.count == 2)
        stored = try StateStore.read(path)
        #expect(stored.live.map(\.id) == [1, 3] && stored.carried.sorted { $0.id < $1.id } == [saved[1], saved[3]])
        withExtendedLifetime(dir) {}
    }

    @Test("a second pestod that cannot own the bus name leaves the state file untouched")
    func secondInstance() throws {
        let f = try PestodFixture(pestodArguments: ["--state", "STATE"])
        try f.table("Insert", [.uint32(1), PestodFixture.rule(TestSockets.freePorts(1).lowerBound)])
        let bytes = try Data(contentsOf: URL(fileURLWithPath: f.statePath))
        let wal = try Data(contentsOf: URL(fileURLWithPath: f.statePath + "-wal"))
        var before = stat()
        stat(f.statePath, &before)

        let second = try run(Products.path("pestod"), ["--address", f.address, "--state", f.statePath])
        #expect(second.status != 0)
        #expect(second.err.contains("cannot own"), "\(second.err)")
        var after = stat()
        stat(f.statePath, &after)
        #expect(try Data(contentsOf: URL(fileURLWithPath: f.statePath)) == bytes)
        #expect(try Data(contentsOf: URL(fileURLWithPath: f.statePath + "-wal")) == wal)
        #expect(
            after.st_ino == before.st_ino && after.st_mtim.tv_sec == before.st_mtim.tv_sec
                && after.st_mtim.tv_nsec == before.st_mtim.tv_nsec)
    }
}

/// A `TableStore` that keeps what it is given and answers when told (`finishRecording`).
final class ScriptedStore: TableStore {
    /// Every batch recorded, in order.
    var recorded: [[StoredChange]] = []
    /// Whether the batches answered from now on fail.
    var fails = false
    private var waiting: [(PestoError?) -> Void] = []

    func record(_ batch: StoreBatch, completion: @escaping (PestoError?) -> Void) {
        recorded.append(Array(batch))
        waiting.append(completion)
    }

    func finishRecording() {
        let answering = waiting
        waiting = []
        for completion in answering {
            completion(fails ? PestoError(.system, "Cannot write the store.", underlyingError: Errno(rawValue: ENOSPC)) : nil)
        }
    }
}

// SPDX-License-Identifier: GPL-2.0-or-later

// The state store (StateStore.swift): kill -9 at random instants during commits loses no
// acknowledged change; the old text state file is migrated; a symlink or a file pestod
// cannot trust at the state path is refused; a one-rule save costs the same at any size.

import Foundation
import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoDBus
@testable import PestoService

@Suite("pestod state store", .serialized, .timeLimit(.minutes(10)))
struct StateStoreTests {
    /// The rule IDs of the HOST table, from List.
    static func listedIDs(_ f: PestodFixture) throws -> Set<UInt32> {
        let rows = try #require(try f.table("List").first?.arrayValue)
        return Set(rows.compactMap { $0.structValue?.first?.uint32Value })
    }

    /// Whether the file at `path` is an SQLite database (its 16-byte header).
    static func isSQLite(_ path: String) -> Bool {
        guard let data = FileManager.default.contents(atPath: path) else { return false }
        return data.prefix(16) == Data("SQLite format 3\0".utf8)
    }

    @Test("kill -9 at 200 random instants during commits loses no acknowledged change", .timeLimit(.minutes(10)))
    func killDuringCommits() throws {
        let f = try PestodFixture(pestodArguments: ["--state", "STATE"])
        let port = TestSockets.freePorts(1).lowerBound
        var present = Set<UInt32>()  // acknowledged inserts not deleted since
        var uncertain = Set<UInt32>()  // the change in flight when pestod died: either outcome is right
        var nextID: UInt32 = 1
        var deletes = 0
        var killedInFlight = 0
        var generator = SystemRandomNumberGenerator()
        for round in 0..<200 {
            if round > 0 { try f.startPestod(["--state", "STATE"]) }
            let listed = try Self.listedIDs(f)
            let lost = present.subtracting(uncertain).subtracting(listed)
            #expect(lost.isEmpty, "round \(round): acknowledged rules lost: \(lost.sorted())")
            #expect(listed.subtracting(present).isSubset(of: uncertain), "round \(round): rules that were never committed")
            #expect(!f.log.contains("unusable"), "round \(round): the store could not be opened")
            present = listed  // the uncertain change is settled by what came back
            uncertain = []
            // A killer thread picks an instant within the next few milliseconds of commits.
            let pid = f.pestod.pid
            let delay = UInt32.random(in: 0..<25_000, using: &generator)
            let killed = DispatchSemaphore(value: 0)
            Thread.detachNewThread {
                usleep(delay)
                kill(pid, SIGKILL)
                killed.signal()
            }
            while true {
                // Inserts, and a delete of the oldest rule once there are 20.
                let deleting = present.count >= 20 ? present.min() : nil
                let id = deleting ?? nextID
                if deleting == nil { nextID += 1 }
                uncertain = [id]
                do throws(DBusErrorReply) {
                    if let deleting {
                        try f.table("Delete", [.uint32(deleting)])
                        present.remove(deleting)
                        deletes += 1
                    } else {
                        try f.table("Insert", [.uint32(id), PestodFixture.rule(port)])
                        present.insert(id)
                    }
                    uncertain = []
                } catch {
                    if error.name == "org.freedesktop.DBus.Error.NoReply" { killedInFlight += 1 }
                    break  // pestod died under this call (or before it)
                }
            }
            killed.wait()
            f.pestod.kill()  // reaps it
        }
        try f.startPestod(["--state", "STATE"])
        let listed = try Self.listedIDs(f)
        #expect(present.subtracting(uncertain).isSubset(of: listed) && listed.subtracting(present).isSubset(of: uncertain))
        // Most kills land while a commit is in flight (its caller gets NoReply): the instants
        // are during commits, not between them.
        #expect(killedInFlight >= 50, "\(nextID - 1) inserts, \(deletes) deletes; \(killedInFlight) kills hit a call in flight")
    }

    @Test("the old text state file is migrated on first start and kept at PATH.v1", .timeLimit(.minutes(2)))
    func migration() throws {
        let dir = try TemporaryDirectory()
        let path = dir.url.appendingPathComponent("state").path
        let ports = TestSockets.freePorts(2)
        // A file of the first version: no proxy-protocol nor source field; text that needs escaping.
        let entries = [
            StateFile.Entry(
                table: .host, id: 3, active: true,
                rule: Rule(proto: .tcp, address: IPAddress("127.0.0.1"), firstPort: ports.lowerBound, owner: "ctr 1")),
            StateFile.Entry(table: .host, id: 9, active: false, rule: Rule(proto: .udp, firstPort: ports.lowerBound + 1)),
        ]
        let text = StateFile.render(entries).replacing(" proxy-protocol=", with: "").replacing(" source=pestod", with: "")
        #expect(text.contains("owner=ctr%201\n") && !text.contains("source="))
        try text.write(toFile: path, atomically: false, encoding: .utf8)
        let f = try PestodFixture(pestodArguments: ["--state", path])
        #expect(f.log.contains("migrated the state file \(path) (2 rules)"), "\(f.log)")
        #expect(f.log.contains("restored 2 of 2 rules"))
        #expect(Self.isSQLite(path), "the store took the state file's place")
        #expect(try String(contentsOfFile: path + ".v1", encoding: .utf8) == text, "the old file is kept")
        #expect(try Self.listedIDs(f) == [3, 9])
        #expect(f.listeningSockets().count == 1, "rule 3 is active again")
        let committed = try f.table("List")

        // The next start reads the store, not the old file.
        try f.table("Delete", [.uint32(9)])
        f.pestod.kill()
        try f.startPestod(["--state", path])
        #expect(f.log.contains("restored 1 of 1 rule") && !f.log.contains("migrated"), "\(f.log)")
        #expect(try Self.listedIDs(f) == [3])
        #expect(try f.table("List").first?.arrayValue?.first == committed.first?.arrayValue?.first)
        withExtendedLifetime(dir) {}
    }

    @Test("a symlink, or a file others may write, at the state path is refused with its path; nothing is replaced", .timeLimit(.minutes(2)))
    func untrustedPath() throws {
        let f = try PestodFixture()
        f.pestod.kill()  // only the bus is wanted; the pestods below start and refuse
        let path = f.directory.url.appendingPathComponent("state").path
        let target = f.directory.url.appendingPathComponent("elsewhere").path
        try "pestod-state 1\n".write(toFile: target, atomically: false, encoding: .utf8)
        #expect(symlink(target, path) == 0)
        var refused = try run(Products.path("pestod"), ["--address", f.address, "--authorize", "none", "--state", path])
        #expect(refused.status != 0)
        #expect(refused.err.contains("The state store path \(path) is a symbolic link"), "\(refused.err)")
        var st = stat()
        #expect(lstat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFLNK, "the link is left as it is")
        #expect(try String(contentsOfFile: target, encoding: .utf8) == "pestod-state 1\n", "its target is untouched")

        // A companion file planted as a symlink is refused too.
        unlink(path)
        #expect(symlink(target, path + "-wal") == 0)
        refused = try run(Products.path("pestod"), ["--address", f.address, "--authorize", "none", "--state", path])
        #expect(refused.status != 0 && refused.err.contains("\(path)-wal is a symbolic link"), "\(refused.err)")
        unlink(path + "-wal")

        // A file other users may write.
        try "pestod-state 1\n".write(toFile: path, atomically: false, encoding: .utf8)
        chmod(path, 0o666)
        refused = try run(Products.path("pestod"), ["--address", f.address, "--authorize", "none", "--state", path])
        #expect(refused.status != 0 && refused.err.contains("\(path) may be written by other users"), "\(refused.err)")
    }

    @Test("saving one change writes a few pages, the same with 20,000 rules saved as with 10")
    func saveCostsTheChange() throws {
        let dir = try TemporaryDirectory()
        let path = dir.url.appendingPathComponent("state").path
        let rule = Rule(proto: .tcp, address: IPAddress("127.0.0.1"), firstPort: 80, owner: "bench")
        /// The WAL bytes one insert, one activation and one delete of a rule add to a store of `size` rules.
        func walGrowth(rules size: Int) throws -> Int {
            let (store, _) = try StateStore.open(path: path)
            try store.settle(
                live: (0..<size).map { StateFile.Entry(table: .host, id: UInt32($0), active: false, rule: rule) }, carried: [], force: true)
            store.close()
            // The last connection's close checkpointed and removed the WAL: it starts empty.
            #expect(access(path + "-wal", F_OK) != 0)
            let database = try StoreDatabase(path: path)
            try database.apply([.insert(.host, UInt32(size) + 7, rule)])
            try database.apply([.setActive(.host, UInt32(size) + 7, true)])
            try database.apply([.delete(.host, 3)])
            let after = try #require(try FileManager.default.attributesOfItem(atPath: path + "-wal")[.size] as? Int)
            #expect(try StoreDatabase(path: path).load().live.count == size)
            return after
        }
        let small = try walGrowth(rules: 10)
        unlink(path)
        unlink(path + "-wal")
        unlink(path + "-shm")
        let large = try walGrowth(rules: 20_000)
        // Three commits of a few 4 KiB pages each: bounded by the B-tree's depth, not the rule count
        // (the text file rewrote 20,000 lines, about 3.5 MB, for each).
        #expect(large <= 3 * 6 * 4_200, "\(large) bytes of WAL for three one-rule commits")
        #expect(large <= small * 3, "small table \(small) bytes, large \(large)")
    }
}

// Persistent state: committed tables survive kill -9; uncommitted ones do not; a bad file
// is reported and moved aside.

import Foundation
import PestoEngine
import PestoTestSupport
import Testing

@testable import PestoService

@Suite("pestod state file", .serialized)
struct StateFileTests {
    @Test("render and parse round-trip; every malformed line is refused with its number")
    func format() throws {
        let entries = [
            StateFile.Entry(table: .host, id: 5, active: true, rule: Rule(
                proto: .tcp, address: IPAddress("127.0.0.1"), interface: "eth0", firstPort: 80, lastPort: 90,
                targetAddress: IPAddress("10.0.0.1"), targetPort: 8080, owner: "ctr 1/ü%=")),
            StateFile.Entry(table: .splice, id: 4_000_000_000, active: false, rule: Rule(proto: .udp, firstPort: 53, scan: true)),
        ]
        let text = StateFile.render(entries)
        #expect(try StateFile.parse(text) == entries)
        for (bad, line) in [
            ("nope\n", 1), (StateFile.header + "\nrule host x active\n", 2),
            (text.replacing("protocol=tcp", with: "protocol=sctp"), 2),
            (text.replacing("owner=", with: "owner=%G"), 2),
            (text + "rule elsewhere 1 active\n", 4),
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
        let saved = try String(contentsOfFile: f.statePath, encoding: .utf8)
        #expect(saved.contains("rule host 1 active") && saved.contains("owner=ctr%201") && !saved.contains("rule host 3"))

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
        // And the next commit writes a good file again.
        try f.table("Insert", [.uint32(7), PestodFixture.rule(TestSockets.freePorts(1).lowerBound)])
        #expect(try StateFile.parse(String(contentsOfFile: path, encoding: .utf8)).map(\.id) == [7])
    }
}

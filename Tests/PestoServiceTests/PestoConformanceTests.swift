// SPDX-License-Identifier: GPL-2.0-or-later

// pestoctl as a drop-in for upstream pesto: one test per row (or group of rows) of the options
// table in doc/pesto-conformance.md, against a real pestod on a private bus, including the
// command sequences podman and rootlesskit run. A last test checks that the table's keys and
// the keys these tests cover are the same set, so a new row needs a test.

import Foundation
import PestoDBus
import PestoEngine
import PestoModel
import PestoTestSupport
import Testing

@testable import PestoService

@Suite("pestoctl conformance with upstream pesto", .serialized, .timeLimit(.minutes(10)))
struct PestoConformanceTests {
    static let isRoot = getuid() == 0

    /// The options table's keys each test below covers.
    static let covered: Set<String> = [
        "show", "path", "help", "version", "replace", "replace-splice", "splice-lo", "no-splice", "add", "delete",
        "delete-missing", "clear", "clear-unknown", "long-forms", "bundled", "order", "none", "none-add", "show-flag",
        "debug", "bad-spec", "unknown-option", "bind-failure", "best-effort", "podman", "rootlesskit",
    ]

    /// A control socket path as podman and rootlesskit pass it; pestoctl does not use it.
    static let socketPath = "/run/user/1000/containers/networks/rootless-netns/rootless-netns-pesto.sock"

    /// A table's rules as "proto [address]%interface:ports => target:port", in ID order.
    func rules(_ f: PestodFixture, _ kind: TableKind = .host) throws -> [String] {
        let reply = try f.client.call(PestodFixture.dest, PestoBusNames.tablePath(kind), PestodFixture.tableInterface, "List")
        return (reply.first?.arrayValue ?? []).map { item in
            var fields: [String: DBusValue] = [:]
            for (k, v) in item.structValue![1].vardictValue! { fields[k] = v }
            let first = fields["first-port"]!.uint16Value!
            let last = fields["last-port"]!.uint16Value!
            let address = fields["address"]?.stringValue.flatMap { $0.isEmpty ? nil : $0 } ?? "*"
            let interface = fields["interface"]?.stringValue.flatMap { $0.isEmpty ? nil : "%" + $0 } ?? ""
            let target = fields["target-address"]?.stringValue.flatMap { $0.isEmpty ? nil : $0 + ":" } ?? ""
            let ports = first == last ? "\(first)" : "\(first)-\(last)"
            return
                "\(fields["protocol"]!.stringValue!) [\(address)]\(interface):\(ports) => \(target)\(fields["target-port"]!.uint16Value!)"
        }
    }

    @Test("show, path, help, version: no update shows the tables; PATH is accepted; -h and --version exit 0")
    func showPathHelpVersion() throws {
        let f = try PestodFixture()
        var r = try f.pestoctl([])
        #expect(r.status == 0, "\(r.err)")
        #expect(r.out.contains("HOST"))
        r = try f.pestoctl([Self.socketPath])
        #expect(r.status == 0, "\(r.err)")
        #expect(r.out.contains("HOST"))
        for help in ["-h", "--help"] {
            r = try f.pestoctl([help])
            #expect(r.status == 0)
            #expect(r.out.contains("--tcp-ports") && r.out.contains("Examples:"))
        }
        r = try run(Products.path("pestoctl"), ["--version"])
        #expect(r.status == 0)
        #expect(r.out.hasPrefix("pestoctl "))
    }

    @Test("replace: -t without -A/-D replaces the whole HOST table, UDP rules included")
    func replaceWholeTable() throws {
        let f = try PestodFixture()
        let p = TestSockets.freePorts(3)
        var r = try f.pestoctl(["-t", "127.0.0.1/\(p.lowerBound)", "-u", "127.0.0.1/\(p.lowerBound + 1)"])
        #expect(r.status == 0, "\(r.err)")
        r = try f.pestoctl(["-t", "127.0.0.1/\(p.upperBound)"])
        #expect(r.status == 0, "\(r.err)")
        // Before the fix the UDP rule survived: only TCP rules were replaced.
        #expect(try rules(f) == ["tcp [127.0.0.1]:\(p.upperBound) => \(p.upperBound)"])
        #expect(f.listeningSockets().count == 1)
    }

    @Test(
        "replace-splice, splice-lo: -T/-U replace the SPLICE table and listen on the namespace's lo",
        .enabled(if: isRoot))
    func spliceReplaceAndLoopback() throws {
        let ns = try TestNamespace()
        let f = try PestodFixture(pestodArguments: ["--netns", ns.path])
        let p = TestSockets.freePorts(2)
        var r = try f.pestoctl(["-T", "\(p.lowerBound)", "-A", "-U", "\(p.lowerBound)"])
        #expect(r.status == 0, "\(r.err)")
        #expect(
            try rules(f, .splice) == ["tcp [*]%lo:\(p.lowerBound) => \(p.lowerBound)", "udp [*]%lo:\(p.lowerBound) => \(p.lowerBound)"])
        // -D -T finds the %lo rule, as it finds one made by pesto.
        r = try f.pestoctl(["-D", "-T", "\(p.lowerBound)"])
        #expect(r.status == 0, "\(r.err)")
        // A new -U without -A/-D replaces the whole SPLICE table.
        r = try f.pestoctl(["-U", "\(p.upperBound):\(p.lowerBound)"])
        #expect(r.status == 0, "\(r.err)")
        #expect(try rules(f, .splice) == ["udp [*]%lo:\(p.upperBound) => \(p.lowerBound)"])
        // A listening address is refused for -T, as pesto refuses it.
        r = try f.pestoctl(["-A", "-T", "127.0.0.1/\(p.lowerBound)"])
        #expect(r.status == 1)
    }

    @Test("no-splice: -T, -U and -C SPLICE without a SPLICE table exit 1")
    func noSplice() throws {
        let f = try PestodFixture()
        let before = try f.table("List")
        for args in [["-T", "8080"], ["-A", "-U", "53"], ["-C", "SPLICE"]] {
            let r = try f.pestoctl(args)
            #expect(r.status == 1, "\(args): \(r.err)")
            #expect(r.err.contains("SPLICE"))
        }
        #expect(try f.table("List") == before)
    }

    @Test("add, delete, delete-missing: -D of a rule that does not exist exits 1 and applies nothing")
    func addDeleteMissing() throws {
        let f = try PestodFixture()
        let p = TestSockets.freePorts(3)
        let (a, b, c) = (p.lowerBound, p.lowerBound + 1, p.upperBound)
        var r = try f.pestoctl(["-A", "-t", "127.0.0.1/\(a)", "--add", "-t", "127.0.0.1/\(b)"])
        #expect(r.status == 0, "\(r.err)")
        r = try f.pestoctl(["-D", "-t", "127.0.0.1/\(a)"])
        #expect(r.status == 0, "\(r.err)")
        #expect(try rules(f) == ["tcp [127.0.0.1]:\(b) => \(b)"])
        let before = try f.snapshot()
        // Before the fix: a warning, exit 0, and the add was applied.
        r = try f.pestoctl(["-A", "-t", "127.0.0.1/\(c)", "--delete", "-t", "127.0.0.1/\(a)"])
        #expect(r.status == 1)
        #expect(r.err.contains("no rule -t 127.0.0.1/\(a)"), "\(r.err)")
        let after = try f.snapshot()
        #expect(after.rules == before.rules)
        #expect(after.sockets == before.sockets)
        // A range is not a rule inside it: -D -t b-c does not delete the rule for b.
        r = try f.pestoctl(["-D", "-t", "127.0.0.1/\(b)-\(c)"])
        #expect(r.status == 1)
        #expect(r.err.contains("overlaps it"), "\(r.err)")
    }

    @Test("clear, clear-unknown: -C HOST and --clear=HOST empty the table; another name exits 1")
    func clear() throws {
        let f = try PestodFixture()
        let p = TestSockets.freePorts(1)
        for clear in [["-C", "HOST"], ["--clear=HOST"], ["--clear", "host"]] {
            #expect(try f.pestoctl(["-t", "127.0.0.1/\(p.lowerBound)"]).status == 0)
            let r = try f.pestoctl(clear)
            #expect(r.status == 0, "\(clear): \(r.err)")
            #expect(try rules(f).isEmpty)
        }
        let r = try f.pestoctl(["-C", "NOWHERE"])
        #expect(r.status == 1)
    }

    @Test("long-forms, bundled: --tcp-ports=, --udp-ports SPEC, -At and -tSPEC mean -t and -u")
    func longFormsAndBundles() throws {
        let f = try PestodFixture()
        let p = TestSockets.freePorts(4)
        var r = try f.pestoctl(["--tcp-ports=127.0.0.1/\(p.lowerBound)", "--udp-ports", "127.0.0.1/\(p.lowerBound + 1)"])
        #expect(r.status == 0, "\(r.err)")
        r = try f.pestoctl(["-At", "127.0.0.1/\(p.lowerBound + 2)", "-u127.0.0.1/\(p.upperBound)"])
        #expect(r.status == 0, "\(r.err)")
        #expect(
            try rules(f).sorted() == [
                "tcp [127.0.0.1]:\(p.lowerBound) => \(p.lowerBound)", "tcp [127.0.0.1]:\(p.lowerBound + 2) => \(p.lowerBound + 2)",
                "udp [127.0.0.1]:\(p.lowerBound + 1) => \(p.lowerBound + 1)", "udp [127.0.0.1]:\(p.upperBound) => \(p.upperBound)",
            ])
        r = try f.pestoctl(["--delete", "--tcp-ports=127.0.0.1/\(p.lowerBound)", "--udp-ports=127.0.0.1/\(p.lowerBound + 1)"])
        #expect(r.status == 0, "\(r.err)")
        #expect(try rules(f).count == 2)
    }

    @Test("order: -A -t a -C HOST -A -t b -D -u c applies in order, as one transaction")
    func order() throws {
        let f = try PestodFixture()
        let p = TestSockets.freePorts(3)
        let (a, b, c) = (p.lowerBound, p.lowerBound + 1, p.upperBound)
        var r = try f.pestoctl(["-u", "127.0.0.1/\(c)"])
        #expect(r.status == 0, "\(r.err)")
        r = try f.pestoctl([
            "-A", "-t", "127.0.0.1/\(a)", "-C", "HOST", "-A", "-t", "127.0.0.1/\(b)", "-u", "127.0.0.1/\(c)",
            "-D", "-u", "127.0.0.1/\(c)",
        ])
        #expect(r.status == 0, "\(r.err)")
        #expect(try rules(f) == ["tcp [127.0.0.1]:\(b) => \(b)"])
    }

    @Test("none, none-add: -t none clears the table; after TCP rules on the line, or with -A, it exits 1")
    func none() throws {
        let f = try PestodFixture()
        let p = TestSockets.freePorts(2)
        var r = try f.pestoctl(["-t", "127.0.0.1/\(p.lowerBound)", "-u", "127.0.0.1/\(p.upperBound)"])
        #expect(r.status == 0, "\(r.err)")
        let before = try f.table("List")
        for args in [["-t", "127.0.0.1/\(p.lowerBound)", "-t", "none"], ["-A", "-t", "none"]] {
            r = try f.pestoctl(args)
            #expect(r.status == 1, "\(args)")
            #expect(r.err.contains("none conflicts"), "\(r.err)")
        }
        #expect(try f.table("List") == before)
        // -A -u none with UDP rules present fails too; -t none replaces the table: empty.
        #expect(try f.pestoctl(["-A", "-u", "none"]).status == 1)
        r = try f.pestoctl(["-t", "none"])
        #expect(r.status == 0, "\(r.err)")
        #expect(try rules(f).isEmpty)
    }

    @Test("show-flag, debug: -s shows the tables before and after; -d reports the steps on stderr")
    func showAndDebug() throws {
        let f = try PestodFixture()
        let p = TestSockets.freePorts(1)
        var r = try f.pestoctl(["-s", "-d", "-A", "-t", "127.0.0.1/\(p.lowerBound)"])
        #expect(r.status == 0, "\(r.err)")
        let before = try #require(r.out.range(of: "Previous configuration"))
        let after = try #require(r.out.range(of: "Updated configuration"))
        #expect(before.upperBound < after.lowerBound)
        #expect(!r.out[..<after.lowerBound].contains("127.0.0.1/\(p.lowerBound)"))
        #expect(r.out[after.upperBound...].contains("-t 127.0.0.1/\(p.lowerBound)"))
        #expect(r.err.contains("debug: add HOST rule: -t 127.0.0.1/\(p.lowerBound)"), "\(r.err)")
        r = try f.pestoctl(["--show", "--debug", "-D", "-t", "127.0.0.1/\(p.lowerBound)"])
        #expect(r.status == 0, "\(r.err)")
        #expect(r.err.contains("debug: remove HOST rule"))
    }

    @Test("bad-spec, unknown-option: a spec pesto refuses exits 1 (even with no service); an unknown option 2")
    func badSpecAndUnknownOption() throws {
        let f = try PestodFixture()
        let before = try f.table("List")
        for spec in ["35022-35024:35032", "22:10.0.0.1/22", "70000", "1-0", "22,22", ""] {
            let r = try f.pestoctl(["-t", spec])
            #expect(r.status == 1, "\(spec): \(r.status) \(r.err)")
            #expect(r.err.contains("invalid port spec"), "\(r.err)")
        }
        #expect(try f.table("List") == before)
        let dir = try TemporaryDirectory()
        let r = try run(Products.path("pestoctl"), ["--address", "unix:path=\(dir.url.path)/none", "-t", "35022-35024:35032"])
        #expect(r.status == 1)
        for args in [["--bogus"], ["-x"], ["-t"], ["--add=1"], ["a", "b"]] {
            let u = try f.pestoctl(args)
            #expect(u.status == 2, "\(args): \(u.status) \(u.err)")
        }
    }

    @Test("bind-failure, best-effort: an unbindable explicit port exits 1 and rolls back; --best-effort keeps it")
    func bindFailureAndBestEffort() throws {
        let f = try PestodFixture()
        let p = TestSockets.freePorts(2)
        let holder = try #require(TestSockets.bound(address: .loopbackIPv4, port: p.upperBound))
        defer { close(holder) }
        var r = try f.pestoctl(["-t", "127.0.0.1/\(p.lowerBound)"])
        #expect(r.status == 0, "\(r.err)")
        let before = try f.table("List")
        r = try f.pestoctl(["-A", "-t", "127.0.0.1/\(p.upperBound)"])
        #expect(r.status == 1)
        #expect(r.err.contains("EADDRINUSE"), "\(r.err)")
        #expect(try f.table("List") == before)
        r = try f.pestoctl(["--best-effort", "-A", "-t", "127.0.0.1/\(p.upperBound)"])
        #expect(r.status == 0, "\(r.err)")
        #expect(r.err.contains("could not be bound"), "\(r.err)")
        #expect(try rules(f).count == 2)
    }

    @Test("podman: --add -t HOSTIP/HPORT:CIP/CPORT -t [::1]/HPORT:CIP6/CPORT PATH, then --delete the same")
    func podmanSequence() throws {
        let f = try PestodFixture()
        let p = TestSockets.freePorts(2)
        let specs = [
            "-t", "127.0.0.1/\(p.lowerBound):10.88.0.2/80", "-t", "[::1]/\(p.lowerBound):fd00::2/80",
            "-t", "127.0.0.1/\(p.upperBound):10.88.0.2/443",
        ]
        var r = try f.pestoctl(["--add"] + specs + [Self.socketPath])
        #expect(r.status == 0, "\(r.err)")
        #expect(
            try rules(f) == [
                "tcp [127.0.0.1]:\(p.lowerBound) => 10.88.0.2:80", "tcp [::1]:\(p.lowerBound) => fd00::2:80",
                "tcp [127.0.0.1]:\(p.upperBound) => 10.88.0.2:443",
            ])
        #expect(f.listeningSockets().count == 3)
        r = try f.pestoctl(["--delete"] + specs + [Self.socketPath])
        #expect(r.status == 0, "\(r.err)")
        #expect(try rules(f).isEmpty)
        // Deleting again: the container is gone, the rule too: non-zero, nothing changes.
        r = try f.pestoctl(["--delete"] + specs + [Self.socketPath])
        #expect(r.status == 1)
    }

    @Test("the specs pestoctl lists parse back to the same rules: -D with them empties the table")
    func listedSpecsRoundTrip() throws {
        let f = try PestodFixture()
        let p = TestSockets.freePorts(3)
        var r = try f.pestoctl([
            "-A", "-t", "0.0.0.0/\(p.lowerBound):10.88.0.2/80", "-t", "[::]/\(p.lowerBound):fd00::2/80",
            "-u", "127.0.0.1/\(p.lowerBound + 1)-\(p.upperBound):10.88.0.2/53-54",
        ])
        #expect(r.status == 0, "\(r.err)")
        r = try f.pestoctl(["--json"])
        let listed = try JSONSerialization.jsonObject(with: Data(r.out.utf8)) as? [String: Any]
        let host = (listed?["tables"] as? [[String: Any]])?.first { $0["name"] as? String == "HOST" }
        let specs = ((host?["rules"] as? [[String: Any]]) ?? []).compactMap { $0["spec"] as? String }
        // Before the fix the wildcard was left out ("-t 8080:10.88.0.2/80"), which pesto refuses.
        #expect(
            specs == [
                "-t 0.0.0.0/\(p.lowerBound):10.88.0.2/80", "-t [::]/\(p.lowerBound):[fd00::2]/80",
                "-u 127.0.0.1/\(p.lowerBound + 1)-\(p.upperBound):10.88.0.2/53-54",
            ])
        r = try f.pestoctl(["-D"] + specs.flatMap { $0.split(separator: " ", maxSplits: 1).map(String.init) })
        #expect(r.status == 0, "\(r.err)")
        #expect(try rules(f).isEmpty)
    }

    @Test("rootlesskit: --version; -A --tcp-ports=IP/PORT:CHILDPORT PATH; -D the same; --udp-ports=")
    func rootlesskitSequence() throws {
        let f = try PestodFixture()
        let p = TestSockets.freePorts(2)
        var r = try f.pestoctl(["--version"])
        #expect(r.status == 0)
        for (option, port) in [("--tcp-ports", p.lowerBound), ("--udp-ports", p.upperBound)] {
            let arg = "\(option)=127.0.0.1/\(port):80"
            r = try f.pestoctl(["-A", arg, Self.socketPath])
            #expect(r.status == 0, "\(r.err)")
            #expect(try rules(f) == ["\(option == "--tcp-ports" ? "tcp" : "udp") [127.0.0.1]:\(port) => 80"])
            r = try f.pestoctl(["-D", arg, Self.socketPath])
            #expect(r.status == 0, "\(r.err)")
            #expect(try rules(f).isEmpty)
        }
    }

    @Test("every key of the options table in doc/pesto-conformance.md has a test, and no test names a missing key")
    func everyRowTested() throws {
        var parts = #filePath.split(separator: "/", omittingEmptySubsequences: false)
        parts.removeLast(3)
        let doc = try String(contentsOfFile: parts.joined(separator: "/") + "/doc/pesto-conformance.md", encoding: .utf8)
        var keys: Set<String> = []
        var inOptions = false
        for line in doc.split(separator: "\n") {
            if line.hasPrefix("## ") { inOptions = line == "## Options" }
            guard inOptions, line.hasPrefix("| `") else { continue }
            let cell = line.dropFirst(3)
            if let end = cell.firstIndex(of: "`") { keys.insert(String(cell[..<end])) }
        }
        #expect(keys.count >= 20)
        #expect(keys == Self.covered, "only in the doc: \(keys.subtracting(Self.covered)); only here: \(Self.covered.subtracting(keys))")
    }
}

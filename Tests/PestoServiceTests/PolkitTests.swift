// SPDX-License-Identifier: GPL-2.0-or-later

// polkit authorisation: the CheckAuthorization call PolkitAuthorizer makes, and pestod
// (--authorize polkit) against a real polkitd on a private system-type bus
// (doc/platform-notes.md, "polkit").
//
// The end-to-end test needs root (it starts polkitd, which must start as root and drops to
// user polkitd; it writes /usr/share/polkit-1/actions and /etc/polkit-1/rules.d, which
// polkitd cannot be pointed elsewhere for; it adds users) and /usr/lib/polkit-1/polkitd.
// Everything it adds is removed at the end, and polkitd and the bus are killed (SIGKILL).

import Foundation
import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoDBus
@testable import PestoService

@Suite("polkit authorisation", .serialized, .timeLimit(.minutes(10)))
struct PolkitTests {
    static let polkitd = "/usr/lib/polkit-1/polkitd"
    static let canRunPolkit = getuid() == 0 && FileManager.default.isExecutableFile(atPath: polkitd)

    // MARK: The call and the reply, without a bus

    @Test(
        "CheckAuthorization is (sa{sv})sa{ss}us with subject system-bus-name, flags from interactive and a cancellation id; CancelCheckAuthorization names it"
    )
    func request() {
        let quiet = PolkitAuthorizer.checkAuthorization(sender: ":1.42", action: PestoActions.modify, interactive: false)
        #expect(quiet.destination == "org.freedesktop.PolicyKit1")
        #expect(quiet.path == "/org/freedesktop/PolicyKit1/Authority")
        #expect(quiet.interface == "org.freedesktop.PolicyKit1.Authority")
        #expect(quiet.member == "CheckAuthorization")
        #expect(quiet.signature == "(sa{sv})sa{ss}us")
        let args = quiet.arguments ?? []
        #expect(args.first == .structure([.string("system-bus-name"), .vardict([("name", .string(":1.42"))])]))
        #expect(args.dropFirst().first == .string("top.passt.Pesto1.modify"))
        #expect(args.dropFirst(3).first == .uint32(0))
        #expect(args.last == .string(""))
        let loud = PolkitAuthorizer.checkAuthorization(sender: ":1.42", action: PestoActions.modify, interactive: true)
        #expect(loud.arguments?.dropFirst(3).first == .uint32(1))
        // A cancellable check names itself; CancelCheckAuthorization withdraws it, wanting no reply.
        let named = PolkitAuthorizer.checkAuthorization(
            sender: ":1.42", action: PestoActions.modify, interactive: true, cancellationID: "pestod-7")
        #expect(named.arguments?.last == .string("pestod-7"))
        let cancel = PolkitAuthorizer.cancelCheckAuthorization("pestod-7")
        #expect(cancel.destination == "org.freedesktop.PolicyKit1" && cancel.member == "CancelCheckAuthorization")
        #expect(cancel.signature == "s" && cancel.arguments == [.string("pestod-7")] && cancel.noReply)
    }

    @Test("a (bba{ss}) reply is read as authorized, challenge, denied or dismissed; an error means polkit is unavailable")
    func replies() {
        func answer(_ authorized: Bool, _ challenge: Bool, _ details: [(String, String)] = []) -> PolkitAuthorizer.Verdict {
            let d = DBusValue.dictionary(key: "s", value: "s", details.map { .init(.string($0.0), .string($0.1)) })
            return PolkitAuthorizer.verdict(error: nil, arguments: [.structure([.bool(authorized), .bool(challenge), d])])
        }
        #expect(answer(true, false) == .authorized)
        #expect(answer(false, true) == .challenge)
        #expect(answer(false, false) == .denied(dismissed: false))
        #expect(answer(false, false, [("polkit.dismissed", "true")]) == .denied(dismissed: true))
        let missing = DBusErrorReply("org.freedesktop.DBus.Error.ServiceUnknown", "The name is not activatable")
        #expect(
            PolkitAuthorizer.verdict(error: missing, arguments: [])
                == .unavailable("org.freedesktop.DBus.Error.ServiceUnknown: The name is not activatable"))
        guard case .unavailable = PolkitAuthorizer.verdict(error: nil, arguments: [.bool(true)]) else {
            Issue.record("a reply of the wrong type must count as no answer")
            return
        }
    }

    // MARK: pestod and a real polkitd

    @Test(
        "with polkit: root may change; an unprivileged user is refused every change and Lock and may read; a user the rules grant may change; without polkit only root",
        .enabled(if: canRunPolkit, "needs root and /usr/lib/polkit-1/polkitd (apt install polkitd)"))
    func realPolkit() throws {
        let tag = String(UUID().uuidString.lowercased().prefix(6))
        let installed = try PolkitInstallation(tag: tag)
        let f = try PolkitBusFixture()
        try f.startPestod()

        let alice = try installed.uid(installed.plainUser)
        let p = TestSockets.freePorts(3).lowerBound

        // Root is always authorised by polkit.
        try f.table("Insert", [.uint32(1), PestodFixture.rule(p)])
        try f.table("Activate", [.uint32(1)])
        let before = try f.snapshot()

        // The user the rules.d file grants (group member): retry while polkitd (re)loads the
        // action and the rule, which it does by itself within about a second.
        let bob = try f.peer(as: installed.grantedUser)
        var answer = ""
        let deadline = MonotonicInstant.now.adding(milliseconds: 15_000)
        repeat {
            answer = bob.ask("Insert 2 \(p + 1)")
            if answer.hasPrefix("ok") { break }
            usleep(100_000)
        } while MonotonicInstant.now < deadline
        #expect(answer.hasPrefix("ok"), "granted user: \(answer)\n\(f.polkitLog)")
        #expect(bob.ask("Activate 2").hasPrefix("ok"))
        #expect(bob.ask("Deactivate 2").hasPrefix("ok"))
        #expect(bob.ask("Delete 2").hasPrefix("ok"))
        #expect(try f.snapshot() == before)

        // An unprivileged user: the call does not allow interaction, and the action is
        // auth_admin_keep, so polkit answers with a challenge.
        let peer = try f.peer(as: installed.plainUser)
        for line in ["Insert 3 \(p + 2)", "Activate 1", "Deactivate 1", "Delete 1", "Lock"] {
            let answer = peer.ask(line)
            #expect(
                answer.hasPrefix(
                    "error \(PolkitAuthorizer.interactiveAuthorizationRequired): Authentication is required to top.passt.Pesto1.modify"),
                "\(line): \(answer)")
        }
        #expect(peer.ask("Unlock").hasPrefix("error \(PestoBusNames.errorPrefix)NotLocked"))
        // Allowing interactive authorisation (there is no authentication agent here): still refused.
        // (polkitd 122 without logind answers this with a challenge as well.)
        let interactive = try f.busctl(
            as: installed.plainUser,
            [
                "--allow-interactive-authorization=yes", "call", PestodFixture.dest, PestodFixture.hostPath, PestodFixture.tableInterface,
                "Delete", "u", "1",
            ])
        #expect(interactive.status != 0)
        #expect(
            interactive.err.contains("Authentication is required to top.passt.Pesto1.modify")
                || interactive.err.contains("Not authorized to top.passt.Pesto1.modify: polkit refused it"), "\(interactive.err)")
        // Reads are open to everyone.
        let status = try f.busctl(
            as: installed.plainUser, ["call", PestodFixture.dest, PestodFixture.hostPath, PestodFixture.tableInterface, "Status", "u", "1"])
        #expect(status.out == "buusu true 1 0 \"\" 1\n", "\(status.err)")
        #expect(try f.snapshot() == before)

        // Without polkit: only uid 0 ("a missing polkit means denied, except for uid 0").
        f.polkit.kill()
        let orphan = peer.ask("Insert 3 \(p + 2)")
        #expect(
            orphan.hasPrefix(
                "error \(DBusErrorReply.accessDenied): Not authorized to top.passt.Pesto1.modify: uid \(alice) is not root, and polkit did not answer"
            ),
            "\(orphan)")
        #expect(bob.ask("Insert 3 \(p + 2)").hasPrefix("error \(DBusErrorReply.accessDenied)"))
        #expect(try f.snapshot() == before)
        try f.table("Deactivate", [.uint32(1)])
        try f.table("Delete", [.uint32(1)])
        #expect(try f.table("List").first?.arrayValue?.count == 0)
    }
}

/// The polkit action file, a rules.d file granting a group, and two users (one in that
/// group); all removed (or put back) when the value goes away.
final class PolkitInstallation {
    static let actionPath = "/usr/share/polkit-1/actions/top.passt.Pesto1.policy"
    let rulesPath: String
    let group: String
    let plainUser: String
    let grantedUser: String
    /// The action file that was there before, put back at the end.
    private let previousAction: Data?
    private var users: [String] = []
    private var groupAdded = false

    init(tag: String) throws {
        group = "pktest-\(tag)"
        plainUser = "pktest-a-\(tag)"
        grantedUser = "pktest-b-\(tag)"
        rulesPath = "/etc/polkit-1/rules.d/50-pesto-test-\(tag).rules"
        previousAction = FileManager.default.contents(atPath: Self.actionPath)
        let policy = try Data(contentsOf: Products.repository.appendingPathComponent("polkit/top.passt.Pesto1.policy"))
        guard FileManager.default.createFile(atPath: Self.actionPath, contents: policy, attributes: [.posixPermissions: 0o644]) else {
            throw HarnessError("cannot write \(Self.actionPath)")
        }
        let rule = """
            polkit.addRule(function(action, subject) {
                if (action.id == "\(PestoActions.modify)" && subject.isInGroup("\(group)")) return polkit.Result.YES;
            });

            """
        guard FileManager.default.createFile(atPath: rulesPath, contents: Data(rule.utf8), attributes: [.posixPermissions: 0o644]) else {
            throw HarnessError("cannot write \(rulesPath)")
        }
        try Self.must("/usr/sbin/groupadd", [group])
        groupAdded = true
        try Self.must("/usr/sbin/useradd", ["-M", plainUser])
        users.append(plainUser)
        try Self.must("/usr/sbin/useradd", ["-M", "-G", group, grantedUser])
        users.append(grantedUser)
    }

    deinit {
        for user in users { _ = try? run("/usr/sbin/userdel", [user]) }
        if groupAdded { _ = try? run("/usr/sbin/groupdel", [group]) }
        unlink(rulesPath)
        if let previousAction {
            _ = FileManager.default.createFile(atPath: Self.actionPath, contents: previousAction, attributes: [.posixPermissions: 0o644])
        } else {
            unlink(Self.actionPath)
        }
    }

    /// The uid of `user`.
    func uid(_ user: String) throws -> UInt32 {
        guard let pw = getpwnam(user) else { throw HarnessError("no user \(user)") }
        return pw.pointee.pw_uid
    }

    private static func must(_ tool: String, _ args: [String]) throws {
        let r = try run(tool, args)
        if r.status != 0 { throw HarnessError("\(tool) \(args.joined(separator: " ")): \(r.err)") }
    }
}

/// A private system-type bus (Debian's service policies from /usr/share/dbus-1/system.d
/// plus pesto's dbus/top.passt.Pesto1.conf), a real polkitd on it, and pestod
/// --authorize polkit. Killed (SIGKILL) when the value goes away.
final class PolkitBusFixture {
    let directory: TemporaryDirectory
    let bus: PrivateBus
    let polkit: ChildProcess
    let address: String
    let client: DBusConnection
    private(set) var pestod: ChildProcess!

    var logFile: URL { directory.url.appendingPathComponent("pestod.log") }
    var polkitLogFile: URL { directory.url.appendingPathComponent("polkitd.log") }
    var log: String { (try? String(contentsOf: logFile, encoding: .utf8)) ?? "" }
    var polkitLog: String { (try? String(contentsOf: polkitLogFile, encoding: .utf8)) ?? "" }

    init() throws {
        directory = try TemporaryDirectory()
        let policies = directory.url.appendingPathComponent("system.d")
        try FileManager.default.createDirectory(at: policies, withIntermediateDirectories: true)
        try FileManager.default.copyItem(
            at: Products.repository.appendingPathComponent("dbus/top.passt.Pesto1.conf"),
            to: policies.appendingPathComponent("top.passt.Pesto1.conf"))
        let socket = directory.url.appendingPathComponent("system_bus_socket").path
        let config = directory.url.appendingPathComponent("system.conf")
        // The system bus's policy (the same file the demo uses), with our policy directory.
        let template = try String(
            contentsOf: Products.repository.appendingPathComponent("dbus/private-system-bus.conf.in"), encoding: .utf8)
        try template.replacing("@SOCKET@", with: socket).replacing("@INCLUDEDIR@", with: policies.path)
            .write(to: config, atomically: true, encoding: .utf8)
        bus = try PrivateBus(configFile: config.path)
        address = bus.address
        client = try DBusConnection(.address(address))

        // polkitd starts as root and drops to user polkitd itself.
        polkit = try ChildProcess(
            PolkitTests.polkitd, [], environment: ["DBUS_SYSTEM_BUS_ADDRESS": address],
            stderr: .file(directory.file("polkitd.log")))
        let deadline = MonotonicInstant.now.adding(milliseconds: 20_000)
        while !(try client.call(
            "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "NameHasOwner",
            [.string("org.freedesktop.PolicyKit1")]
        ).first?.boolValue ?? false) {
            guard MonotonicInstant.now < deadline, polkit.isRunning else {
                throw HarnessError("polkitd did not take its name: \(polkitLog)")
            }
            usleep(50_000)
        }
    }

    /// Starts pestod --authorize polkit and waits for its READY=1.
    func startPestod() throws {
        pestod = try ChildProcess.startReady(
            Products.path("pestod"), ["--address", address, "--log-level", "debug", "--authorize", "polkit"],
            notifyPath: directory.file("notify"), stderr: .file(logFile.path), logPath: logFile.path)
    }

    deinit {
        pestod?.kill()
        polkit.kill()
        bus.stop()
    }

    /// The setpriv prefix that runs a command as `user` (uid, gid and groups from the user database).
    static func setpriv(_ user: String) throws -> [String] {
        guard let pw = getpwnam(user) else { throw HarnessError("no user \(user)") }
        return ["--reuid=\(pw.pointee.pw_uid)", "--regid=\(pw.pointee.pw_gid)", "--init-groups"]
    }

    /// pesto-test-peer running as `user`, connected.
    func peer(as user: String) throws -> ChildProcess {
        let peer = try ChildProcess("/usr/bin/setpriv", try Self.setpriv(user) + [Products.path("pesto-test-peer"), address])
        let ready = peer.readLine() ?? ""
        guard ready.hasPrefix("ready") else { throw HarnessError("pesto-test-peer as \(user): \(ready)") }
        return peer
    }

    /// busctl against this bus as `user`.
    func busctl(as user: String, _ args: [String]) throws -> (status: Int32, out: String, err: String) {
        try run("/usr/bin/setpriv", try Self.setpriv(user) + ["/usr/bin/busctl", "--address=\(address)"] + args)
    }

    @discardableResult
    func table(_ member: String, _ args: [DBusValue] = []) throws(DBusErrorReply) -> [DBusValue] {
        try client.call(PestodFixture.dest, PestodFixture.hostPath, PestodFixture.tableInterface, member, args)
    }

    /// `List`, `GetManagedObjects` and pestod's listening sockets.
    func snapshot() throws -> PestodFixture.Snapshot {
        PestodFixture.Snapshot(
            rules: try table("List"),
            objects: try client.call(
                PestodFixture.dest, PestodFixture.managerPath, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects"),
            sockets: listeningSocketsOf(pid: pestod.pid))
    }
}

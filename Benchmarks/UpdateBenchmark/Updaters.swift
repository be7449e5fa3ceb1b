// SPDX-License-Identifier: GPL-2.0-or-later

// The ways of changing a forwarding table that the update benchmark compares. Each makes the
// same change, adding one TCP rule (127.0.0.1:PORT forwarded to TARGET) or removing it again:
//
//   dbus     one private D-Bus connection kept open: Insert + Activate, Deactivate + Delete
//            (what a service client does);
//   wire     upstream pesto's session on a control socket, in process (PestoTestSupport's
//            WireClient: hello, dump, edited upload, as WireClient.pesto but with longer
//            waits), waiting until the server closes the session, which pestod and pasta
//            both do once the new table is in force;
//   command  a program started per change (pestoctl, upstream pesto), waited for; with a
//            settle path, a read-only session on that control socket follows, which the
//            server answers only once it has applied the previous one (upstream pesto exits
//            as soon as it has sent its upload).

import PestoDBus
import PestoModel
import PestoTestSupport

#if canImport(Glibc)
    import Glibc
#endif

/// One way of making the benchmark's change: add the extra rule, or remove it.
struct Updater {
    /// Adds the rule; throws when the change was refused or not confirmed.
    let add: () throws -> Void
    /// Removes the rule again.
    let remove: () throws -> Void

    /// Over D-Bus, one connection for all changes: Insert + Activate (which must bind the one
    /// socket), Deactivate + Delete.
    static func dbus(address: String, port: UInt16, target: UInt16) throws -> Updater {
        let client = try DBusConnection(.address(address))
        let bus = PestoBusNames.busName
        let table = PestoBusNames.tablePath(.host)
        let interface = PestoInterfaces.table.name
        let id: UInt32 = 90_000
        let rule = DBusValue.vardict([
            ("protocol", .string("tcp")), ("address", .string("127.0.0.1")), ("first-port", .uint16(port)),
            ("target-port", .uint16(target)),
        ])
        return Updater(
            add: {
                _ = try client.call(bus, table, interface, "Insert", [.uint32(id), rule])
                let counts = try client.call(bus, table, interface, "Activate", [.uint32(id)], timeoutMilliseconds: 60_000)
                guard counts.first?.uint32Value == 1 else { throw HarnessError("Activate answered \(counts)") }
            },
            remove: {
                _ = try client.call(bus, table, interface, "Deactivate", [.uint32(id)], timeoutMilliseconds: 60_000)
                _ = try client.call(bus, table, interface, "Delete", [.uint32(id)])
            })
    }

    /// Upstream pesto's session on the control socket at `path`, in process, waiting (at most
    /// `waitSeconds`) for the server to close it after the upload.
    static func wire(path: String, port: UInt16, target: UInt16, waitSeconds: Int) -> Updater {
        let rule = WireClient.specRule(listen: "127.0.0.1", port: port, targetPort: target)
        func session(delete: Bool) throws {
            let client = try connect(path, waitSeconds: waitSeconds)
            defer { close(client.fd) }
            guard let dump = client.readHelloAndDump(), var host = dump.tables[1] else {
                throw HarnessError("no hello and dump on \(path)")
            }
            if delete {
                guard let i = host.rules.firstIndex(of: rule) else { throw HarnessError("the rule to remove is not in the table") }
                host.rules.remove(at: i)
            } else {
                guard !host.rules.contains(where: { WireClient.conflicts($0, rule) }) else {
                    throw HarnessError("the rule to add conflicts")
                }
                host.rules.append(rule)
            }
            var upload: [UInt8] = []
            for pif in dump.tables.keys.sorted() {
                let rules = pif == 1 ? host.rules : dump.tables[pif]!.rules
                upload += [pif] + WireClient.be32(UInt32(rules.count)) + rules.flatMap { $0 }
            }
            client.send(upload + [0])
            shutdown(client.fd, Int32(SHUT_WR))
            var byte: UInt8 = 0
            guard recv(client.fd, &byte, 1, 0) == 0 else { throw HarnessError("the server did not close the session") }
        }
        return Updater(add: { try session(delete: false) }, remove: { try session(delete: true) })
    }

    /// A WireClient on `path` whose reads wait up to `waitSeconds` (WireClient's own 5 s is
    /// too short for pasta, which serves the next client only after reopening every listener).
    static func connect(_ path: String, waitSeconds: Int) throws -> WireClient {
        guard let client = WireClient(path: path) else { throw HarnessError("cannot connect to \(path)") }
        var tv = timeval(tv_sec: waitSeconds, tv_usec: 0)
        setsockopt(client.fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        return client
    }

    /// A program per change: `add` or `remove` (program and arguments), which must exit 0;
    /// then, with `settle`, a read-only session on that control socket.
    static func command(add: [String], remove: [String], settle: String?) -> Updater {
        func runOne(_ command: [String]) throws {
            let pid = try ChildProcess.spawn(command[0], Array(command.dropFirst()), stdout: .devNull, stderr: .inherit)
            let code = ChildProcess.waitExit(pid)
            guard code == 0 else { throw HarnessError("\(command.joined(separator: " ")) exited with status \(code)") }
            if let settle {
                let client = try connect(settle, waitSeconds: 60)
                defer { close(client.fd) }
                guard client.readHelloAndDump() != nil else { throw HarnessError("no hello and dump on \(settle)") }
            }
        }
        return Updater(add: { try runOne(add) }, remove: { try runOne(remove) })
    }
}

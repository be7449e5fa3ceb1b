// SPDX-License-Identifier: GPL-2.0-or-later

// pesto-test-peer: a D-Bus client driven line by line on stdin, for tests that must kill a
// client process (SIGKILL) in the middle of a transaction.
//
// Usage: pesto-test-peer ADDRESS. Each input line is one call on the HOST table or Manager:
//   Lock | Unlock | Commit | Rollback
//   Insert ID PORT [ADDRESS] | Delete ID | Activate ID | Deactivate ID | Status ID
//   Apply COUNT FIRST-ID (COUNT rules, IDs and ports from FIRST-ID on)
// and gets one output line: "ok" (with the reply's values) or "error NAME: MESSAGE".
// "Send CALL" sends a call without waiting ("sent SERIAL"); "Replies MS" prints the replies
// that arrive within MS milliseconds ("reply SERIAL ok" or "reply SERIAL error NAME"), then "done".
// It prints "ready NAME" (its unique bus name) once connected.

import PestoDBus

#if canImport(Glibc)
    import Glibc
#endif

/// Writes one line to stdout, unbuffered (the test reads it while we wait for more input).
func say(_ text: String) {
    var bytes = Array((text + "\n").utf8)
    _ = write(1, &bytes, bytes.count)
}

guard CommandLine.arguments.count == 2 else {
    say("usage: pesto-test-peer ADDRESS")
    exit(2)
}
let connection: DBusConnection
do {
    connection = try DBusConnection(.address(CommandLine.arguments[1]))
} catch {
    say("error \(error)")
    exit(1)
}
say("ready \(connection.uniqueName)")

let manager = ("/top/passt/Pesto1", "top.passt.Pesto1.Manager")
let host = ("/top/passt/Pesto1/tables/host", "top.passt.Pesto1.Table")
/// The object, interface and arguments of a call line; nil for an unknown verb.
func call(_ words: [String]) -> ((String, String), [DBusValue])? {
    guard let verb = words.first else { return nil }
    let id = words.count > 1 ? UInt32(words[1]) ?? 0 : 0
    switch verb {
    case "Lock", "Unlock", "Commit", "Rollback": return (manager, [])
    case "Insert":
        let port = words.count > 2 ? UInt16(words[2]) ?? 0 : 0
        let address = words.count > 3 ? words[3] : "127.0.0.1"
        return (
            host, [.uint32(id), .vardict([("protocol", .string("tcp")), ("address", .string(address)), ("first-port", .uint16(port))])]
        )
    case "Delete", "Activate", "Deactivate", "Status": return (host, [.uint32(id)])
    case "Apply":
        // Apply COUNT FIRST-ID: COUNT rules with IDs and ports from FIRST-ID on.
        let first = words.count > 2 ? UInt32(words[2]) ?? 1 : 1
        let inserts: [DBusValue] = (0..<id).map { k in
            .structure([
                .uint32(first + k),
                .vardict([
                    ("protocol", .string("tcp")), ("address", .string("127.0.0.1")),
                    ("first-port", .uint16(UInt16(truncatingIfNeeded: 1024 + (first + k) % 30_000))),
                ]),
            ])
        }
        return (host, [.array(element: "(ua{sv})", inserts), .array(element: "u", []), .vardict([])])
    default: return nil
    }
}

while let line = readLine() {
    var words = line.split(separator: " ").map(String.init)
    guard let verb = words.first else { continue }
    switch verb {
    case "Send":
        // Send VERB ARGS: sent without waiting for the reply ("Replies" reads them).
        words.removeFirst()
        guard let c = call(words) else {
            say("error unknown verb \(words.first ?? "")")
            continue
        }
        let message = DBusMessage.methodCall(
            destination: "top.passt.Pesto1", path: c.0.0, interface: c.0.1, member: words[0], arguments: c.1)
        connection.send(message)
        connection.flush()
        say("sent \(message.serial)")
    case "Replies":
        // Replies MS: every reply that arrives within MS milliseconds, one line each, then "done".
        let ms = words.count > 1 ? Int32(words[1]) ?? 0 : 0
        while let m = connection.nextMessage(timeoutMilliseconds: ms) {
            guard m.replySerial != 0 else { continue }
            say("reply \(m.replySerial) " + (m.isError ? "error \(m.errorName ?? "")" : "ok"))
        }
        say("done")
    default:
        guard let c = call(words) else {
            say("error unknown verb \(verb)")
            continue
        }
        do {
            let reply = try connection.call("top.passt.Pesto1", c.0.0, c.0.1, verb, c.1)
            say((["ok"] + reply.map { "\($0)" }).joined(separator: " "))
        } catch {
            say("error \(error.name): \(error.message)")
        }
    }
}

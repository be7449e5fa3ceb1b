// SPDX-License-Identifier: GPL-2.0-or-later

// pesto-test-peer: a D-Bus client driven line by line on stdin, for tests that must kill a
// client process (SIGKILL) in the middle of a transaction.
//
// Usage: pesto-test-peer ADDRESS. Each input line is one call on the HOST table or Manager:
//   Lock | Unlock | Commit | Rollback
//   Insert ID PORT [ADDRESS] | Delete ID | Activate ID | Deactivate ID
// and gets one output line: "ok" (with the reply's values) or "error NAME: MESSAGE".
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
while let line = readLine() {
    let words = line.split(separator: " ").map(String.init)
    guard let verb = words.first else { continue }
    let id = words.count > 1 ? UInt32(words[1]) ?? 0 : 0
    let call: ((String, String), [DBusValue])
    switch verb {
    case "Lock", "Unlock", "Commit", "Rollback": call = (manager, [])
    case "Insert":
        let port = words.count > 2 ? UInt16(words[2]) ?? 0 : 0
        let address = words.count > 3 ? words[3] : "127.0.0.1"
        call = (
            host, [.uint32(id), .vardict([("protocol", .string("tcp")), ("address", .string(address)), ("first-port", .uint16(port))])]
        )
    case "Delete", "Activate", "Deactivate": call = (host, [.uint32(id)])
    default:
        say("error unknown verb \(verb)")
        continue
    }
    do {
        let reply = try connection.call("top.passt.Pesto1", call.0.0, call.0.1, verb, call.1)
        say((["ok"] + reply.map { "\($0)" }).joined(separator: " "))
    } catch {
        say("error \(error.name): \(error.message)")
    }
}

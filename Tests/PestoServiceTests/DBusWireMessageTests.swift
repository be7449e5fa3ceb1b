// SPDX-License-Identifier: GPL-2.0-or-later

// Messages marshalled in one pass (DBusWireMessage) carry exactly the values, header fields
// and flags the libdbus iterators would have given them, for every type and alignment the
// contract uses; what libdbus would refuse falls back to the iterators.

import CDBus
import PestoEngine
import PestoModel
import PestoSystem
import Testing

@testable import PestoDBus
@testable import PestoService

@Suite("wire messages", .timeLimit(.minutes(10)))
struct DBusWireMessageTests {
    /// Values of every type, nested, with every alignment next to every other.
    static let values: [DBusValue] = [
        .byte(7), .uint64(1 << 40), .bool(true), .int16(-3), .byte(1), .uint32(0xDEAD_BEEF), .uint16(65_535), .int64(-1),
        .double(0.25), .int32(-70_000), .string("héllo, wörld"), .objectPath("/top/passt/Pesto1/tables/host/rules/7"),
        .signature("a{sv}"), .string(""),
        .array(element: "y", [.byte(1), .byte(2), .byte(3)]), .array(element: "t", [.uint64(1), .uint64(2)]),
        .array(element: "s", []), .array(element: "(uuu)", [.structure([.uint32(1), .uint32(2), .uint32(3)])]),
        .array(element: "(uuu)", []),
        .vardict([
            ("protocol", .string("tcp")), ("first-port", .uint16(80)), ("flag", .bool(false)),
            ("nested", .vardict([("x", .uint64(9)), ("list", .strings(["a", "bc"]))])), ("big", .int64(-5)),
        ]),
        .dictionary(
            key: "s", value: "a{sv}",
            [
                .init(.string("top.passt.Pesto1.Rule"), .vardict([("Id", .uint32(7)), ("Active", .bool(true))])),
                .init(.string("org.freedesktop.DBus.Peer"), .vardict([])),
            ]),
        .structure([.byte(1), .double(2), .string("s"), .structure([.uint16(3), .uint64(4)])]),
        .variant(.variant(.array(element: "q", [.uint16(1), .uint16(2)]))),
    ]

    @Test("a signal reads back as sent")
    func signalRoundTrip() {
        let m = DBusMessage.signal(path: "/top/passt/Pesto1", interface: "top.passt.Pesto1.Table", member: "M", arguments: Self.values)
        #expect(m.isSignal)
        #expect(m.path == "/top/passt/Pesto1")
        #expect(m.interface == "top.passt.Pesto1.Table")
        #expect(m.member == "M")
        #expect(m.signature == Self.values.map(\.signature).joined())
        #expect(m.arguments == Self.values)
        #expect(m.serial >= 0x8000_0000)  // built in one pass, not by the iterators
    }

    @Test("every single value, alone, reads back as sent")
    func singleValues() {
        for v in Self.values {
            let m = DBusMessage.signal(path: "/a", interface: "a.b", member: "C", arguments: [v])
            #expect(m.arguments == [v])
            #expect(m.serial >= 0x8000_0000)
        }
        let empty = DBusMessage.signal(path: "/a", interface: "a.b", member: "C")
        #expect(empty.arguments == [])
        #expect(empty.signature == "")
    }

    @Test("a method call has its destination, path, interface and member, and its flags can be set")
    func methodCall() {
        let m = DBusMessage.methodCall(
            destination: "top.passt.Pesto1", path: "/top/passt/Pesto1/tables/host", interface: "top.passt.Pesto1.Table", member: "Status",
            arguments: [.uint32(1)])
        #expect(m.isMethodCall)
        #expect(m.destination == "top.passt.Pesto1")
        #expect(m.path == "/top/passt/Pesto1/tables/host")
        #expect(m.interface == "top.passt.Pesto1.Table")
        #expect(m.member == "Status")
        #expect(m.arguments == [.uint32(1)])
        #expect(!m.noReply)
        m.allowsInteractiveAuthorization = true
        m.noReply = true
        #expect(m.allowsInteractiveAuthorization)
        #expect(m.noReply)
        let bare = DBusMessage.methodCall(destination: nil, path: "/", interface: nil, member: "Ping")
        #expect(bare.destination == nil)
        #expect(bare.interface == nil)
    }

    @Test("a reply from a ReplyAddress answers the call's serial, to its sender, asking no reply")
    func methodReturn() {
        let call = ReplyAddressTests.incomingCall(sender: ":1.42", serial: 77, noReply: false)
        let values: [DBusValue] = [.bool(true), .uint32(1), .uint32(0), .string(""), .uint32(1)]
        let reply = DBusMessage.methodReturn(to: ReplyAddress(call), values)
        #expect(reply.type == DBUS_MESSAGE_TYPE_METHOD_RETURN)
        #expect(reply.replySerial == 77)
        #expect(reply.destination == ":1.42")
        #expect(reply.noReply)
        #expect(reply.arguments == values)
        #expect(reply.signature == "buusu")
        #expect(reply.serial >= 0x8000_0000)
    }

    @Test("what libdbus refuses is built by its iterators instead")
    func fallback() {
        // Not a valid object path: demarshalling refuses it; the iterator path takes it.
        #expect(
            DBusWireMessage.make(type: DBUS_MESSAGE_TYPE_SIGNAL, noReply: true, fields: [(.path, .objectPath("no/slash"))], body: []) == nil
        )
        // A signature over 255 bytes.
        let long = Array(repeating: DBusValue.uint32(1), count: 256)
        #expect(
            DBusWireMessage.make(type: DBUS_MESSAGE_TYPE_SIGNAL, noReply: true, fields: [(.path, .objectPath("/a"))], body: long) == nil)
        // A string with a NUL is cut there, as the iterator path cuts it.
        let m = DBusMessage.signal(path: "/a", interface: "a.b", member: "C", arguments: [.string("ab\u{0}cd")])
        #expect(m.arguments == [.string("ab")])
    }
}

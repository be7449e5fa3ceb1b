// SPDX-License-Identifier: GPL-2.0-or-later

// Replies built from a ReplyAddress (what a change waiting for polkit or for the save keeps
// instead of its message) are the replies libdbus builds from the call itself.

import CDBus
import PestoEngine
import PestoModel
import PestoSystem
import Testing

@testable import PestoDBus
@testable import PestoService

@Suite("reply address", .timeLimit(.minutes(10)))
struct ReplyAddressTests {
    /// A method call as pestod receives it: sender and serial set by the bus.
    static func incomingCall(sender: String, serial: UInt32, noReply: Bool) -> DBusMessage {
        let call = DBusMessage.methodCall(
            destination: PestodFixture.dest, path: PestodFixture.hostPath, interface: PestodFixture.tableInterface, member: "Insert",
            arguments: [.uint32(1), .string(String(repeating: "x", count: 1_000))])
        #expect(dbus_message_set_sender(call.raw, sender) != 0)
        dbus_message_set_serial(call.raw, serial)
        call.noReply = noReply
        return call
    }

    /// libdbus reads `message` back from its wire form (so it would send it).
    static func survivesTheWire(_ message: DBusMessage) -> Bool {
        dbus_message_set_serial(message.raw, 99)
        var data: UnsafeMutablePointer<CChar>?
        var length: Int32 = 0
        guard dbus_message_marshal(message.raw, &data, &length) != 0, let data else { return false }
        defer { dbus_free(data) }
        var error = DBusError()
        dbus_error_init(&error)
        defer { dbus_error_free(&error) }
        guard let back = dbus_message_demarshal(data, length, &error) else { return false }
        dbus_message_unref(back)
        return true
    }

    @Test(
        "the address keeps the caller, serial, reply wish and member; the method return and error built from it match libdbus's own from the call"
    )
    func repliesFromAddress() throws {
        let call = Self.incomingCall(sender: ":1.42", serial: 4_000_000_001, noReply: false)
        let address = ReplyAddress(call)
        #expect(address.sender == ":1.42" && address.serial == 4_000_000_001 && address.wantsReply)
        #expect(address.member == "Insert" && address.interface == PestodFixture.tableInterface)
        #expect(ReplyAddress(Self.incomingCall(sender: ":1.42", serial: 7, noReply: true)).wantsReply == false)

        let ret = DBusMessage.methodReturn(to: address, [.uint32(3), .uint32(0)])
        let libdbusReturn = call.reply([.uint32(3), .uint32(0)])
        for (ours, theirs) in [(ret, libdbusReturn)] {
            #expect(ours.type == DBUS_MESSAGE_TYPE_METHOD_RETURN)
            #expect(ours.type == theirs.type)
            #expect(ours.replySerial == 4_000_000_001 && ours.replySerial == theirs.replySerial)
            #expect(ours.destination == ":1.42" && ours.destination == theirs.destination)
            #expect(ours.noReply && theirs.noReply)
            #expect(ours.signature == "uu" && ours.arguments == theirs.arguments)
            #expect(ours.errorName == nil)
        }

        let refusal = DBusErrorReply(DBusErrorReply.limitsExceeded, "too many")
        let error = DBusMessage.errorReply(to: address, refusal)
        let libdbusError = call.errorReply(refusal)
        #expect(error.type == DBUS_MESSAGE_TYPE_ERROR)
        #expect(error.replySerial == 4_000_000_001 && libdbusError.replySerial == error.replySerial)
        #expect(error.destination == ":1.42" && libdbusError.destination == error.destination)
        #expect(error.errorName == DBusErrorReply.limitsExceeded && libdbusError.errorName == error.errorName)
        #expect(error.noReply && libdbusError.noReply)
        #expect(error.asError == refusal && libdbusError.asError == refusal)
        #expect(error.signature == "s" && libdbusError.signature == "s")

        // From thrown errors of either kind.
        #expect(
            DBusMessage.errorReply(to: address, PestoError(.noSuchRule, "gone") as any Error).errorName
                == PestoBusNames.errorName(.noSuchRule))

        #expect(Self.survivesTheWire(ret))
        #expect(Self.survivesTheWire(error))
    }

    @Test("argumentBytes counts a message's arguments about as sent: strings, nested containers, fixed arrays")
    func argumentBytes() {
        let small = Self.incomingCall(sender: ":1.1", serial: 1, noReply: false)
        #expect(small.argumentBytes >= 1_000 && small.argumentBytes < 1_100, "\(small.argumentBytes)")
        let rules = (0..<1_000).map { i in
            DBusValue.structure([.uint32(UInt32(i)), PestodFixture.rule(1_000, [("owner", .string(String(repeating: "o", count: 200)))])])
        }
        let apply = DBusMessage.methodCall(
            destination: nil, path: PestodFixture.hostPath, interface: PestodFixture.tableInterface, member: "Apply",
            arguments: [.array(element: "(ua{sv})", rules), .array(element: "u", (0..<10_000).map { .uint32(UInt32($0)) }), .vardict([])])
        // 1,000 rules of about 270 bytes (the owner tag, protocol, address, port), 40,000 bytes of IDs.
        #expect(apply.argumentBytes > 240_000 + 40_000, "\(apply.argumentBytes)")
        #expect(apply.argumentBytes < 400_000 + 40_000, "\(apply.argumentBytes)")
        #expect(DBusMessage.methodCall(destination: nil, path: "/", interface: nil, member: "X").argumentBytes == 0)
    }
}

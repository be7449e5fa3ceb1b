// SPDX-License-Identifier: GPL-2.0-or-later

// ReplyAddress: what answering a method call needs, without the call itself.
//
// A change waiting for polkit (AuthorizationQueue) or for the state to be saved
// (CommitBatch) is answered later. Keeping its incoming DBusMessage until then would keep
// the whole message (up to the bus's maximum message size, 32 MiB on the system bus) alive
// per waiting change, and also count it against libdbus's limit on live incoming messages,
// past which the connection stops reading. So the server keeps only this small value and
// builds the reply from it, the way libdbus's `dbus_message_new_method_return` and
// `dbus_message_new_error` build it from the call: the reply serial is the call's serial,
// the destination is the caller, and the reply itself asks for no reply.

import CDBus
import PestoDBus
import PestoEngine
import PestoModel
import PestoSystem

/// Whom to answer and which call the answer is for; small, and no reference to the message.
struct ReplyAddress: Hashable, Sendable {
    /// The caller's unique bus name (nil on a peer-to-peer connection: no destination).
    let sender: String?
    /// The serial of the call, which the reply carries as its reply serial.
    let serial: UInt32
    /// False when the caller flagged the call NO_REPLY_EXPECTED: nothing is sent back.
    let wantsReply: Bool
    /// The method called, for log lines.
    let member: String
    /// The interface of the method called, if the call named one (for log lines).
    let interface: String?

    /// The address of the call `message`.
    init(_ message: DBusMessage) {
        sender = message.sender
        serial = message.serial
        wantsReply = !message.noReply
        member = message.member ?? "?"
        interface = message.interface
    }

    /// The caller's name for log lines.
    var who: String { sender ?? "?" }
}

extension DBusMessage {
    /// A reply message of `type` to the call at `address`, as libdbus builds one from the call.
    private static func replyHeader(_ type: Int32, to address: ReplyAddress) -> DBusMessage {
        guard let raw = dbus_message_new(type) else { fatalError("libdbus: out of memory") }
        let m = DBusMessage(owning: raw)
        dbus_message_set_no_reply(raw, 1)
        guard dbus_message_set_reply_serial(raw, address.serial) != 0 else { fatalError("libdbus: out of memory") }
        if let sender = address.sender {
            guard dbus_message_set_destination(raw, sender) != 0 else { fatalError("libdbus: out of memory") }
        }
        return m
    }

    /// The method return for the call at `address`, carrying `arguments`.
    static func methodReturn(to address: ReplyAddress, _ arguments: [DBusValue] = []) -> DBusMessage {
        methodReturn(to: address, arguments, maxBytes: Int.max).message!
    }

    /// The method return for the call at `address`, unless it is larger than `maxBytes`: then
    /// no message, and its size (ReplySizeLimit.swift).
    static func methodReturn(to address: ReplyAddress, _ arguments: [DBusValue], maxBytes: Int) -> DBusWireMessage.Sized {
        // In one pass (PestoDBus's DBusWireMessage): libdbus's iterators rewrite the header once
        // per top-level argument, which was most of what pestod spent on a Status call.
        var fields: [(DBusWireMessage.Field, DBusValue)] = [(.replySerial, .uint32(address.serial))]
        if let sender = address.sender { fields.append((.destination, .string(sender))) }
        let sized = DBusWireMessage.make(
            type: DBUS_MESSAGE_TYPE_METHOD_RETURN, noReply: true, fields: fields, body: arguments, maxBytes: maxBytes)
        if sized.message != nil || sized.bytes > maxBytes { return sized }
        // Refused by libdbus for its content (never the contract's values): its iterators, as
        // before; the size was within bounds as written.
        let m = replyHeader(DBUS_MESSAGE_TYPE_METHOD_RETURN, to: address)
        DBusValue.appendAll(arguments, to: m.raw)
        return DBusWireMessage.Sized(message: m, bytes: sized.bytes)
    }

    /// The error reply `error` for the call at `address` (its message as the one string argument).
    static func errorReply(to address: ReplyAddress, _ error: DBusErrorReply) -> DBusMessage {
        let m = replyHeader(DBUS_MESSAGE_TYPE_ERROR, to: address)
        guard dbus_message_set_error_name(m.raw, error.name) != 0 else { fatalError("libdbus: out of memory") }
        DBusValue.appendAll([.string(error.message)], to: m.raw)
        return m
    }

    /// An error reply for the call at `address` from a thrown error.
    static func errorReply(to address: ReplyAddress, _ error: any Error) -> DBusMessage {
        if let e = error as? DBusErrorReply { return errorReply(to: address, e) }
        if let e = error as? PestoError { return errorReply(to: address, DBusErrorReply(e)) }
        return errorReply(to: address, DBusErrorReply(DBusErrorReply.failed, "\(error)"))
    }

    /// The size in bytes of this message's arguments as sent (the body, alignment padding
    /// aside): what holding the message costs, and about what its decoded arguments cost.
    /// The body's length on the wire (`DBusMessage.bodyBytes`, computed once per message):
    /// walking every argument with libdbus's iterators took up to a second for a
    /// 65,535-rule Apply, and a flood of them held the loop with it.
    var argumentBytes: Int { bodyBytes }
}

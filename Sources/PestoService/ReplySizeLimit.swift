// SPDX-License-Identifier: GPL-2.0-or-later

// ReplySizeLimit: pestod never sends a reply the bus would refuse.
//
// Theory of operation
// -------------------
// A bus daemon refuses a message larger than its `max_message_size` (dbus-daemon's default,
// which the system bus keeps, is 32 MiB) by dropping the connection that sent it: a reply of
// 44 MiB (GetManagedObjects of 65,535 rules) cut pestod off the bus, and pestod stops when it
// loses the bus. A receiver built on libdbus refuses one over its own connection's maximum
// (`dbus_connection_get_max_message_size`, 32 MiB by default) the same way. So every method
// return is marshalled first (DBusWireMessage, which knows its size) and sent only if it is at
// most `PestoServer.maxMessageBytes`: the smaller of the bus default and pestod's own
// connection's maximum, less 4 KiB of headroom for the header fields the bus adds as it
// forwards the message (the sender's unique name). A larger one is not sent: the caller gets
// `org.freedesktop.DBus.Error.LimitsExceeded`, naming the size, the limit and the calls that
// read the same in parts. Only reads can be that large, and a read changes nothing.
//
// The replies of changes are bounded by their calls (Apply's is 16 bytes per inserted rule,
// its call at least 40), so a change whose call reached pestod has a reply that fits; should
// one not fit all the same, its error says that the change was made. Signals are bounded per
// rule (InterfacesAdded carries one object; UploadRefused at most 1,024 rules) and need no
// check.

import CDBus
import Logging
import PestoDBus
import PestoEngine
import PestoModel
import PestoSystem

/// The largest message pestod sends (see the theory of operation above).
enum ReplySizeLimit {
    /// dbus-daemon's default `max_message_size` (bus/config-parser.c), kept by the system bus:
    /// 32 MiB.
    static let busDefault = 32 << 20
    /// Room for the header fields the bus daemon adds as it forwards a message.
    static let headroom = 4096
    /// The bound for a connection whose libdbus maximum is `localMaximum` bytes.
    static func bound(localMaximum: Int) -> Int { min(localMaximum, busDefault) - headroom }
    /// The bound before the server knows its connection (in-process tests keep it).
    static let standard = bound(localMaximum: busDefault)

    /// The bound for `connection`: its own maximum message size, and the bus default.
    static func bound(for connection: DBusConnection) -> Int {
        let local = Int(dbus_connection_get_max_message_size(connection.raw))
        return bound(localMaximum: local > 0 ? local : busDefault)
    }

    /// What to call instead of `member`, whose reply was too large.
    static func alternative(to member: String) -> String {
        switch member {
        case "GetManagedObjects":
            return "call List on each table (the Manager's Tables property), or ReadIndex for each index below a table's RuleCount"
        case "List":
            return "call ReadIndex for each index below the table's RuleCount, or Read for each rule ID"
        case "Introspect":
            return "the rule objects' paths are the table's path, /rules/ and each rule ID, as List or ReadIndex give them"
        default:
            return "read the properties one at a time (Get)"
        }
    }

    /// The refusal of a reply of `bytes` bytes over `limit` to `member`; `changed` says
    /// whether the call made a change (which stays made) or was a read (nothing changed).
    static func refusal(member: String, bytes: Int, limit: Int, changed: Bool) -> DBusErrorReply {
        let outcome = changed ? "the change was made, only its reply cannot be sent" : "nothing was changed"
        return DBusErrorReply(
            DBusErrorReply.limitsExceeded,
            "The reply to \(member) would be \(bytes) bytes, more than the \(limit) bytes pestod sends in one D-Bus message "
                + "(the bus's maximum message size, \(busDefault) bytes by default, less \(headroom) for its header fields); "
                + "\(outcome). To read the same in parts, \(alternative(to: member)).")
    }
}

extension PestoServer {
    /// The method return for the call at `address` carrying `values`, or LimitsExceeded if it
    /// would be larger than `maxMessageBytes`; `changed`: whether the call made a change.
    func boundedReturn(to address: ReplyAddress, _ values: [DBusValue], changed: Bool) -> DBusMessage {
        let sized = DBusMessage.methodReturn(to: address, values, maxBytes: maxMessageBytes)
        if let message = sized.message { return message }
        return tooLarge(address, bytes: sized.bytes, changed: changed)
    }

    /// LimitsExceeded for the call at `address`, whose reply would be `bytes` bytes (logged).
    func tooLarge(_ address: ReplyAddress, bytes: Int, changed: Bool = false) -> DBusMessage {
        logger.warning(
            "\(address.member) by \(address.who): its reply of \(bytes) bytes is over the \(maxMessageBytes) bytes the bus takes; answered LimitsExceeded"
        )
        return .errorReply(
            to: address, ReplySizeLimit.refusal(member: address.member, bytes: bytes, limit: maxMessageBytes, changed: changed))
    }

    /// Logs a read that held the loop for 50 ms or more (decoding, the reply built and queued):
    /// the large reads' measure (doc/architecture.md, "Large reads").
    func logLongRead(_ address: ReplyAddress, since started: MonotonicInstant) {
        let ns = MonotonicInstant.now.nanoseconds - started.nanoseconds
        guard ns >= 50_000_000 else { return }
        logger.info("\(address.member) by \(address.who) answered in \(ns / 1_000_000).\(ns / 100_000 % 10) ms (one loop turn)")
    }
}

// SPDX-License-Identifier: GPL-2.0-or-later

// DBusMessage: an owned reference to a libdbus message, with typed constructors and accessors.

import CDBus

/// An error a D-Bus peer sent back, or one this process will send: a name and a sentence.
public struct DBusErrorReply: Error, Hashable, Sendable, CustomStringConvertible {
    /// The D-Bus error name, e.g. `top.passt.Pesto1.Error.NoSuchRule`.
    public let name: String
    /// The human-readable message.
    public let message: String

    public init(_ name: String, _ message: String) {
        self.name = name
        self.message = message
    }

    public var description: String { "\(name): \(message)" }

    // Standard error names used by the service.
    public static let invalidArgs = "org.freedesktop.DBus.Error.InvalidArgs"
    public static let unknownMethod = "org.freedesktop.DBus.Error.UnknownMethod"
    public static let unknownObject = "org.freedesktop.DBus.Error.UnknownObject"
    public static let unknownInterface = "org.freedesktop.DBus.Error.UnknownInterface"
    public static let unknownProperty = "org.freedesktop.DBus.Error.UnknownProperty"
    public static let propertyReadOnly = "org.freedesktop.DBus.Error.PropertyReadOnly"
    public static let accessDenied = "org.freedesktop.DBus.Error.AccessDenied"
    public static let failed = "org.freedesktop.DBus.Error.Failed"
    public static let limitsExceeded = "org.freedesktop.DBus.Error.LimitsExceeded"
}

/// A libdbus message; the wrapper holds one reference and drops it in `deinit`.
public final class DBusMessage {
    /// The libdbus message.
    package let raw: OpaquePointer

    /// Wraps a message whose reference the caller hands over.
    package init(owning raw: OpaquePointer) { self.raw = raw }

    /// Wraps a message the caller does not own (takes a reference of its own).
    package init(retaining raw: OpaquePointer) {
        self.raw = raw
        dbus_message_ref(raw)
    }

    deinit { dbus_message_unref(raw) }

    /// `bodyBytes` once computed.
    private var cachedBodyBytes: Int?

    /// The length of the message's body on the wire (its arguments with their alignment
    /// padding), from the body length field of the message marshalled by libdbus: a copy of
    /// the message (a few milliseconds for the largest Apply), where walking its arguments
    /// with libdbus's iterators took up to a second; computed once per message.
    package var bodyBytes: Int {
        if let cachedBodyBytes { return cachedBodyBytes }
        var buffer: UnsafeMutablePointer<CChar>?
        var length: Int32 = 0
        var bytes = 0
        if dbus_message_marshal(raw, &buffer, &length) != 0, let buffer {
            // Byte 0 is the byte order ('l' little, 'B' big); bytes 4-7 the body length.
            if length >= 16 {
                let b = (4..<8).map { UInt32(UInt8(bitPattern: buffer[$0])) }
                let little = buffer[0] == CChar(UInt8(ascii: "l"))
                bytes = Int(little ? b[0] | b[1] << 8 | b[2] << 16 | b[3] << 24 : b[3] | b[2] << 8 | b[1] << 16 | b[0] << 24)
            }
            dbus_free(buffer)
        }
        cachedBodyBytes = bytes
        return bytes
    }

    /// libdbus fails allocations only when out of memory; that is fatal for a daemon.
    private static func allocated(_ p: OpaquePointer?) -> OpaquePointer {
        guard let p else { fatalError("libdbus: out of memory") }
        return p
    }

    /// A method call (built in one pass: DBusWireMessage.swift; through libdbus's iterators
    /// only should libdbus refuse that).
    public static func methodCall(
        destination: String?, path: String, interface: String?, member: String, arguments: [DBusValue] = []
    ) -> DBusMessage {
        var fields: [(DBusWireMessage.Field, DBusValue)] = [(.path, .objectPath(path)), (.member, .string(member))]
        if let interface { fields.append((.interface, .string(interface))) }
        if let destination { fields.append((.destination, .string(destination))) }
        if let m = DBusWireMessage.make(type: DBUS_MESSAGE_TYPE_METHOD_CALL, noReply: false, fields: fields, body: arguments) {
            return m
        }
        let m = DBusMessage(owning: allocated(dbus_message_new_method_call(destination, path, interface, member)))
        DBusValue.appendAll(arguments, to: m.raw)
        return m
    }

    /// A signal (built as `methodCall` is).
    public static func signal(path: String, interface: String, member: String, arguments: [DBusValue] = []) -> DBusMessage {
        if let m = DBusWireMessage.make(
            type: DBUS_MESSAGE_TYPE_SIGNAL, noReply: true,
            fields: [(.path, .objectPath(path)), (.interface, .string(interface)), (.member, .string(member))], body: arguments)
        {
            return m
        }
        let m = DBusMessage(owning: allocated(dbus_message_new_signal(path, interface, member)))
        DBusValue.appendAll(arguments, to: m.raw)
        return m
    }

    /// The reply to this method call.
    public func reply(_ arguments: [DBusValue] = []) -> DBusMessage {
        let m = DBusMessage(owning: Self.allocated(dbus_message_new_method_return(raw)))
        DBusValue.appendAll(arguments, to: m.raw)
        return m
    }

    /// An error reply to this method call.
    public func errorReply(_ error: DBusErrorReply) -> DBusMessage {
        DBusMessage(owning: Self.allocated(dbus_message_new_error(raw, error.name, error.message)))
    }

    private static func string(_ p: UnsafePointer<CChar>?) -> String? { p.map { String(cString: $0) } }

    /// DBUS_MESSAGE_TYPE_* value.
    public var type: Int32 { dbus_message_get_type(raw) }
    public var isMethodCall: Bool { type == DBUS_MESSAGE_TYPE_METHOD_CALL }
    public var isSignal: Bool { type == DBUS_MESSAGE_TYPE_SIGNAL }
    public var isError: Bool { type == DBUS_MESSAGE_TYPE_ERROR }
    public var path: String? { Self.string(dbus_message_get_path(raw)) }
    public var interface: String? { Self.string(dbus_message_get_interface(raw)) }
    public var member: String? { Self.string(dbus_message_get_member(raw)) }
    public var sender: String? { Self.string(dbus_message_get_sender(raw)) }
    public var destination: String? { Self.string(dbus_message_get_destination(raw)) }
    public var errorName: String? { Self.string(dbus_message_get_error_name(raw)) }
    public var signature: String { Self.string(dbus_message_get_signature(raw)) ?? "" }
    public var serial: UInt32 { dbus_message_get_serial(raw) }
    public var replySerial: UInt32 { dbus_message_get_reply_serial(raw) }
    /// True when the caller asked for no reply.
    public var noReply: Bool {
        get { dbus_message_get_no_reply(raw) != 0 }
        set { dbus_message_set_no_reply(raw, newValue ? 1 : 0) }
    }
    /// True when the caller allows interactive authorisation (polkit may ask for a password).
    public var allowsInteractiveAuthorization: Bool {
        get { dbus_message_get_allow_interactive_authorization(raw) != 0 }
        set { dbus_message_set_allow_interactive_authorization(raw, newValue ? 1 : 0) }
    }

    /// Gives a message built here the sender and serial a bus daemon would have stamped on
    /// it, so that a test can hand it to the service as if it had arrived on the bus.
    package func stamp(sender: String, serial: UInt32) {
        guard dbus_message_set_sender(raw, sender) != 0 else { fatalError("libdbus: out of memory") }
        dbus_message_set_serial(raw, serial)
    }

    /// Every argument; nil for types this layer does not read (unix fds).
    public var arguments: [DBusValue]? { DBusValue.readAll(raw) }

    /// The number of elements of each top-level argument that is an array (nil for the
    /// others), counted by libdbus without reading the elements, so a handler can refuse an
    /// over-long array before `arguments` builds it.
    public var argumentArrayCounts: [Int?] {
        var iter = DBusMessageIter()
        guard dbus_message_iter_init(raw, &iter) != 0 else { return [] }
        var counts: [Int?] = []
        repeat {
            let isArray = dbus_message_iter_get_arg_type(&iter) == DBusTypeCode.array
            counts.append(isArray ? Int(dbus_message_iter_get_element_count(&iter)) : nil)
        } while dbus_message_iter_next(&iter) != 0
        return counts
    }

    /// For an error message: the name and the first string argument.
    public var asError: DBusErrorReply? {
        guard isError, let name = errorName else { return nil }
        return DBusErrorReply(name, arguments?.first?.stringValue ?? "")
    }
}

// SPDX-License-Identifier: GPL-2.0-or-later

// DBusArgumentCursor: a message's arguments read a piece at a time, over several calls.
//
// Theory of operation
// -------------------
// `DBusMessage.arguments` reads every argument in one go, which for an `Apply` of 65,535
// rules is a second or more of one loop turn. A cursor instead keeps libdbus's iterators
// (plain structures that point into the message, valid while the message lives, which the
// cursor holds) between calls: the server reads a top-level array a few elements per loop
// turn (`nextElement`) and the other arguments whole (`nextArgument`), in order.

import CDBus

/// Reads a message's top-level arguments in order, the elements of an array argument one by
/// one, keeping libdbus's iterators between calls.
package final class DBusArgumentCursor {
    /// What `nextElement` found.
    package enum Element {
        /// The next element of the array entered.
        case value(DBusValue)
        /// The array has no more elements; the cursor has moved to the next argument.
        case end
        /// An element of a type this layer does not read (a unix fd in a variant).
        case unsupported
    }

    /// The message, kept alive while the iterators point into it.
    private let message: DBusMessage
    private var top = DBusMessageIter()
    private var element = DBusMessageIter()
    /// No argument is left.
    private var atEnd: Bool
    /// `element` walks the current top-level array.
    private var inArray = false

    /// A cursor on the first argument of `message`.
    package init(_ message: DBusMessage) {
        self.message = message
        atEnd = dbus_message_iter_init(message.raw, &top) == 0
    }

    /// Moves to the next top-level argument (none left: `atEnd`).
    private func advance() {
        atEnd = dbus_message_iter_next(&top) == 0
    }

    /// Reads the current top-level argument whole and moves past it; nil when none is left
    /// or it holds a type this layer does not read.
    package func nextArgument() -> DBusValue? {
        precondition(!inArray, "the array entered is not read to its end")
        guard !atEnd else { return nil }
        let value = DBusValue.read(&top)
        advance()
        return value
    }

    /// Enters the current top-level argument, which must be an array, to read its elements
    /// with `nextElement`; false when it is not an array or none is left.
    package func enterArray() -> Bool {
        precondition(!inArray, "an array is entered already")
        guard !atEnd, dbus_message_iter_get_arg_type(&top) == DBusTypeCode.array else { return false }
        dbus_message_iter_recurse(&top, &element)
        inArray = true
        return true
    }

    /// The next element of the array entered; at its end the cursor moves on to the next
    /// top-level argument.
    package func nextElement() -> Element {
        precondition(inArray, "no array is entered")
        guard dbus_message_iter_get_arg_type(&element) != DBusTypeCode.invalid else {
            inArray = false
            advance()
            return .end
        }
        guard let value = DBusValue.read(&element) else { return .unsupported }
        dbus_message_iter_next(&element)
        return .value(value)
    }
}

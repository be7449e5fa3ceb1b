// SPDX-License-Identifier: GPL-2.0-or-later

/* CDBus: libdbus-1 as seen from Swift. Variadic or macro-only libdbus calls that Swift
 * cannot import are wrapped here as documented static inline cdbus_* functions. */
#ifndef CDBUS_SHIM_H
#define CDBUS_SHIM_H
#include <dbus/dbus.h>
#include <string.h>

/* The wire size of one value of the fixed type `type`. */
static inline unsigned long cdbus_fixed_size(int type) {
    switch (type) {
    case DBUS_TYPE_BYTE: return 1;
    case DBUS_TYPE_INT16: case DBUS_TYPE_UINT16: return 2;
    case DBUS_TYPE_INT64: case DBUS_TYPE_UINT64: case DBUS_TYPE_DOUBLE: return 8;
    default: return 4; /* boolean, int32, uint32, unix fd */
    }
}

/* The bytes the values under `iter` take on the wire, alignment padding aside: strings
 * their length word, bytes and NUL; arrays their length word and elements (an array of a
 * fixed type is counted without reading its elements); variants their signature and
 * value. Reads every string once, like any decoding of the message, and allocates
 * nothing; nesting is bounded by the D-Bus limit of 64 levels. */
static inline unsigned long cdbus_iter_bytes(DBusMessageIter *iter) {
    unsigned long total = 0;
    int type;
    while ((type = dbus_message_iter_get_arg_type(iter)) != DBUS_TYPE_INVALID) {
        if (type == DBUS_TYPE_ARRAY && dbus_type_is_fixed(dbus_message_iter_get_element_type(iter))) {
            total += 4 + (unsigned long)dbus_message_iter_get_element_count(iter)
                * cdbus_fixed_size(dbus_message_iter_get_element_type(iter));
        } else if (type == DBUS_TYPE_STRING || type == DBUS_TYPE_OBJECT_PATH || type == DBUS_TYPE_SIGNATURE) {
            const char *s = NULL;
            dbus_message_iter_get_basic(iter, &s);
            total += 5 + (s ? strlen(s) : 0);
        } else if (dbus_type_is_container(type)) {
            DBusMessageIter sub;
            dbus_message_iter_recurse(iter, &sub);
            total += 4 + cdbus_iter_bytes(&sub);
        } else {
            total += cdbus_fixed_size(type);
        }
        if (!dbus_message_iter_next(iter)) break;
    }
    return total;
}

/* The bytes of `message`'s arguments (see cdbus_iter_bytes); 0 when it has none. */
static inline unsigned long cdbus_message_argument_bytes(DBusMessage *message) {
    DBusMessageIter iter;
    if (!dbus_message_iter_init(message, &iter)) return 0;
    return cdbus_iter_bytes(&iter);
}
#endif

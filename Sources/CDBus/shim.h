// SPDX-License-Identifier: GPL-2.0-or-later

/* CDBus: libdbus-1 as seen from Swift. Variadic or macro-only libdbus calls that Swift
 * cannot import are wrapped here as documented static inline cdbus_* functions. */
#ifndef CDBUS_SHIM_H
#define CDBUS_SHIM_H
#include <dbus/dbus.h>
#include <string.h>

#endif

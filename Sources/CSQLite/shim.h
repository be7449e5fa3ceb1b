// SPDX-License-Identifier: GPL-2.0-or-later

/* CSQLite: the system's libsqlite3 as seen from Swift (the state store, SQLiteStore.swift).
 * SQLITE_TRANSIENT is a macro casting -1 to a function pointer, which Swift cannot import:
 * it is returned by a static inline function instead. */
#ifndef CSQLITE_SHIM_H
#define CSQLITE_SHIM_H
#include <sqlite3.h>

/* SQLITE_TRANSIENT: SQLite copies a bound text before the bind call returns. */
static inline sqlite3_destructor_type csqlite_transient(void) { return SQLITE_TRANSIENT; }
#endif

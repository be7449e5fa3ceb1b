#!/usr/bin/python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Follow pestod's forwarding tables from D-Bus signals alone (Python, Gio).

    ./examples/follow-tables.py                     # the system bus
    ./examples/follow-tables.py --session           # a per-user pestod --session
    ./examples/follow-tables.py --address unix:path=/run/pesto-demo/bus.sock

Prints every rule once pestod is on the bus, then one line per change: rules added and
removed, rule state (active, bound sockets, bind failures, last error), the lock. It never
polls: GetManagedObjects (and GetAll for the Manager) each time pestod takes its name, then InterfacesAdded,
InterfacesRemoved and PropertiesChanged (RuleStateChanged and BindFailuresChanged carry the
same rule state, keyed by ID). doc/live-model.md explains the pattern. Needs python3-gi.
"""
import argparse
import sys

from gi.repository import Gio, GLib

BUS_NAME = "top.passt.Pesto1"
ROOT = "/top/passt/Pesto1"
MANAGER, TABLE, RULE = "top.passt.Pesto1.Manager", "top.passt.Pesto1.Table", "top.passt.Pesto1.Rule"

objects = {}  # object path -> {interface: {property: value}}
# Replies on their way; the signals that arrive before a reply are already in it.
loading = {"manager": False, "objects": False}


def say(text):
    print(text, flush=True)


def describe(path):
    """One rule as a line: table, ID, forwarding, state, owner."""
    r = objects[path][RULE]
    table = objects.get(r["Table"], {}).get(TABLE, {}).get("Name", "?")
    ports = f"{r['FirstPort']}" + (f"-{r['LastPort']}" if r["LastPort"] != r["FirstPort"] else "")
    where = (r["Address"] or "*") + (f"%{r['Interface']}" if r["Interface"] else "")
    state = f"active, {r['BoundSockets']} bound" if r["Active"] else "inactive"
    if r["BindFailures"]:
        state += f", {r['BindFailures']} failed ({r['LastError']})"
    return (f"{table} rule {r['Id']}: {r['Protocol']} {where}/{ports} -> "
            f"{r['TargetAddress'] or 'default'}/{r['TargetPort']}: {state}, owner {r['Owner'] or '-'}")


def on_signal(_conn, _sender, path, iface, member, params, _data):
    args = params.unpack()
    about_manager = path == ROOT and member == "PropertiesChanged" and args[0] == MANAGER
    if loading["manager" if about_manager else "objects"] or not path.startswith(ROOT):
        return
    if member == "InterfacesAdded":
        objects.setdefault(args[0], {}).update(args[1])
        if RULE in args[1]:
            say("added " + describe(args[0]))
    elif member == "InterfacesRemoved":
        gone = objects.pop(args[0], {})
        if RULE in gone:
            say(f"removed rule {gone[RULE]['Id']} ({args[0]})")
    elif member == "PropertiesChanged" and path in objects and args[0] in objects[path]:
        objects[path][args[0]].update(args[1])
        if args[0] == RULE:
            say(describe(path))
        elif args[0] == MANAGER and "LockOwner" in args[1]:
            say(f"lock: held by {args[1]['LockOwner']}" if args[1]["LockOwner"] else "lock: free")
    # RuleStateChanged and BindFailuresChanged (on the table) say what PropertiesChanged on
    # the rule object says; a client that does not track rule objects can use them instead.


def on_appeared(conn, _name, owner):
    say(f"pestod appeared as {owner}")
    loading.update(manager=True, objects=True)

    def manager_loaded(conn, result):
        # An ObjectManager does not list itself: the Manager's properties come from GetAll.
        objects[ROOT] = {MANAGER: conn.call_finish(result).unpack()[0]}
        loading["manager"] = False
        lock = objects[ROOT][MANAGER]["LockOwner"]
        say(f"lock: held by {lock}" if lock else "lock: free")

    def objects_loaded(conn, result):
        manager = objects.get(ROOT)
        objects.clear()
        objects.update(conn.call_finish(result).unpack()[0])
        if manager:
            objects[ROOT] = manager
        loading["objects"] = False
        for path in sorted((p for p in objects if RULE in objects[p]), key=lambda p: objects[p][RULE]["Id"]):
            say(describe(path))
        say("following")

    # Asked together, answered in this order.
    conn.call(BUS_NAME, ROOT, "org.freedesktop.DBus.Properties", "GetAll", GLib.Variant("(s)", (MANAGER,)),
              GLib.VariantType("(a{sv})"), Gio.DBusCallFlags.NONE, -1, None, manager_loaded)
    conn.call(BUS_NAME, ROOT, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects", None,
              GLib.VariantType("(a{oa{sa{sv}}})"), Gio.DBusCallFlags.NONE, -1, None, objects_loaded)


def on_vanished(_conn, _name):
    objects.clear()
    loading.update(manager=False, objects=False)
    say("pestod is not running")


def main():
    parser = argparse.ArgumentParser(description="Follow pestod's forwarding tables.")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--address", help="a bus address instead of the system bus")
    where.add_argument("--session", action="store_true", help="the session bus instead of the system bus")
    args = parser.parse_args()
    if args.session:
        conn = Gio.bus_get_sync(Gio.BusType.SESSION, None)
    elif args.address:
        flags = Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION
        conn = Gio.DBusConnection.new_for_address_sync(args.address, flags, None, None)
    else:
        conn = Gio.bus_get_sync(Gio.BusType.SYSTEM, None)
    # Subscribe before the first GetManagedObjects, so no change falls between the two.
    conn.signal_subscribe(BUS_NAME, None, None, None, None, Gio.DBusSignalFlags.NONE, on_signal, None)
    Gio.bus_watch_name_on_connection(conn, BUS_NAME, Gio.BusNameWatcherFlags.NONE, on_appeared, on_vanished)
    try:
        GLib.MainLoop().run()
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())

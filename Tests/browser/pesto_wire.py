# SPDX-License-Identifier: GPL-2.0-or-later
"""Upstream pesto's control protocol (version 2), as its client speaks it, for the browser
test: built from doc/pesto-v2-wire.md alone, raw bytes and all (not pestod's codec).

upload(path, rules) does what `pesto` does to add rules: reads the hello and the dump, sends
every table back with the new rules appended to HOST's, shuts its side down and waits for
pestod to close the session (the protocol has no reply: a refusal shows only in pestod's log
and its UploadRefused signal).
"""

import socket
import struct

HELLO = b"basil:s\0"
HOST_PIF = 1


def address16(text):
    """A rule's 16-byte address: IPv6 as is, IPv4 IPv4-mapped (::ffff:a.b.c.d)."""
    if ":" in text:
        return socket.inet_pton(socket.AF_INET6, text)
    return bytes(10) + b"\xff\xff" + socket.inet_pton(socket.AF_INET, text)


def rule(listen, port, udp=False):
    """The 56-byte rule `pesto -t LISTEN/PORT` (or -u) makes: automatic target, no interface."""
    return address16(listen) + bytes(16) + bytes(16) + struct.pack(">HHHBB", port, port, port, 17 if udp else 6, 0)


def _read(conn, n):
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"the control socket closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def upload(path, rules, timeout=30):
    """Appends `rules` (56-byte each) to the HOST table through the control socket at `path`;
    returns once pestod has closed the session."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(path)
        hello = _read(conn, 20)
        if hello[:8] != HELLO or struct.unpack(">III", hello[8:]) != (2, 128, 16):
            raise ConnectionError(f"unexpected hello {hello!r}")
        tables = {}
        while True:
            pif = _read(conn, 1)[0]
            if pif == 0:
                break
            info = _read(conn, 136)
            count = struct.unpack(">I", info[132:136])[0]
            tables[pif] = [_read(conn, 56) for _ in range(count)]
        tables.setdefault(HOST_PIF, [])
        tables[HOST_PIF] += rules
        data = b"".join(bytes([pif]) + struct.pack(">I", len(t)) + b"".join(t) for pif, t in sorted(tables.items()))
        conn.sendall(data + b"\0")
        conn.shutdown(socket.SHUT_WR)
        if conn.recv(1) != b"":
            raise ConnectionError("pestod sent data after the upload")

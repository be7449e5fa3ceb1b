# SPDX-License-Identifier: GPL-2.0-or-later
"""The browser test's process bookkeeping: which processes became its children (it is a child
subreaper, so the bridge and Chromium's helpers are reaped by it)."""

import os


def own_children():
    """PIDs whose parent is this process."""
    me = str(os.getpid())
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if fields[1] == me:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids

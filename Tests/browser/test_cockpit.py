#!/usr/bin/python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""The Cockpit page (cockpit/) against a real pestod, in a real browser.

Run by Tests/PestoServiceTests/CockpitBrowserTests.swift, which starts a private bus and
pestod on it (`--authorize none`) and passes:

    test_cockpit.py --bus ADDRESS --pestod PATH --screenshot PNG --web-port P --ports A,B,C,Q
                    --control SOCKET --netns PATH

This script then starts, as its own children:

  * cockpit-ws without TLS or login (`--local-session=cockpit-bridge`), handed a listening
    socket on 127.0.0.1:P by socket activation (LISTEN_FDS), so it needs no readiness wait;
    the bridge finds the page through XDG_DATA_DIRS and the bus through
    DBUS_SYSTEM_BUS_ADDRESS;
  * headless Chromium through chromedriver (selenium), which opens
    /cockpit/@localhost/pesto/index.html.

It checks, each step waiting on the page's DOM or on pestod (never a fixed sleep): rules
changed with busctl and pestoctl appear live, written as `pestoctl --json` writes them; a bind
failure shows and clears; another client's lock is named; the page's transaction, edits,
(de)activations and deletions change pestod; a refused activation shows its error; a killed
pestod is followed, and "Start pestod" says why it cannot start it; a second cockpit-ws whose
bridge runs as `nobody` is read-only; the console stays clean. manager_checks.py: pestod's
versions, and uploads refused on its control socket shown as alerts. page_checks.py adds the page's
own behaviours: the shared spec cases, the form that never adds what was not typed, an atomic
Add, confirmations, dark style, 760 px and phone widths, German, and 65,535 rules.

Screenshots: PNG (an active and a failing rule, the lock), PNG-dark, PNG-760, PNG-phone,
PNG-upload-refused and PNG-65535 beside it (--shots DIR: more steps).

Exit status: 0 passed, 1 failed, 77 a tool is missing. Every process it starts is killed
(SIGKILL) and reaped: the script is a child subreaper, so the bridge and Chromium's helpers
are reaped here too, not left to a PID 1 that may not reap.
"""

import argparse
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

COCKPIT_WS = "/usr/lib/cockpit/cockpit-ws"
COCKPIT_BRIDGE = "/usr/bin/cockpit-bridge"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
BUSCTL = "/usr/bin/busctl"
PAGE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "cockpit")

BUS_NAME = "top.passt.Pesto1"
HOST = "/top/passt/Pesto1/tables/host"
TABLE = "top.passt.Pesto1.Table"
MANAGER_PATH = "/top/passt/Pesto1"
MANAGER = "top.passt.Pesto1.Manager"
WAIT_SECONDS = 20

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError as error:
    print(f"SKIP: python3-selenium is missing ({error})")
    sys.exit(77)
from page_checks import Failure, PageChecks  # noqa: E402 (needs selenium)
from manager_checks import ManagerChecks  # noqa: E402 (needs selenium)
from processes import own_children  # noqa: E402


def log(message):
    print(f"[{time.monotonic() - START:6.2f}s] {message}", flush=True)


START = time.monotonic()


class Test(PageChecks, ManagerChecks):
    """One run: the processes it started, the browser, and the checks (page_checks.py: the
    page's own behaviours; manager_checks.py: versions and refused uploads)."""

    @staticmethod
    def log(message):
        log(message)

    def __init__(self, args):
        self.args = args
        self.bus = args.bus
        self.ports = [int(p) for p in args.ports.split(",")]
        self.tmp = tempfile.TemporaryDirectory(prefix="pesto-cockpit-")
        self.children = []  # Popen objects, killed at the end
        self.driver = None
        self.pestod = None  # a pestod this script started (after killing the fixture's)

    # ---------------------------------------------------------------- processes

    def start_cockpit(self, port, bridge_user=None):
        """cockpit-ws on 127.0.0.1:port by socket activation, with the page installed; its
        bridge runs as root, or as `bridge_user` (a user who may not change the tables)."""
        share = os.path.join(self.tmp.name, "share")
        if not os.path.exists(share):
            os.chmod(self.tmp.name, 0o755)  # readable by the unprivileged bridge
            os.makedirs(os.path.join(share, "cockpit"))
            os.symlink(os.path.abspath(PAGE_DIR), os.path.join(share, "cockpit", "pesto"))
        bridge = COCKPIT_BRIDGE
        if bridge_user is not None:
            bridge = os.path.join(self.tmp.name, "bridge-as-" + bridge_user)
            with open(bridge, "w") as f:
                f.write(f'#!/bin/sh\nexec /usr/bin/setpriv --reuid={bridge_user} --regid=$(id -g {bridge_user}) --clear-groups '
                        f'env HOME=/nonexistent {COCKPIT_BRIDGE} "$@"\n')
            os.chmod(bridge, 0o755)
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(64)
        env = dict(os.environ)
        env.update({
            "DBUS_SYSTEM_BUS_ADDRESS": self.bus,   # cockpit.dbus(..., {bus: "system"})
            "DBUS_SESSION_BUS_ADDRESS": self.bus,  # never autolaunch a session bus
            "XDG_DATA_DIRS": share + ":/usr/share",
            "XDG_DATA_HOME": os.path.join(self.tmp.name, "data-home"),
            "XDG_CACHE_HOME": os.path.join(self.tmp.name, "cache"),
            "XDG_RUNTIME_DIR": self.tmp.name,
        })
        fd = listener.fileno()
        # bash moves the socket to descriptor 3 (dash takes one-digit descriptors only) and
        # sets LISTEN_PID to its own PID, which
        # cockpit-ws keeps through exec.
        move = "" if fd == 3 else f"exec 3<&{fd} {fd}<&-; "
        script = move + 'export LISTEN_FDS=1 LISTEN_PID=$$; exec "$@"'
        ws = subprocess.Popen(["/bin/bash", "-c", script, "bash", COCKPIT_WS, "--no-tls", f"--local-session={bridge}"],
                              env=env, pass_fds=(fd,), stdout=self.logfile(f"cockpit-ws-{port}"), stderr=subprocess.STDOUT)
        listener.close()
        self.children.append(ws)
        log(f"cockpit-ws pid {ws.pid} on 127.0.0.1:{port}" + (f", bridge as {bridge_user}" if bridge_user else ""))

    def logfile(self, name):
        return open(os.path.join(self.tmp.name, name + ".log"), "w")

    def start_browser(self):
        os.environ["DBUS_SESSION_BUS_ADDRESS"] = "disabled:"  # Chromium must not autolaunch one
        os.environ["HOME"] = self.tmp.name
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1200", "--hide-scrollbars", "--no-first-run",
                     f"--user-data-dir={os.path.join(self.tmp.name, 'chromium')}"):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        service = Service(CHROMEDRIVER, log_path=os.path.join(self.tmp.name, "chromedriver.log"))
        self.driver = webdriver.Chrome(service=service, options=options)
        self.driver.set_page_load_timeout(WAIT_SECONDS)

    def start_pestod(self):
        netns = ["--netns", self.args.netns] if self.args.netns else []
        # The restarted pestod lets rules overlap (first match wins), so the page shows who wins.
        pestod = subprocess.Popen([self.args.pestod, "--address", self.bus, "--authorize", "none", "--overlap", "first-match",
                                   *netns],
                                  stdout=subprocess.DEVNULL, stderr=self.logfile("pestod-restarted"))
        self.children.append(pestod)
        return pestod

    def cleanup(self):
        if self.driver is not None:
            try:
                self.driver.quit()
            except Exception as error:  # the browser may already be gone
                log(f"driver.quit: {error}")
        for child in self.children:
            if child.poll() is None:
                child.kill()
            child.wait()
        # Whatever else became our child (the bridge, Chromium helpers): kill and reap.
        for pid in own_children():
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        self.tmp.cleanup()

    # ---------------------------------------------------------------- pestod, through busctl

    def busctl(self, *args, check=True):
        result = subprocess.run([BUSCTL, f"--address={self.bus}", *args], capture_output=True, text=True, timeout=30)
        if check and result.returncode != 0:
            raise Failure(f"busctl {' '.join(args)} failed: {result.stderr.strip()}")
        return result

    def table_call(self, method, signature, *args, check=True, table=HOST):
        return self.busctl("call", BUS_NAME, table, TABLE, method, signature, *map(str, args), check=check)

    def insert(self, rule_id, port, owner):
        self.table_call("Insert", "ua{sv}", rule_id, 4, "protocol", "s", "tcp", "address", "s", "127.0.0.1",
                        "first-port", "q", port, "owner", "s", owner)

    def status(self, rule_id, table=HOST):
        """Status of a rule as busctl prints it ('buusu true 1 0 "" 1'), or the error text."""
        result = self.table_call("Status", "u", rule_id, check=False, table=table)
        return result.stdout.strip() if result.returncode == 0 else "error: " + result.stderr.strip()

    def expect_status(self, rule_id, pattern, table=HOST):
        text = self.status(rule_id, table)
        if not re.search(pattern, text):
            raise Failure(f"pestod: Status {rule_id} is {text!r}, expected /{pattern}/")
        log(f"busctl Status {rule_id}: {text}")

    def pestod_pid(self):
        out = self.busctl("call", "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                          "GetConnectionUnixProcessID", "s", BUS_NAME).stdout.split()
        return int(out[1])

    # ---------------------------------------------------------------- the page

    def wait(self, description, condition, timeout=WAIT_SECONDS):
        """Waits until condition() is truthy (re-evaluated on every poll of the DOM)."""
        def probe(_driver):
            try:
                return condition()
            except StaleElementReferenceException:
                return False
        try:
            result = WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(probe)
        except TimeoutException:
            raise Failure(f"the page never showed: {description}\n--- page text:\n{self.page_text()}") from None
        log(f"page shows: {description}")
        return result

    def page_text(self):
        try:
            return self.driver.find_element(By.TAG_NAME, "body").text
        except Exception as error:
            return f"<no page text: {error}>"

    def css(self, selector):
        return self.driver.find_elements(By.CSS_SELECTOR, selector)

    def row(self, rule_id, table="HOST"):
        rows = self.css(f'[data-table="{table}"] tr.rule[data-rule-id="{rule_id}"]')
        return rows[0] if rows else None

    def row_state(self, rule_id, table="HOST"):
        row = self.row(rule_id, table)
        if row is None:
            return None
        return next((c[len("state-"):] for c in row.get_attribute("class").split() if c.startswith("state-")), None)

    def wait_row(self, rule_id, state, text=None, table="HOST"):
        def check():
            row = self.row(rule_id, table)
            return row is not None and self.row_state(rule_id, table) == state and (text is None or text in row.text)
        self.wait(f"{table} rule {rule_id} {state}" + (f" with {text!r}" if text else ""), check)

    def wait_row_gone(self, rule_id):
        self.wait(f"rule {rule_id} gone", lambda: self.row(rule_id) is None)

    def click_row_button(self, rule_id, action):
        button = self.wait(f"rule {rule_id}'s {action} button",
                           lambda: next((b for b in (self.row(rule_id).find_elements(By.CSS_SELECTOR, f'button[data-action="{action}"]')
                                                     if self.row(rule_id) else [])
                                         if b.is_displayed() and b.is_enabled()), None))
        button.click()

    def click(self, element_id):
        button = self.wait(f"button #{element_id}", lambda: next(
            (b for b in self.css("#" + element_id) if b.is_displayed() and b.is_enabled()), None))
        button.click()

    def lock_text(self):
        elements = self.css("#lock-state")
        return elements[0].text if elements else ""

    def add_rule(self, rule_id, spec=None, fields=None, activate=True):
        """Adds a rule with the page's form, from a spec or from fields."""
        self.click("add-open")
        self.wait("the add form", lambda: self.css("#add-card")[0].is_displayed())
        id_input = self.css("#f-id")[0]
        id_input.clear()
        id_input.send_keys(str(rule_id))
        if spec is not None:
            spec_input = self.css("#f-spec")[0]
            spec_input.clear()
            spec_input.send_keys(spec)
            self.wait(f"spec {spec!r} read, Add enabled", lambda: self.css("#add-submit")[0].is_enabled()
                      and not self.css("#f-spec-help.helper-error"))
            self.shot(f"add-{rule_id}")
        for name, value in (fields or {}).items():
            element = self.css("#f-" + name)[0]
            element.clear()
            element.send_keys(value)
        checkbox = self.css("#f-activate")[0]
        if checkbox.is_selected() != activate:
            checkbox.click()
        self.css("#add-submit")[0].click()

    def shot(self, name, selector="#page"):
        """With --shots DIR, a screenshot of the page (or one element of it) as it is now."""
        if self.args.shots:
            self.css(selector)[0].screenshot(os.path.join(self.args.shots, name + ".png"))

    def check_console(self):
        problems = [entry for entry in self.driver.get_log("browser") if entry["level"] == "SEVERE"]
        for entry in problems:
            log(f"console: {entry['message']}")
        if problems:
            raise Failure(f"{len(problems)} error(s) in the page's console (CSP or script errors)")

    # ---------------------------------------------------------------- the scenario

    def run(self):
        port_active, port_busy, port_added, web_unprivileged = self.ports[:4]
        self.start_cockpit(self.args.web_port)
        self.start_browser()
        self.driver.get(f"http://127.0.0.1:{self.args.web_port}/cockpit/@localhost/pesto/index.html")
        self.wait("the HOST table, unlocked", lambda: self.css('[data-table="HOST"]') and self.lock_text() == "Unlocked")
        self.check_versions()
        refused_alert = self.check_upload_refused(port_added)

        # A rule inserted and activated with busctl appears, live.
        self.insert(1, port_active, "busctl")
        self.wait_row(1, "inactive")
        self.table_call("Activate", "u", 1)
        self.wait_row(1, "active", "1 bound")
        self.check_upload_refused_kept(refused_alert)
        notation = self.row(1).find_element(By.CSS_SELECTOR, "td.col-notation").text
        if notation != f"-t 127.0.0.1/{port_active}":
            raise Failure(f"rule 1 is written {notation!r}, not in pasta's notation")

        # The form never adds what was not typed; a conflicting Add leaves nothing behind.
        self.check_form_never_adds_what_was_not_typed()
        self.check_conflict_leaves_nothing(port_active, 8)

        # A bind failure: the port is held here, so pestod's bind fails and is shown.
        holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        holder.bind(("127.0.0.1", port_busy))
        holder.listen(1)
        self.insert(2, port_busy, "podman")
        self.table_call("Activate", "u", 2)
        self.wait_row(2, "failing", "1 failed (EADDRINUSE)")

        # Two inactive rules for the picture (inactive rules bind nothing): a UDP range to
        # another port, and one on an interface.
        self.table_call("Insert", "ua{sv}", 10, 6, "protocol", "s", "udp", "address", "s", "127.0.0.1",
                        "first-port", "q", 5353, "last-port", "q", 5360, "target-port", "q", 15353, "owner", "s", "pestoctl")
        self.table_call("Insert", "ua{sv}", 11, 5, "protocol", "s", "tcp", "interface", "s", "lo",
                        "first-port", "q", 8443, "target-port", "q", 443, "proxy-protocol", "s", "v2")
        self.wait_row(10, "inactive", "-u 127.0.0.1/5353-5360:15353-15360")
        self.wait_row(11, "inactive", "-t %lo/8443:443")
        # The PROXY protocol key is shown (read-only) with the target.
        self.wait_row(11, "inactive", "(PROXY v2)")

        # The page's transaction: Lock, shown as the lock state.
        self.click("transaction-start")
        self.wait("the lock held by this page", lambda: self.lock_text().startswith("Locked by this page"))
        refused = self.table_call("Insert", "ua{sv}", 9, 2, "protocol", "s", "tcp", "first-port", "q", port_added, check=False)
        if refused.returncode == 0 or "locked by" not in refused.stderr:
            raise Failure(f"busctl's Insert under the page's lock was not refused as Locked: {refused.stderr!r}")
        self.css("#page")[0].screenshot(self.args.screenshot)
        log(f"screenshot: {self.args.screenshot}")

        # Under the lock, a rule added from a spec is in pestod; Cancel rolls it back.
        self.add_rule(3, spec=f"-t 127.0.0.1/{port_added}")
        self.shot("transaction")
        self.wait_row(3, "active", "1 bound")
        self.expect_status(3, r"^buusu true 1 0")
        self.click("transaction-cancel")
        self.confirm_dialog(True)
        self.wait_row_gone(3)
        self.wait("the lock released", lambda: self.lock_text() == "Unlocked")
        self.expect_status(3, r"has no rule 3")

        # The held port is freed: pestod's retry binds it and the failure clears.
        holder.close()
        self.wait_row(2, "active", "1 bound")
        if "failed" in self.row(2).text:
            raise Failure("rule 2 still shows a failure after binding")

        # pestoctl's changes (made under its own lock, then committed) appear and go too.
        pestoctl = os.path.join(os.path.dirname(self.args.pestod), "pestoctl")
        subprocess.run([pestoctl, "--address", self.bus, "-s", "--id", "30", "-A", "-u", f"127.0.0.1/{port_added}"],
                       check=True, timeout=30)
        self.wait_row(30, "active", f"-u 127.0.0.1/{port_added}")
        subprocess.run([pestoctl, "--address", self.bus, "-s", "-D", "-u", f"127.0.0.1/{port_added}"], check=True, timeout=30)
        self.wait_row_gone(30)

        # Rules in pasta's notation, as pestoctl writes them, with IPv6 and target addresses.
        self.table_call("Insert", "ua{sv}", 12, 6, "protocol", "s", "tcp", "address", "s", "::1",
                        "first-port", "q", 9000, "last-port", "q", 9003, "target-address", "s", "::1", "target-port", "q", 9100)
        self.table_call("Insert", "ua{sv}", 13, 4, "protocol", "s", "udp", "address", "s", "0.0.0.0",
                        "first-port", "q", 53, "target-address", "s", "127.0.0.53")
        self.wait_row(13, "inactive")
        self.check_notation()

        # A committed transaction: a rule added from the form's fields under the lock stays.
        self.click("transaction-start")
        self.wait("the lock held by this page", lambda: self.lock_text().startswith("Locked by this page"))
        self.add_rule(4, fields={"address": "127.0.0.1", "first": str(port_added), "owner": "admin"})
        self.wait_row(4, "active", "admin")
        self.click("transaction-commit")
        self.wait("the lock released", lambda: self.lock_text() == "Unlocked")
        self.expect_status(4, r"^buusu true 1 0")

        # Edit: rule 10 replaced by another range, in one transaction of the page's own.
        self.click_row_button(10, "edit")
        self.wait("the edit form for rule 10", lambda: "Edit rule 10" in self.css("#add-card")[0].text)
        spec_input = self.css("#f-spec")[0]
        spec_input.clear()
        spec_input.send_keys("-u 127.0.0.1/5400-5407:15400-15407")
        self.wait("the new spec read", lambda: self.css("#add-submit")[0].is_enabled())
        self.css("#add-submit")[0].click()
        self.wait_row(10, "inactive", "-u 127.0.0.1/5400-5407:15400-15407")
        read = self.table_call("Read", "u", 10).stdout
        if '"first-port" q 5400' not in read or '"target-port" q 15400' not in read:
            raise Failure(f"pestod's rule 10 after the edit: {read}")
        log(f"busctl Read 10: {read.strip()}")

        # Another client's lock: the page names the holder and disables its buttons; the
        # holder's uncommitted rule is shown (reads stay open) and goes when the holder leaves
        # the bus (pestod rolls back).
        from gi.repository import Gio, GLib
        holder = Gio.DBusConnection.new_for_address_sync(
            self.bus, Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION, None, None)
        holder.call_sync(BUS_NAME, MANAGER_PATH, MANAGER, "Lock", None, None, Gio.DBusCallFlags.NONE, -1, None)
        rule = {"protocol": GLib.Variant("s", "tcp"), "first-port": GLib.Variant("q", 5999), "owner": GLib.Variant("s", "holder")}
        holder.call_sync(BUS_NAME, HOST, TABLE, "Insert", GLib.Variant("(ua{sv})", (20, rule)), None, Gio.DBusCallFlags.NONE, -1, None)
        name = holder.get_unique_name()
        self.wait(f"the lock held by {name}", lambda: self.lock_text().startswith(f"Locked by {name}"))
        self.wait_row(20, "inactive", "holder")
        if self.css('[data-rule-id="1"] button[data-action="deactivate"]')[0].is_enabled():
            raise Failure("rule 1's Deactivate is enabled while another client holds the lock")
        self.shot("locked-by-other")
        holder.close_sync(None)
        self.wait_row_gone(20)
        self.wait("the lock released", lambda: self.lock_text() == "Unlocked")

        # Deactivate and activate from the page.
        self.click_row_button(4, "deactivate")
        self.wait_row(4, "inactive")
        self.expect_status(4, r"^buusu false 0 0")
        self.click_row_button(4, "activate")
        self.wait_row(4, "active", "1 bound")
        self.expect_status(4, r"^buusu true 1 0")

        # Cockpit's dark style, a narrow window and a phone, German.
        url = f"http://127.0.0.1:{self.args.web_port}/cockpit/@localhost/pesto/index.html"
        self.check_dark(url, self.args.screenshot.replace(".png", "-dark.png"))
        self.check_narrow(self.args.screenshot)
        self.check_german(url)
        self.wait_row(4, "active")

        # A refused change: rule 5 overlaps active rule 1; activating it is a Conflict,
        # shown by name next to the rule, and pestod keeps it inactive.
        self.add_rule(5, spec=f"-t 127.0.0.1/{port_active}", activate=False)
        self.wait_row(5, "inactive")
        self.click_row_button(5, "activate")
        self.wait("the Conflict error next to rule 5", lambda: any(
            "top.passt.Pesto1.Error.Conflict" in r.text for r in self.css('tr.rule-error[data-rule-id="5"]') if r.is_displayed()))
        self.shot("conflict", '[data-table="HOST"]')
        self.expect_status(5, r"^buusu false 0 0")

        # Delete from the page, after a confirmation: an inactive rule (Delete) and an active
        # one (Apply); the dialog's Cancel keeps the rule.
        self.check_delete_asks(4)
        self.click_row_button(5, "delete")
        self.confirm_dialog(True)
        self.wait_row_gone(5)
        self.expect_status(5, r"has no rule 5")
        self.click_row_button(4, "delete")
        self.confirm_dialog(True)
        self.wait_row_gone(4)
        self.expect_status(4, r"has no rule 4")

        # pestod stops: the page says so; it starts again: the page follows the new one.
        pid = self.pestod_pid()
        os.kill(pid, signal.SIGKILL)
        log(f"killed pestod (pid {pid})")
        self.wait("pestod not running", lambda: any(e.is_displayed() for e in self.css("#not-running")))
        # Nothing can start it here (a private bus without activation files): the page says so.
        self.click("start-service")
        self.wait("why pestod could not be started", lambda: self.css("#start-failed")
                  and "ServiceUnknown" in self.css("#start-failed")[0].text)
        self.shot("not-running")
        self.start_pestod()
        self.wait("the restarted pestod's empty HOST table",
                  lambda: self.css('[data-table="HOST"]') and self.lock_text() == "Unlocked" and self.row(1) is None)
        self.insert(6, port_added, "after-restart")
        self.wait_row(6, "inactive", "after-restart")
        # First match: an active rule shows the ports it wins, and follows the changes live
        # (PortsWon): rule 3, lower ID, on the same port wins it from rule 6 while active.
        self.table_call("Activate", "u", 6)
        self.wait_row(6, "active", "wins 1 of 1 port")
        self.insert(3, port_added, "carve-out")
        self.table_call("Activate", "u", 3)
        self.wait_row(3, "active", "wins 1 of 1 port")
        self.wait_row(6, "active", "wins 0 of 1 port")
        self.shot("first-match", '[data-table="HOST"]')
        self.table_call("Deactivate", "u", 3)
        self.table_call("Delete", "u", 3)
        self.wait_row_gone(3)
        self.wait_row(6, "active", "wins 1 of 1 port")
        if self.args.netns:
            # The new pestod has a namespace, so a SPLICE table too; a -T spec adds to it.
            self.wait("the SPLICE table", lambda: self.css('[data-table="SPLICE"]'))
            self.add_rule(7, spec=f"-T {port_added}")
            self.wait_row(7, "active", f"-T {port_added}", table="SPLICE")
            self.expect_status(7, r"^buusu true 1 0", table="/top/passt/Pesto1/tables/splice")
        self.check_console()

        # A user who may not change the tables (a bridge running as nobody, no
        # administrative access) sees them read-only: no add, no lock, no rule buttons.
        self.start_cockpit(web_unprivileged, bridge_user="nobody")
        self.driver.get(f"http://127.0.0.1:{web_unprivileged}/cockpit/@localhost/pesto/index.html")
        self.wait("rule 6 and the read-only notice, to nobody",
                  lambda: self.row(6) is not None and any(e.is_displayed() for e in self.css("#read-only")))
        self.shot("read-only")
        offered = [b.text for b in self.css("button[data-action], #add-open, #transaction-start, #transaction-commit, "
                                             "#transaction-cancel, #add-submit") if b.is_displayed()]
        if offered:
            raise Failure(f"the read-only page offers {offered}")
        self.check_console()

        # 65,535 rules (pestod's limit), restored from a state file by a new pestod. The page
        # stays open meanwhile: a socket-activated cockpit-ws with no session for 90 s exits.
        self.driver.get(url)
        self.wait("the page again", lambda: self.css('[data-table="HOST"]'))
        os.kill(self.pestod_pid(), signal.SIGKILL)
        state = os.path.join(self.tmp.name, "state-65535")
        self.write_scale_state(state)
        self.children.append(subprocess.Popen([self.args.pestod, "--address", self.bus, "--authorize", "none", "--state", state],
                                              stdout=subprocess.DEVNULL, stderr=self.logfile("pestod-65535")))
        self.check_scale(url)
        self.check_console()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bus", required=True)
    parser.add_argument("--pestod", required=True)
    parser.add_argument("--screenshot", required=True)
    parser.add_argument("--web-port", type=int, required=True)
    parser.add_argument("--control", required=True, help="the fixture's pestod's control socket (--control PATH)")
    parser.add_argument("--netns", help="a network namespace for the restarted pestod (then it has a SPLICE table)")
    parser.add_argument("--shots", help="a directory for screenshots of more steps (for a person to look at)")
    parser.add_argument("--ports", required=True, help="four free TCP ports, comma-separated: three for rules, "
                        "one for a second cockpit-ws whose bridge is unprivileged")
    args = parser.parse_args()

    missing = [p for p in (COCKPIT_WS, COCKPIT_BRIDGE, CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if missing:
        print(f"SKIP: missing {', '.join(missing)}")
        return 77

    # Swift Testing's children inherit a blocked SIGTERM; and orphans of our children
    # (the bridge, Chromium's helpers) become ours to reap.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    def timeout(_signum, _frame):
        raise Failure("the whole run took more than 780 s")
    signal.signal(signal.SIGALRM, timeout)
    signal.alarm(780)  # a last resort: the test never hangs

    test = Test(args)
    passed = False
    try:
        test.run()
        passed = True
        log("PASS")
        return 0
    except Failure as failure:
        log(f"FAIL: {failure}")
        return 1
    except Exception:
        traceback.print_exc()
        log("FAIL: unexpected exception")
        return 1
    finally:
        logs = sorted(n[:-4] for n in os.listdir(test.tmp.name) if n.endswith(".log") and n != "chromedriver.log")
        for name in () if passed else logs:
            path = os.path.join(test.tmp.name, name + ".log")
            if os.path.exists(path) and os.path.getsize(path) > 0:
                with open(path) as f:
                    tail = f.read()[-3000:]
                print(f"--- {name}.log (end)\n{tail}", flush=True)
        test.cleanup()


if __name__ == "__main__":
    sys.exit(main())

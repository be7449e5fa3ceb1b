# SPDX-License-Identifier: GPL-2.0-or-later
"""The Manager's versions and refused uploads on the Cockpit page, checked in Chromium by
test_cockpit.py (class Test):

  * the service line names pestod's release beside the interface's version
    ("pestod 1.2.0 (interface 1.0)"), as the Manager's ProductVersion and Version say, and
    service-version.js falls back to the interface's version alone for a pestod without
    ProductVersion;
  * an upload refused on pestod's control socket (upstream's client, pesto_wire.py, uploads
    a multicast listening address) shows as an alert: the socket, pestod's reason, how many
    rules, the rules in pasta's notation behind a disclosure, which stays open across
    renders; nothing changed in pestod;
  * the alerts are newest first, at most 20 (the older counted in a note), the newest 3 shown
    and the others behind "Show N more", dismissed one by one or all at once; in German with
    Cockpit's language cookie.

Every wait is on the page's DOM or on pestod (busctl), never a fixed sleep.
"""

from selenium.webdriver.common.by import By

import pesto_wire
from page_checks import Failure

KEPT = 20  # upload-refused.js's bound
SHOWN = 3  # the alerts shown before "Show N more"
MULTICAST = "224.0.0.1"


class ManagerChecks:
    """Mixed into test_cockpit.Test: uses its driver, css, wait, busctl and shot helpers."""

    def manager_property(self, name):
        out = self.busctl("get-property", "top.passt.Pesto1", "/top/passt/Pesto1", "top.passt.Pesto1.Manager", name).stdout
        kind, _, value = out.strip().partition(" ")
        if kind != "s":
            raise Failure(f"the Manager's {name} is {out!r}, not a string")
        return value.strip('"')

    def check_versions(self):
        """The service line shows ProductVersion beside Version; without ProductVersion, Version alone."""
        product, contract = self.manager_property("ProductVersion"), self.manager_property("Version")
        expected = f"pestod {product} (interface {contract}) on the system bus"
        self.wait(f"the service line {expected!r}", lambda: self.css("#service-line")[0].text.startswith(expected))
        for manager, text in (({"Version": "1.0"}, "pestod (interface 1.0)"),
                              ({"Version": "1.0", "ProductVersion": ""}, "pestod (interface 1.0)"),
                              ({"Version": "1.0", "ProductVersion": "1.2.0"}, "pestod 1.2.0 (interface 1.0)")):
            got = self.driver.execute_script("return PestoServiceVersion.text(arguments[0])", manager)
            if got != text:
                raise Failure(f"service-version.js writes {got!r} for {manager}, not {text!r}")
        self.log("versions: the service line names the product's and the interface's; falls back without ProductVersion")

    def refusals(self):
        return self.css("#upload-refusals .upload-refused")

    def refused_rules(self, alert):
        return [li.get_attribute("textContent") for li in alert.find_elements(By.CSS_SELECTOR, ".refused-rules li")]

    def last_refused_rule(self, alert):
        """The rule the upload added (after HOST's rules, which upstream's client sends back)."""
        rules = self.refused_rules(alert)
        return rules[-1] if rules else None

    def refuse_upload(self, *rules):
        """Uploads HOST's rules plus `rules` as upstream's client does; pestod refuses it."""
        pesto_wire.upload(self.args.control, [pesto_wire.rule(address, port) for address, port in rules])

    def check_upload_refused(self, port):
        """A refused upload's alert: socket, reason, count, the rules; then newest first, bounded, dismissed."""
        control = self.args.control
        before = self.rule_count()
        self.refuse_upload(("127.0.0.1", port), (MULTICAST, 5000))
        alert = self.wait("the refused upload's alert", lambda: next(iter(self.refusals()), None))
        title = alert.find_element(By.CSS_SELECTOR, ".alert-title").text
        reason = alert.find_element(By.CSS_SELECTOR, ".refused-reason").text
        meta = alert.find_element(By.CSS_SELECTOR, ".refused-meta").text
        if control not in title or MULTICAST not in reason or not meta.startswith("2 rules uploaded"):
            raise Failure(f"the alert says {title!r} / {reason!r} / {meta!r}")
        alert.find_element(By.CSS_SELECTOR, ".refused-details summary").click()
        shown = self.wait("the upload's rules listed", lambda: [li.text for li in alert.find_elements(By.CSS_SELECTOR, ".refused-rules li")
                                                                if li.is_displayed()])
        if shown != [f"-t 127.0.0.1/{port}", f"-t {MULTICAST}/5000"]:
            raise Failure(f"the refused upload's rules are shown as {shown}")
        if self.rule_count() != before:
            raise Failure("pestod's HOST table changed with a refused upload")
        self.driver.execute_script("arguments[0].scrollIntoView()", alert)
        alert.screenshot(self.args.screenshot.replace(".png", "-upload-refused.png"))
        self.log(f"refused upload shown: {title!r}, {reason!r}, {meta!r}, {shown}")
        return alert

    def check_upload_refused_kept(self, alert):
        """The open disclosure survived renders; then the bound, the order and dismissing."""
        if alert.find_element(By.CSS_SELECTOR, ".refused-details").get_attribute("open") is None:
            raise Failure("the refused upload's rule list closed on a later render")
        extra = KEPT + 1
        for n in range(1, extra + 1):
            self.refuse_upload((MULTICAST, 5000 + n))
        newest = f"-t {MULTICAST}/{5000 + extra}"
        self.wait(f"the newest {SHOWN} alerts, newest first, the dropped ones counted", lambda: len(self.refusals()) == SHOWN
                  and self.last_refused_rule(self.refusals()[0]) == newest
                  and "2 earlier refusals are no longer shown" in self.css("#upload-refusals .refusals-dropped")[0].text
                  and self.css("#refusals-more")[0].text == f"Show {KEPT - SHOWN} more refused uploads")
        self.shot("upload-refused-many")
        self.css("#refusals-more")[0].click()
        self.wait(f"all {KEPT} alerts kept", lambda: len(self.refusals()) == KEPT)
        oldest = self.last_refused_rule(self.refusals()[-1])
        if oldest != f"-t {MULTICAST}/{5000 + extra - KEPT + 1}":
            raise Failure(f"the oldest alert kept lists {oldest}")
        self.refusals()[0].find_element(By.CSS_SELECTOR, ".alert-close").click()
        self.wait("the newest alert dismissed", lambda: len(self.refusals()) == KEPT - 1
                  and self.last_refused_rule(self.refusals()[0]) == f"-t {MULTICAST}/{5000 + extra - 1}")
        self.css("#refusals-dismiss-all")[0].click()
        self.wait("every alert dismissed", lambda: not self.css("#upload-refusals"))
        self.log(f"refused uploads: {KEPT} kept newest first, the older counted, dismissed one and all")

    def check_upload_refused_german(self):
        """On the German page (check_german's), a refused upload's alert is in German."""
        self.refuse_upload((MULTICAST, 4999))
        self.wait("the refused upload's alert in German", lambda: self.refusals() and self.refusals()[0].find_element(
            By.CSS_SELECTOR, ".alert-title").text.startswith("Upload am Steuer-Socket")
            and "hochgeladen, abgelehnt um" in self.refusals()[0].text)
        self.shot("upload-refused-german", "#upload-refusals")

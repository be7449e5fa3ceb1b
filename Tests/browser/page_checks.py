# SPDX-License-Identifier: GPL-2.0-or-later
"""The Cockpit page's own behaviours, checked in Chromium by test_cockpit.py (class Test):

  * the shared table of spec cases (Tests/port-spec-cases.json) through cockpit/port-spec.js:
    the same rules, or the same message and piece, as PestoModel's PortSpec (pestoctl);
  * the spec field and the fields never disagree: the edges issue's exact sequences
    (-t 127.0.0.1/35099 then a 0 more, -t 7000 then a 0 more, -t 35093,35094) clear the
    fields, show why, disable Add, and nothing reaches pestod;
  * inline helper text for a bad field, gone once the input is fixed;
  * Add is one atomic change: a conflicting rule leaves nothing behind;
  * Delete and a transaction's Cancel ask first (the dialog's Cancel changes nothing);
  * "Start pestod" says so when nothing can start it;
  * Cockpit's dark style is followed; at 760 px and 390 px nothing overflows sideways and the
    table is stacked (screenshots saved);
  * 65,535 rules: the time to the first rows and to a filter's result (printed, never
    asserted), and paging that keeps the rows in the DOM bounded;
  * the German translation (po/de.po), chosen with Cockpit's language cookie.

Every wait is on the page's DOM or on pestod (busctl), never a fixed sleep.
"""

import json
import os
import subprocess

from selenium.webdriver.common.by import By

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPOSITORY = os.path.dirname(TESTS)
CASES = os.path.join(TESTS, "port-spec-cases.json")
SCALE_RULES = 65535
SCALE_WAIT = 420  # seconds: a bound on waiting (pestod is slow under load), not a timed assertion


class Failure(Exception):
    """A check failed (test_cockpit.py reports it as its own)."""


class PageChecks:
    """Mixed into test_cockpit.Test: uses its driver, css, wait, click, busctl helpers."""

    # ------------------------------------------------------------ the spec grammar

    def check_spec_cases(self):
        """Every case of the shared table, through the page's parser, in the page."""
        with open(CASES) as f:
            table = json.load(f)
        results = self.driver.execute_script("""
            const [cases, ephemeral] = arguments;
            return cases.map((c) => {
                const splice = c.option === "-T" || c.option === "-U";
                const protocol = c.option.toLowerCase() === "-t" ? "tcp" : "udp";
                try {
                    const r = PortSpec.parse(c.spec, protocol, splice ? "SPLICE" : "HOST", ephemeral);
                    return { rules: r.rules.map(({ protocol: _p, ...rest }) => rest), bestEffort: r.bestEffort, none: r.isNone,
                             protocols: r.rules.every((x) => x.protocol === protocol) };
                } catch (e) {
                    return e instanceof PortSpec.SpecError ? { message: e.message, piece: e.piece } : { other: String(e) };
                }
            });""", table["cases"], table["ephemeral"])
        wrong = []
        for case, got in zip(table["cases"], results):
            if "message" in case:
                if got.get("message") != case["message"] or got.get("piece") != case["piece"]:
                    wrong.append((case["option"], case["spec"], got))
            elif (got.get("rules") != case.get("rules", []) or got.get("bestEffort", False) != case.get("bestEffort", False)
                  or got.get("none", False) != case.get("none", False) or not got.get("protocols", False)):
                wrong.append((case["option"], case["spec"], got))
        if wrong:
            raise Failure(f"port-spec.js disagrees with Tests/port-spec-cases.json on {len(wrong)} case(s): {wrong[:5]}")
        self.log(f"port-spec.js agrees with PortSpec on all {len(results)} shared spec cases")
        # The project's rule for new IDs (doc/dbus-api.md, "Choosing rule IDs"), in rule-ids.js.
        for taken, count, expected in (([], 3, [10, 20, 30]), ([1, 25], 2, [30, 40]), ([5, 10], 2, [20, 30]),
                                       ([4294967291], 3, [1, 2, 3]), ([1, 2, 4294967295], 2, [3, 4]),
                                       ([4294967280], 2, [4294967290, 1])):
            got = self.driver.execute_script("return RuleIds.propose(new Set(arguments[0]), arguments[1])", taken, count)
            if got != expected:
                raise Failure(f"rule-ids.js proposes {got} for a table with IDs {taken}, not {expected}")
        self.log("rule-ids.js proposes IDs by the project's rule")

    def check_notation(self):
        """The page writes every rule as pestoctl does (rule-text.js is a port of pestoctl's
        RuleText), and parsing what it writes gives the same text back."""
        pestoctl = os.path.join(os.path.dirname(self.args.pestod), "pestoctl")
        listed = json.loads(subprocess.run([pestoctl, "--address", self.bus, "--json"], capture_output=True,
                                           text=True, check=True, timeout=30).stdout)
        expected = {(t["name"], r["id"]): r["spec"] for t in listed["tables"] for r in t["rules"]}
        if not expected:
            raise Failure(f"pestoctl --json listed no rules: {listed}")
        for (table, rule_id), spec in expected.items():
            shown = self.row(rule_id, table).find_element(By.CSS_SELECTOR, "td.col-notation").text
            if shown != spec:
                raise Failure(f"{table} rule {rule_id}: the page writes {shown!r}, pestoctl {spec!r}")
            again = self.driver.execute_script(
                "const p = PortSpec.parseArgument(arguments[0]); return RuleText.notation(p.result.rules[0], p.table);", spec)
            if again != spec:
                raise Failure(f"rule-text.js parses {spec!r} and writes {again!r}")
        self.log(f"notation as pestoctl's for {len(expected)} rules: {sorted(expected.values())}")
        # More forms, parsed and written back.
        for spec in ("-T 2000-2010:3000-3010", "-t [::1]%lo/2000-2010:[::2]/3000-3010", "-U auto,1000-2000",
                     "-t *%eth0/22", "-t 8080:80", "-t 0.0.0.0/8080:10.88.0.2/80"):
            again = self.driver.execute_script(
                "const p = PortSpec.parseArgument(arguments[0]); return RuleText.notation(p.result.rules[0], p.table);", spec)
            expected_text = spec.replace("*%", "%")
            if again != expected_text:
                raise Failure(f"port-spec.js parses {spec!r} and rule-text.js writes {again!r}")
        # Specs refused, and every other case, as pestoctl's PortSpec decides (the shared table).
        self.check_spec_cases()

    # ------------------------------------------------------------ the form

    def field(self, name):
        return self.css("#f-" + name)[0].get_attribute("value")

    def rule_count(self, table="/top/passt/Pesto1/tables/host"):
        """The table's RuleCount; -1 while pestod is not (yet) on the bus."""
        result = self.busctl("get-property", "top.passt.Pesto1", table, "top.passt.Pesto1.Table", "RuleCount", check=False)
        return int(result.stdout.split()[1]) if result.returncode == 0 else -1

    def type_spec(self, text, clear=True):
        spec = self.css("#f-spec")[0]
        if clear:
            spec.clear()
        spec.send_keys(text)

    def check_form_never_adds_what_was_not_typed(self):
        """The edges issue's sequences: a valid prefix, then one more key that makes it invalid."""
        self.click("add-open")
        self.wait("the add form", lambda: self.css("#add-card")[0].is_displayed())
        before = self.rule_count()
        for prefix, more, kept in (("-t 127.0.0.1/35099", "0", "35099"), ("-t 7000", "0", "7000")):
            self.type_spec(prefix)
            self.wait(f"{prefix!r} read into the fields", lambda: self.field("first") == kept)
            self.type_spec(more, clear=False)
            typed = prefix + more
            self.wait(f"{typed!r}: the fields cleared, the reason shown, Add disabled", lambda: (
                self.field("first") == "" and self.field("address") == ""
                and "past 65535" in self.css("#f-spec-help")[0].text
                and self.css("#f-spec")[0].get_attribute("aria-invalid") == "true"
                and not self.css("#add-submit")[0].is_enabled()))
            self.driver.execute_script("document.getElementById('add-submit').click()")  # a disabled button does nothing
            self.shot("spec-invalid-" + more + prefix.split("/")[-1])
        # A list is several rules: no field keeps the first one; the preview lists both, with IDs by the rule.
        self.type_spec("-t 35093,35094")
        self.wait("-t 35093,35094 as two rules, fields empty and locked", lambda: (
            self.field("first") == "" and not self.css("#f-first")[0].is_enabled()
            and "-t 35093" in self.css("#f-preview")[0].text and "-t 35094" in self.css("#f-preview")[0].text))
        ids = self.driver.execute_script(
            "return [...document.querySelectorAll('#f-preview li')].map((li) => li.textContent)")
        self.log(f"-t 35093,35094 previews {ids}")
        # A field typed wrong: inline helper text, gone when the input changes to a valid one.
        self.type_spec("")
        self.type_spec("-t 2000")
        first = self.css("#f-first")[0]
        first.clear()
        first.send_keys("70000")
        self.wait("the First port's helper text", lambda: "70000" in self.css("#f-first-help")[0].text
                  and self.css("#f-spec")[0].get_attribute("value") == "" and not self.css("#add-submit")[0].is_enabled())
        first.clear()
        first.send_keys("2001")
        self.wait("the helper gone, the spec rewritten from the field", lambda: self.css("#f-first-help")[0].text == ""
                  and self.css("#f-spec")[0].get_attribute("value") == "-t 2001")
        if self.rule_count() != before:
            raise Failure(f"pestod's HOST table went from {before} to {self.rule_count()} rules while nothing valid was added")
        self.css("#add-close")[0].click()
        self.log("no rule reached pestod from an invalid spec or field")

    def check_conflict_leaves_nothing(self, port_active, rule_id):
        """Add of a rule that conflicts with active rule 1: one Apply, refused, nothing left."""
        before = self.rule_count()
        self.add_rule(rule_id, spec=f"-t 127.0.0.1/{port_active}")
        self.wait("the Conflict under the form", lambda: self.css("#add-error")[0].is_displayed()
                  and "Conflict" in self.css("#add-error")[0].text and "Nothing was added" in self.css("#add-error")[0].text)
        self.expect_status(rule_id, r"has no rule")
        if self.rule_count() != before:
            raise Failure("a refused Add left a rule behind")
        # The error describes that Add: it goes as soon as the input changes.
        self.type_spec("1", clear=False)
        self.wait("the old error gone after the input changed", lambda: not self.css("#add-error")[0].is_displayed())
        self.css("#add-close")[0].click()
        self.log("a conflicting Add left nothing behind")

    def confirm_dialog(self, answer):
        """Answers the confirmation dialog: True confirms, False cancels."""
        self.wait("the confirmation dialog", lambda: self.css("#confirm-dialog") and self.css("#confirm-dialog")[0].is_displayed())
        self.css("#confirm-dialog-" + ("confirm" if answer else "cancel"))[0].click()
        self.wait("the dialog closed", lambda: not self.css("#confirm-dialog"))

    def check_delete_asks(self, rule_id):
        """Delete asks first; Cancel in the dialog keeps the rule."""
        self.click_row_button(rule_id, "delete")
        self.wait("the dialog names the rule", lambda: self.css("#confirm-dialog")
                  and f"{rule_id}" in self.css("#confirm-dialog-title")[0].text)
        self.shot("confirm-delete")
        self.confirm_dialog(False)
        self.expect_status(rule_id, r"^buusu")
        self.log(f"Delete of rule {rule_id} asked, and its Cancel kept the rule")

    # ------------------------------------------------------------ look

    def overflow(self):
        return self.driver.execute_script(
            "const d = document.documentElement; return [d.scrollWidth, d.clientWidth]")

    def check_narrow(self, screenshot):
        """At 760 px (and a phone's 390 px): no horizontal overflow, the table stacked."""
        try:
            for width in (760, 390):
                self.driver.set_window_size(width, 1100)
                self.wait(f"{width} px: the stacked table", lambda: self.driver.execute_script(
                    "const r = document.querySelector('tr.rule'); return r && getComputedStyle(r).display === 'block'"))
                scroll, client = self.overflow()
                if scroll > client:
                    raise Failure(f"at {width} px the page is {scroll} px wide: it overflows sideways")
                self.log(f"{width} px: {scroll} px of content in {client} px, stacked")
                self.css("#page")[0].screenshot(screenshot.replace(".png", f"-{width if width == 760 else 'phone'}.png"))
        finally:
            self.driver.set_window_size(1400, 1200)

    def check_dark(self, url, screenshot):
        """Cockpit's dark style (shell:style=dark) is followed at load and when it changes."""
        self.driver.execute_script("localStorage.setItem('shell:style', 'dark')")
        self.driver.get(url)
        self.wait("the dark theme", lambda: self.driver.execute_script(
            "return document.documentElement.classList.contains('pf-theme-dark')") and self.css('tr.rule'))
        background = self.driver.execute_script("return getComputedStyle(document.body).backgroundColor")
        rgb = [int(x) for x in background[background.index("(") + 1:background.index(")")].split(",")[:3]]
        if sum(rgb) > 3 * 64:
            raise Failure(f"the dark theme's background is {background}")
        self.css("#page")[0].screenshot(screenshot)
        self.driver.execute_script("window.dispatchEvent(new CustomEvent('cockpit-style', { detail: { style: 'light' } }))")
        self.wait("back to light when Cockpit says so", lambda: not self.driver.execute_script(
            "return document.documentElement.classList.contains('pf-theme-dark')"))
        self.driver.execute_script("localStorage.removeItem('shell:style')")
        self.log(f"dark style followed (background {background}); screenshot {screenshot}")

    def check_german(self, url):
        """With Cockpit's language cookie set to de, the page speaks German."""
        self.driver.add_cookie({"name": "CockpitLang", "value": "de"})
        self.driver.get(url)
        self.wait("the page in German", lambda: self.css("h1")[0].text == "Portweiterleitung"
                  and self.css('tr.rule') and "Regel" in self.css('[data-table="HOST"] .card-summary')[0].text)
        if self.driver.execute_script("return cockpit.language") != "de":
            raise Failure("cockpit.language is not de")
        self.shot("german")
        self.check_upload_refused_german()  # manager_checks.py
        self.driver.delete_cookie("CockpitLang")
        self.driver.get(url)
        self.wait("the page in English again", lambda: self.css("h1")[0].text == "Port forwarding")
        result = subprocess.run(["/usr/bin/python3", os.path.join(REPOSITORY, "po", "build.py"), "--check"],
                                capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise Failure(f"po/build.py --check: {result.stdout}")
        self.log(f"German translation shown; po/build.py --check: {result.stdout.strip()}")

    # ------------------------------------------------------------ scale

    def write_scale_state(self, path):
        """A state file with 65,535 inactive rules: every port once, TCP and UDP, three owners."""
        owners = ["podman", "cockpit", "ops"]
        with open(path, "w") as f:
            f.write("pestod-state 1\n")
            for port in range(1, SCALE_RULES + 1):
                proto = "tcp" if port % 2 else "udp"
                f.write(f"rule host {port} inactive protocol={proto} address=127.0.0.1 interface= first-port={port} "
                        f"last-port={port} target-address= target-port={port} scan=0 owner={owners[port % 3]}\n")

    def check_scale(self, url):
        """65,535 rules: first rows and a filter timed (reported), paging bounded (asserted)."""
        # pestod's restore and List of 65,535 rules take seconds (debug build, a shared machine).
        self.wait("pestod restored 65,535 rules", lambda: self.rule_count() == SCALE_RULES, timeout=SCALE_WAIT)
        # The open page follows the new pestod: it reads the 65,535 rules once pestod is there.
        self.wait("the open page following the new pestod's 65,535 rules", lambda: self.driver.execute_script(
            "const t = window.pestoTimings; return t && t.tablesRead > t.loadStarted"
            " && document.querySelectorAll('tr.rule').length > 0"
            " && document.querySelector('[data-table=\"HOST\"] .card-summary').textContent.startsWith('65,535')"),
            timeout=SCALE_WAIT)
        live = self.driver.execute_script("const t = window.pestoTimings; return t.tablesRead - t.loadStarted")
        self.log(f"65,535 rules followed live: pestod's GetAll and List answered {live:.0f} ms after the page asked")
        figures = []
        for attempt in (1,):  # one load per run: the spread comes from separate runs
            self.driver.get(url)
            self.wait(f"65,535 rules on the page (load {attempt})", lambda: self.driver.execute_script(
                "return window.pestoTimings && window.pestoTimings.firstRows !== undefined"
                " && document.querySelectorAll('tr.rule').length > 0"), timeout=SCALE_WAIT)
            rows = len(self.css("tr.rule"))
            if rows > 500:
                raise Failure(f"{rows} rule rows in the DOM for 65,535 rules: paging does not bound them")
            first, started, read = self.driver.execute_script(
                "const t = window.pestoTimings; return [t.firstRows, t.loadStarted, t.tablesRead]")
            search = self.css("#filter-search")[0]
            search.send_keys("podman")
            self.wait("the filter's result", lambda: "matching" in self.css('[data-table="HOST"] .pager-info')[0].text)
            filtered = self.driver.execute_script("return window.pestoTimings.lastFilter")
            info = self.css('[data-table="HOST"] .pager-info')[0].text
            if attempt == 1:
                self.driver.execute_script("window.scrollTo(0, 0)")
                self.driver.save_screenshot(self.args.screenshot.replace(".png", "-65535.png"))
            self.css("#filter-state")[0].send_keys("Inactive")
            self.css('[data-table="HOST"] button[data-page="last"]')[0].click()
            self.wait("the last page", lambda: not self.css('[data-table="HOST"] button[data-page="next"]')[0].is_enabled())
            figures.append((first, filtered))
            self.log(f"65,535 rules, load {attempt}: first rows {first:.0f} ms after navigation (pestod's GetAll and List "
                     f"answered {read - started:.0f} ms after the page asked; the page's own work after that "
                     f"{first - read:.0f} ms); filter 'podman' {filtered:.0f} ms ({info}); {rows} rows in the DOM")
        return figures

#!/usr/bin/python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""The Cockpit page's translations: extracts its strings, compiles po/LANG.po for Cockpit.

    po/build.py           writes po/pesto.pot (every string of cockpit/) and, for each
                          po/LANG.po, cockpit/po.LANG.js (what Cockpit's bridge serves as
                          the package's po.js to a user whose language is LANG)
    po/build.py --check   changes nothing; exits 1 when pesto.pot or a po.LANG.js is out of
                          date, or a LANG.po lacks a translation of a string of the page

Strings are found where the page marks them: _("..."), cockpit.gettext("..."),
cockpit.ngettext("one", "many", n) in cockpit/*.js, and the text or the attributes named by
translate="..." in cockpit/index.html. A .po file is read as GNU gettext writes it (msgid,
msgid_plural, msgstr, msgstr[N], continued "..." lines); fuzzy entries are left out.
"""

import html.parser
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(ROOT, "cockpit")
PO = os.path.join(ROOT, "po")
# Plural rules of the languages we ship, as JavaScript (cockpit.ngettext's "plural-forms").
PLURALS = {"de": "(n) => n != 1", "fr": "(n) => n > 1"}

STRING = r'"((?:[^"\\]|\\.)*)"'
CALL = re.compile(r'(?<![\w.])(?:_|cockpit\.gettext)\(\s*' + STRING + r'\s*[,)]')
PLURAL = re.compile(r'cockpit\.ngettext\(\s*' + STRING + r'\s*,\s*' + STRING)


def unescape(text):
    return json.loads('"' + text + '"')


class HTMLStrings(html.parser.HTMLParser):
    """Text and attributes of index.html's elements marked translate="..."."""

    def __init__(self):
        super().__init__()
        self.found = []
        self.stack = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        marks = (attrs.get("translate") or "").split()
        for mark in marks:
            if mark not in ("yes", "translate") and attrs.get(mark):
                self.found.append(attrs[mark])
        if tag not in ("input", "meta", "link", "br", "img"):
            self.stack.append(("yes" in marks or "translate" in marks, []))

    def handle_endtag(self, tag):
        if tag in ("input", "meta", "link", "br", "img") or not self.stack:
            return
        wanted, text = self.stack.pop()
        if wanted:
            self.found.append("".join(text))

    def handle_data(self, data):
        if self.stack:
            self.stack[-1][1].append(data)


def extract():
    """[(msgid, plural or None)] in order of first appearance."""
    seen = {}
    for name in sorted(os.listdir(PAGE)):
        path = os.path.join(PAGE, name)
        if name.endswith(".js") and not name.startswith("po."):
            source = open(path, encoding="utf-8").read()
            for m in PLURAL.finditer(source):
                seen.setdefault(unescape(m.group(1)), unescape(m.group(2)))
            for m in CALL.finditer(source):
                seen.setdefault(unescape(m.group(1)), None)
        elif name.endswith(".html"):
            parser = HTMLStrings()
            parser.feed(open(path, encoding="utf-8").read())
            for text in parser.found:
                seen.setdefault(text, None)
    return list(seen.items())


def quote(text):
    return json.dumps(text, ensure_ascii=False)


def pot(strings):
    lines = ['# Strings of pesto\'s Cockpit page (cockpit/). Made by po/build.py; do not edit.',
             'msgid ""', 'msgstr ""', '"Content-Type: text/plain; charset=UTF-8\\n"', '']
    for msgid, plural in strings:
        lines.append("msgid " + quote(msgid))
        if plural is None:
            lines.append('msgstr ""')
        else:
            lines += ["msgid_plural " + quote(plural), 'msgstr[0] ""', 'msgstr[1] ""']
        lines.append("")
    return "\n".join(lines)


def read_po(path):
    """{msgid: (plural or None, [translations])}, the header and fuzzy entries left out."""
    entries = {}
    entry, key, fuzzy = {}, None, False

    def finish():
        nonlocal entry, fuzzy
        if entry.get("msgid") and not fuzzy:
            forms = [entry[k] for k in sorted(k for k in entry if k.startswith("msgstr"))]
            entries[entry["msgid"]] = (entry.get("msgid_plural"), forms)
        entry, fuzzy = {}, False

    for raw in open(path, encoding="utf-8"):
        line = raw.strip()
        if not line:
            finish()
            continue
        if line.startswith("#,") and "fuzzy" in line:
            fuzzy = True
        if line.startswith("#"):
            continue
        m = re.match(r'^(msgid|msgid_plural|msgstr(?:\[\d+\])?)\s+(".*")$', line)
        if m:
            if m.group(1) == "msgid" and "msgid" in entry:
                finish()
            key = m.group(1)
            entry[key] = json.loads(m.group(2))
        elif line.startswith('"') and key:
            entry[key] += json.loads(line)
    finish()
    return entries


def compile_js(lang, entries, strings):
    """cockpit/po.LANG.js: cockpit.locale({...}) with the page's strings only."""
    parts = ['"": {"plural-forms": %s, "language": %s, "language-direction": "ltr"}' % (PLURALS[lang], quote(lang))]
    for msgid, _plural in strings:
        if msgid in entries and all(entries[msgid][1]):
            plural, forms = entries[msgid]
            parts.append(f"{quote(msgid)}: {json.dumps([plural] + forms, ensure_ascii=False)}")
    return ("// SPDX-License-Identifier: GPL-2.0-or-later\n"
            f"// Made by po/build.py from po/{lang}.po; do not edit.\n"
            "cockpit.locale({\n    " + ",\n    ".join(parts) + "\n});\n")


def main():
    check = "--check" in sys.argv[1:]
    strings = extract()
    outputs = {os.path.join(PO, "pesto.pot"): pot(strings)}
    problems = []
    for name in sorted(os.listdir(PO)):
        if not name.endswith(".po"):
            continue
        lang = name[:-3]
        entries = read_po(os.path.join(PO, name))
        for msgid, plural in strings:
            if msgid not in entries or not all(entries[msgid][1]):
                problems.append(f"po/{name} lacks a translation of {quote(msgid)}")
            elif (entries[msgid][0] is None) != (plural is None):
                problems.append(f"po/{name}: {quote(msgid)} is {'not ' if plural is None else ''}a plural")
        outputs[os.path.join(PAGE, f"po.{lang}.js")] = compile_js(lang, entries, strings)
    for path, text in outputs.items():
        current = open(path, encoding="utf-8").read() if os.path.exists(path) else None
        if current == text:
            continue
        if check:
            problems.append(f"{os.path.relpath(path, ROOT)} is out of date: run po/build.py")
        else:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
    for problem in problems:
        print(problem)
    print(f"{len(strings)} strings; {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

// SPDX-License-Identifier: GPL-2.0-or-later

/* upload-refused.js: the alerts for uploads pestod refused on a control socket.
 *
 * Theory of operation
 * -------------------
 * An upstream pesto client (podman, rootlesskit) uploads whole tables on pestod's control
 * socket (`pestod --control PATH`). Its protocol has no reply: the client has already exited
 * believing the change made when pestod refuses it (an invalid rule, a conflict, a malformed
 * or too slow upload). pestod logs the refusal and emits the Manager's
 * `UploadRefused(s socket, s reason, aa{sv} rules)`; this page is where an administrator sees
 * it. Each signal becomes one inline alert: the socket, the reason (pestod's log line), how
 * many rules the upload had, and those rules in pasta's notation behind a disclosure
 * (rule-text.js; upstream's rules carry no table, so HOST's options name them, as in
 * `pestoctl watch`). The alerts are kept newest first, at most `KEPT`; older ones are
 * dropped and counted in a note, so a client retrying in a loop cannot grow the page without
 * bound. The newest `SHOWN` are shown, the others behind a "Show N more" button, so the
 * tables stay in view. Each alert is dismissed on its own, or all of them at once. They live as long as
 * the page: signals are not replayed, so a refusal before the page opened is in pestod's log
 * (and `pestoctl watch`) only.
 */
"use strict";

const PestoUploadRefused = (() => {
    const _ = cockpit.gettext;
    /** The most alerts kept; the oldest go first. */
    const KEPT = 20;
    /** How many of them are shown until the user asks for all (the tables stay in view). */
    const SHOWN = 3;
    /** The most rules one UploadRefused carries (pestod's bound). */
    const SIGNALLED_RULES = 1024;

    /** The plain value of a Cockpit-encoded variant ({t, v}). */
    const unwrap = (variant) => (variant && typeof variant === "object" && "v" in variant ? variant.v : variant);

    /** One rule of the signal (a{sv} as `Read` returns it) as rule-text.js takes it. */
    function ruleFields(dict) {
        const v = (key, fallback) => (dict && key in dict ? unwrap(dict[key]) : fallback);
        const firstPort = v("first-port", 0);
        return {
            protocol: v("protocol", "tcp"), address: v("address", ""), interface: v("interface", ""),
            firstPort, lastPort: v("last-port", firstPort), targetAddress: v("target-address", ""),
            targetPort: v("target-port", firstPort), scan: v("scan", false), owner: v("owner", ""),
        };
    }

    /** The rules of one refusal in pasta's notation (HOST's options: upstream's rules carry no table). */
    function notations(rules) {
        return (rules || []).map((dict) => RuleText.notation(ruleFields(dict), "HOST"));
    }

    /**
     * Creates the list of refusals. `el` is the page's element helper, `rerender()` asks the
     * page to render again (after a dismissal).
     */
    function create({ el, rerender }) {
        /** Newest first: { key, socket, reason, rules (notations), at (Date) }. */
        const kept = [];
        /** How many older refusals were dropped to keep `KEPT`. */
        let dropped = 0;
        /** The user asked to see every alert kept, not only the newest `SHOWN`. */
        let showAll = false;
        let nextKey = 1;
        /** The alerts' element as last built, reused until the list changes, so a render
         *  caused by another signal leaves a disclosure the user opened open. */
        let built = null;

        /** Records one UploadRefused signal's arguments. */
        function add(socket, reason, rules) {
            kept.unshift({ key: nextKey++, socket: String(socket), reason: String(reason), rules: notations(rules), at: new Date() });
            if (kept.length > KEPT) dropped += kept.splice(KEPT).length;
            built = null;
        }

        /** Dismisses one alert (by its key), or every one when `key` is null. */
        function dismiss(key) {
            if (key === null) {
                kept.length = 0;
                dropped = 0;
                showAll = false;
            } else {
                const at = kept.findIndex((r) => r.key === key);
                if (at >= 0) kept.splice(at, 1);
                if (kept.length === 0) {
                    dropped = 0;
                    showAll = false;
                }
            }
            built = null;
            rerender();
        }

        /** The expandable list of an upload's rules, or a sentence when there were none. */
        function rulesPart(refusal) {
            const count = refusal.rules.length;
            if (count === 0)
                return el("p", { class: "alert-text" }, _("The upload could not be read, so no rules are shown."));
            const summary = count >= SIGNALLED_RULES
                ? cockpit.format(_("The first $0 rules of the upload"), count)
                : cockpit.format(cockpit.ngettext("$0 uploaded rule", "$0 uploaded rules", count), count);
            const list = el("ul", { class: "refused-rules" }, ...refusal.rules.map((text) => el("li", {}, el("code", {}, text))));
            return el("details", { class: "refused-details" }, el("summary", {}, summary), list);
        }

        /** How many rules were uploaded, and when the upload was refused. */
        function meta(count, time) {
            if (count === 0) return cockpit.format(_("Refused at $0."), time);
            if (count >= SIGNALLED_RULES)
                return cockpit.format(_("At least $0 rules uploaded, refused at $1."), count, time);
            return cockpit.format(cockpit.ngettext("$0 rule uploaded, refused at $1.",
                                                   "$0 rules uploaded, refused at $1.", count), count, time);
        }

        /** One refusal as a PatternFly-like inline alert with its close button. */
        function alertFor(refusal) {
            const time = refusal.at.toLocaleTimeString(cockpit.language);
            const close = el("button", {
                type: "button", class: "btn btn-link alert-close", "aria-label": _("Dismiss"), title: _("Dismiss"),
                onclick: () => dismiss(refusal.key),
            }, "×");
            return el("div", { class: "alert alert-danger upload-refused", role: "alert", "data-key": String(refusal.key) },
                      el("p", { class: "alert-title" }, cockpit.format(_("Upload refused on control socket $0"), refusal.socket)),
                      el("p", { class: "alert-text refused-reason" }, refusal.reason),
                      el("p", { class: "alert-text refused-meta" }, meta(refusal.rules.length, time)),
                      rulesPart(refusal), close);
        }

        /** The alerts, newest first (the newest `SHOWN` unless all were asked for), with "Dismiss
         *  all" and the note on dropped ones; null when none. */
        function render() {
            if (kept.length === 0) return null;
            if (built) return built;
            const box = el("div", { id: "upload-refusals", class: "upload-refusals" });
            if (kept.length > 1 || dropped > 0) {
                const bar = el("div", { class: "refusals-bar" });
                if (dropped > 0)
                    bar.append(el("span", { class: "refusals-dropped" },
                                  cockpit.format(cockpit.ngettext("$0 earlier refusal is no longer shown (pestod's log has it).",
                                                                  "$0 earlier refusals are no longer shown (pestod's log has them).",
                                                                  dropped), dropped)));
                bar.append(el("button", { type: "button", class: "btn btn-link", id: "refusals-dismiss-all", onclick: () => dismiss(null) },
                              _("Dismiss all")));
                box.append(bar);
            }
            box.append(...kept.slice(0, showAll ? KEPT : SHOWN).map(alertFor));
            if (kept.length > SHOWN) {
                const label = showAll
                    ? _("Show only the newest")
                    : cockpit.format(cockpit.ngettext("Show $0 more refused upload", "Show $0 more refused uploads", kept.length - SHOWN),
                                     kept.length - SHOWN);
                box.append(el("button", {
                    type: "button", class: "btn btn-link refusals-more", id: "refusals-more", "aria-expanded": String(showAll),
                    onclick: () => { showAll = !showAll; built = null; rerender() },
                }, label));
            }
            built = box;
            return box;
        }

        return { add, dismiss, render, get count() { return kept.length } };
    }

    return { create, notations, KEPT, SHOWN };
})();

// SPDX-License-Identifier: GPL-2.0-or-later

/* rule-form.js: the page's form that adds rules, or replaces one.
 *
 * Theory of operation
 * -------------------
 * The form has two ways in, a pasta-style spec (`-t 127.0.0.1/8080:80`) and the fields, and
 * they never disagree:
 *
 *  - the spec is read by port-spec.js, exactly as pestoctl reads it. A spec of one rule fills
 *    the fields; a spec of several rules (`-t 22,80`, `-t 20-30,~25`) clears and locks the
 *    fields and lists the rules; a spec that cannot be read, or that pestoctl would apply
 *    best effort (`all`, `auto` alone, exclusions only), clears the fields and disables Add,
 *    with the reason under the spec. Nothing of an earlier, valid prefix survives;
 *  - editing a field rewrites the spec from the fields (or empties it while a field is
 *    invalid), so the spec shown is always what would be sent.
 *
 * Every field is checked as it changes; its helper text says what is wrong and goes as soon as
 * the input changes to something valid (the browser's own validation tooltips are off).
 *
 * IDs are proposed by the project's rule (rule-ids.js) and follow the table as it changes
 * until the user types one; several rules of one spec take the proposals in steps of 10.
 *
 * Add is one change: with "Activate" ticked, one Apply that inserts and activates every rule
 * (pestod rolls all of it back on any error, so nothing is left behind); without it, one Insert,
 * or Lock, the Inserts, Commit (Rollback on any error). Inside the page's own transaction the
 * same calls join it; a failure there deletes what this Add inserted. Replacing a rule is one
 * transaction: Deactivate, Delete, Insert, Activate.
 */
"use strict";

const PestoRuleForm = (() => {
    const _ = cockpit.gettext;

    /**
     * Creates the form. `ctx` gives: model, ui, el, sortedTables(), tableCall(path, method,
     * args, signature), transaction(steps), encodeRule(rule), isDenied(error), rerender().
     */
    function create(ctx) {
        const $ = (id) => document.getElementById(id);
        const f = {
            spec: $("f-spec"), table: $("f-table"), id: $("f-id"), protocol: $("f-protocol"), address: $("f-address"),
            interface: $("f-interface"), first: $("f-first"), last: $("f-last"), targetAddress: $("f-target-address"),
            targetPort: $("f-target-port"), owner: $("f-owner"), scan: $("f-scan"), activate: $("f-activate"),
        };
        /** The rules the spec made when it made several (the fields are locked then), else null. */
        let specRules = null;
        /** The spec cannot be added (unreadable or best effort): its message. */
        let specProblem = "";
        /** The user typed an ID: stop following the proposal. */
        let idTouched = false;
        /** A call is on its way. */
        let busy = false;
        /** The rule path being replaced, or null when adding. */
        let replacing = null;
        /** Kept from the replaced rule (the form has no field for them). */
        let kept = { proxyProtocol: "", source: "" };

        const FIELDS = ["protocol", "address", "interface", "first", "last", "targetAddress", "targetPort", "scan"];

        /** Shows or clears a field's inline helper text (pf-c-form__helper-text, error). */
        function helper(name, message) {
            const input = f[name];
            const help = $(input.id + "-help");
            input.setAttribute("aria-invalid", message ? "true" : "false");
            input.classList.toggle("invalid", !!message);
            if (help) {
                help.textContent = message || help.dataset.hint || "";
                help.classList.toggle("helper-error", !!message);
            }
        }

        /** The table the form adds to, with its name. */
        function table() { return ctx.model.tables.get(f.table.value) || null; }

        /** The IDs the table holds. */
        function takenIds(path) {
            const taken = new Set();
            for (const rule of ctx.model.rules.values()) if (rule.Table === path) taken.add(rule.Id);
            if (replacing) { const r = ctx.model.rules.get(replacing); if (r) taken.delete(r.Id) }
            return taken;
        }

        /** `count` IDs for this change: from the typed ID on, or as proposed. */
        function ids(count) {
            const taken = takenIds(f.table.value);
            if (!idTouched || replacing) return RuleIds.propose(taken, count);
            const first = Number(f.id.value);
            const out = [first];
            let candidate = first + 10;
            while (out.length < count && candidate <= 0xffffffff) {
                if (!taken.has(candidate)) { out.push(candidate); candidate += 10 } else candidate++;
            }
            return out;
        }

        /** Puts a rule's fields in the form ("" for defaults). */
        function fill(rule) {
            f.protocol.value = rule.protocol || "tcp";
            f.address.value = rule.address || "";
            f.interface.value = rule.interface || "";
            f.first.value = rule.firstPort ? String(rule.firstPort) : "";
            f.last.value = rule.lastPort && rule.lastPort !== rule.firstPort ? String(rule.lastPort) : "";
            f.targetAddress.value = rule.targetAddress || "";
            f.targetPort.value = rule.targetPort && rule.targetPort !== rule.firstPort ? String(rule.targetPort) : "";
            f.scan.checked = !!rule.scan;
        }

        /** A port field: "" → null, else the port, or a message. */
        function port(input, required) {
            const text = input.value.trim();
            if (text === "") return required ? { error: _("Give a port from 1 to 65535.") } : { value: null };
            if (!/^[0-9]{1,6}$/.test(text)) return { error: cockpit.format(_("\"$0\" is not a port number; give a port from 1 to 65535."), text) };
            const value = Number(text);
            if (value < 1 || value > 65535) return { error: cockpit.format(_("$0 is not a port; ports are 1-65535."), text) };
            return { value };
        }

        /** An address field: "" → "", else the address as pestod writes it, or a message. */
        function addressOf(input) {
            let text = input.value.trim();
            if (text === "") return { value: "" };
            if (text.startsWith("[") && text.endsWith("]")) text = text.slice(1, -1);
            const a = PortSpec.address(text.includes(":") ? 6 : 4, text);
            if (!a) return { error: cockpit.format(_("\"$0\" is not an IP address; write e.g. 127.0.0.1 or ::1."), input.value.trim()) };
            return { value: PortSpec.addressText(a), family: "v4" in a ? 4 : 6 };
        }

        /** Checks every field, shows the helpers; returns the rule, or null when a field is wrong. */
        function fieldsRule() {
            const t = table();
            const splice = t && t.Name === "SPLICE";
            const errors = {};
            const first = port(f.first, true);
            const last = port(f.last, false);
            const target = port(f.targetPort, false);
            const address = addressOf(f.address);
            const targetAddress = addressOf(f.targetAddress);
            const iface = f.interface.value.trim();
            if (first.error) errors.first = first.error;
            if (last.error) errors.last = last.error;
            else if (first.value && last.value !== null && last.value < first.value)
                errors.last = cockpit.format(_("The last port ($0) is below the first ($1); ranges go up."), last.value, first.value);
            const count = first.value ? (last.value || first.value) - first.value : 0;
            if (target.error) errors.targetPort = target.error;
            else if (target.value !== null && target.value + count > 65535)
                errors.targetPort = cockpit.format(_("The target range would end at $0, past 65535."), target.value + count);
            if (address.error) errors.address = address.error;
            else if (splice && address.value) errors.address = _("SPLICE rules listen on the namespace's loopback; leave the address out.");
            if (targetAddress.error) errors.targetAddress = targetAddress.error;
            else if (targetAddress.value) {
                const ta = PortSpec.address(targetAddress.family, targetAddress.value);
                if (/^(0\.0\.0\.0|::)$/.test(targetAddress.value)) errors.targetAddress = _("A wildcard is no target; leave it out to use the table's default target.");
                else if (!address.value && !address.error) errors.targetAddress = _("A target address needs a listening address (0.0.0.0 or ::, for all).");
                else if (address.family && address.family !== targetAddress.family) errors.targetAddress = _("The listening and target addresses must be of one family.");
                else if (ta && (("v4" in ta && (ta.v4 >>> 28 === 0xe || ta.v4 === 0xffffffff)) || ("v6" in ta && ta.v6[0] >> 8 === 0xff)))
                    errors.targetAddress = _("A multicast or broadcast address is no target.");
            }
            if (iface !== "" && (iface === "." || iface === ".." || /[\s/]/.test(iface) || new TextEncoder().encode(iface).length > 15))
                errors.interface = _("An interface name has 1-15 bytes, no \"/\" or spaces (as `ip link` shows it).");
            for (const name of ["first", "last", "targetPort", "address", "targetAddress", "interface"]) helper(name, errors[name]);
            if (Object.keys(errors).length > 0) return null;
            return {
                protocol: f.protocol.value, address: address.value, interface: splice ? "lo" : iface,
                firstPort: first.value, lastPort: last.value || first.value, targetAddress: targetAddress.value,
                targetPort: target.value || first.value, scan: f.scan.checked, owner: f.owner.value.trim(),
                proxyProtocol: kept.proxyProtocol, source: kept.source,
            };
        }

        /** Checks the ID field against the table; returns the message or "". */
        function idProblem(count) {
            const text = f.id.value.trim();
            if (!/^[0-9]{1,10}$/.test(text) || Number(text) > 0xffffffff)
                return _("Give a rule ID from 0 to 4294967295.");
            const taken = takenIds(f.table.value);
            const proposed = ids(count);
            if (proposed.length < count) return _("The table has no free IDs left for these rules.");
            if (taken.has(Number(text))) return cockpit.format(_("ID $0 is taken in this table; the next proposal is $1."), text, RuleIds.propose(taken, 1)[0]);
            return "";
        }

        /** The rules the form would send now, or null (with the reasons shown). */
        function pending() {
            if (specProblem) return null;
            const rules = specRules || [fieldsRule()];
            if (rules.includes(null)) return null;
            return rules.map((rule) => ({ ...rule, owner: f.owner.value.trim(), proxyProtocol: kept.proxyProtocol, source: kept.source }));
        }

        /** Brings the ID proposal, the preview and the Add button in line with the inputs. */
        function refresh() {
            const count = specRules ? specRules.length : 1;
            if (!idTouched && !replacing) f.id.value = String(RuleIds.propose(takenIds(f.table.value), 1)[0] ?? "");
            const rules = pending();
            const idError = idProblem(count);
            helper("id", idError);
            const t = table();
            const preview = $("f-preview");
            preview.replaceChildren();
            if (rules && t && !idError) {
                const list = ids(rules.length);
                for (const [i, rule] of rules.slice(0, 8).entries())
                    preview.append(ctx.el("li", {}, ctx.el("code", {}, RuleText.notation(rule, t.Name)), " ", cockpit.format(_("as ID $0"), list[i])));
                if (rules.length > 8) preview.append(ctx.el("li", {}, cockpit.format(_("… and $0 more"), rules.length - 8)));
            }
            const lockOwner = ctx.model.manager ? ctx.model.manager.LockOwner : "";
            const lockedByOther = lockOwner !== "" && lockOwner !== ctx.model.lockName;
            $("add-submit").disabled = busy || !rules || !!idError || !t || lockedByOther;
            $("add-submit").textContent = replacing ? _("Replace (one transaction)")
                : rules && rules.length > 1 ? cockpit.format(_("Add $0 rules"), rules.length) : _("Add");
        }

        /** The spec changed: read it, fill or clear the fields. */
        function onSpec() {
            const help = $("f-spec-help");
            const text = f.spec.value;
            specRules = null;
            specProblem = "";
            setFieldsLocked(false);
            help.classList.remove("helper-error");
            f.spec.setAttribute("aria-invalid", "false");
            f.spec.classList.remove("invalid");
            if (text.trim() === "") {
                help.textContent = help.dataset.hint;
                refresh();
                return;
            }
            try {
                const parsed = PortSpec.parseArgument(text);
                const wanted = ctx.sortedTables().find((t) => t.Name === parsed.table);
                if (!wanted) throw new PortSpec.SpecError(text, text, cockpit.format(_("pestod has no $0 table (it has one only with a network namespace)."), parsed.table));
                if (!f.table.disabled) f.table.value = wanted.path;
                const { rules, bestEffort, isNone } = parsed.result;
                if (isNone) throw new PortSpec.SpecError(text, "none", _("\"none\" forwards nothing: there is no rule to add."));
                if (bestEffort)
                    throw new PortSpec.SpecError(text, parsed.spec, _("This spec makes best-effort rules over every free port; the page adds exact rules only. Use pestoctl for it."));
                if (replacing && rules.length !== 1) throw new PortSpec.SpecError(text, parsed.spec, _("A rule is replaced by one rule; this spec makes several."));
                f.protocol.value = parsed.protocol;
                if (rules.length === 1) {
                    fill(rules[0]);
                    help.textContent = _("Read into the fields below.");
                } else {
                    fill({});
                    specRules = rules;
                    setFieldsLocked(true);
                    help.textContent = cockpit.format(_("$0 rules, listed below; added together."), rules.length);
                }
                for (const name of ["first", "last", "targetPort", "address", "targetAddress", "interface"]) helper(name, "");
            } catch (error) {
                if (!(error instanceof PortSpec.SpecError)) throw error;
                fill({ protocol: f.protocol.value });
                specProblem = error.message;
                help.textContent = error.message;
                help.classList.add("helper-error");
                f.spec.setAttribute("aria-invalid", "true");
                f.spec.classList.add("invalid");
                for (const name of ["first", "last", "targetPort", "address", "targetAddress", "interface"]) helper(name, "");
            }
            refresh();
        }

        /** A field changed: the spec becomes the fields' notation (empty while a field is wrong). */
        function onField() {
            specRules = null;
            specProblem = "";
            const rule = fieldsRule();
            const t = table();
            f.spec.value = rule && t ? RuleText.notation(rule, t.Name) : "";
            const help = $("f-spec-help");
            help.classList.remove("helper-error");
            f.spec.classList.remove("invalid");
            f.spec.setAttribute("aria-invalid", "false");
            help.textContent = rule ? _("Written from the fields below.") : help.dataset.hint;
            refresh();
        }

        /** Locks or unlocks the single-rule fields (a spec of several rules owns them). */
        function setFieldsLocked(locked) {
            for (const name of FIELDS) f[name].disabled = locked;
        }

        /** Opens the form empty (add) or with `rule` (replace it in one transaction). */
        function open(rule) {
            ctx.renderFormTables();
            $("add-card").hidden = false;
            $("add-error").hidden = true;
            replacing = rule ? rule.path : null;
            kept = { proxyProtocol: rule ? rule.ProxyProtocol || "" : "", source: rule ? rule.Source || "" : "" };
            idTouched = false;
            $("add-title").textContent = rule ? cockpit.format(_("Edit rule $0"), rule.Id) : _("Add rules");
            f.table.disabled = !!rule;
            f.id.disabled = !!rule;
            if (rule) {
                f.table.value = rule.Table;
                f.id.value = String(rule.Id);
                f.owner.value = rule.Owner || "";
                f.activate.checked = rule.Active;
                f.spec.value = RuleText.notation(PestoRuleTable.fields(rule), ctx.model.tables.get(rule.Table).Name);
            } else {
                f.spec.value = "";
                f.owner.value = "cockpit";
                f.activate.checked = true;
            }
            onSpec();
            f.spec.focus();
        }

        /** Adds the rules (one change), or replaces the edited rule in one transaction. */
        async function submit(event) {
            event.preventDefault();
            const rules = pending();
            const t = table();
            if (!rules || !t || idProblem(rules.length) || busy) return;
            const path = t.path;
            const list = ids(rules.length);
            const activate = f.activate.checked;
            const old = replacing ? ctx.model.rules.get(replacing) : null;
            busy = true;
            refresh();
            $("add-error").hidden = true;
            try {
                if (old) {
                    await ctx.transaction(async () => {
                        if (old.Active) await ctx.tableCall(old.Table, "Deactivate", [old.Id], "u");
                        await ctx.tableCall(old.Table, "Delete", [old.Id], "u");
                        await ctx.tableCall(path, "Insert", [old.Id, ctx.encodeRule(rules[0])], "ua{sv}");
                        if (activate) await ctx.tableCall(path, "Activate", [old.Id], "u");
                    });
                    $("add-card").hidden = true;
                } else {
                    await add(path, rules, list, activate);
                    f.spec.value = "";
                    idTouched = false;
                    onSpec();
                    $("f-spec-help").textContent = cockpit.format(cockpit.ngettext("Added rule $0.", "Added rules $0.", list.length), list.join(", "));
                }
            } catch (error) {
                if (ctx.isDenied(error)) ctx.ui.denied = true;
                $("add-error").textContent = PestoLiveModel.describe(error) + " " + _("Nothing was added.");
                $("add-error").hidden = false;
            } finally {
                busy = false;
                refresh();
                ctx.rerender();
            }
        }

        /** Inserts `rules` under `list` IDs as one change; see the header. */
        async function add(path, rules, list, activate) {
            const inserts = rules.map((rule, i) => [list[i], ctx.encodeRule(rule)]);
            if (activate) {
                await ctx.tableCall(path, "Apply", [inserts, [], {}], "a(ua{sv})aua{sv}");
            } else if (inserts.length === 1) {
                await ctx.tableCall(path, "Insert", inserts[0], "ua{sv}");
            } else if (!ctx.model.lockName) {
                await ctx.transaction(async () => { for (const insert of inserts) await ctx.tableCall(path, "Insert", insert, "ua{sv}") });
            } else {
                const done = [];
                try {
                    for (const insert of inserts) {
                        await ctx.tableCall(path, "Insert", insert, "ua{sv}");
                        done.push(insert[0]);
                    }
                } catch (error) {
                    for (const id of done) await ctx.tableCall(path, "Delete", [id], "u").catch(() => {});
                    throw error;
                }
            }
        }

        // pestod's answer to the last Add describes that Add: it goes as soon as the input changes.
        $("add-form").addEventListener("input", () => { $("add-error").hidden = true });
        f.spec.addEventListener("input", onSpec);
        for (const name of FIELDS) f[name].addEventListener("input", onField);
        f.owner.addEventListener("input", refresh);
        f.id.addEventListener("input", () => { idTouched = true; refresh() });
        f.table.addEventListener("change", () => { idTouched = false; if (f.spec.value.trim() !== "" && !specProblem) onField(); else refresh() });
        $("add-form").addEventListener("submit", submit);
        $("add-close").addEventListener("click", () => { $("add-card").hidden = true });

        return { open, refresh, isOpen: () => !$("add-card").hidden };
    }

    return { create };
})();

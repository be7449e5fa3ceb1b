// SPDX-License-Identifier: GPL-2.0-or-later

/* pesto.js: the Cockpit page for pestod's forwarding tables.
 *
 * Theory of operation
 * -------------------
 * live-model.js keeps pestod's objects, followed from D-Bus signals, and the one D-Bus client
 * every call goes through (so the calls of a transaction come from the connection holding
 * the lock). This file wires the page: the service line and alerts, the actions on rules
 * (Activate, Deactivate, Delete after a confirmation: Apply for an active rule), the page's
 * own transaction (Lock … Commit, or Rollback after a confirmation), starting pestod by
 * D-Bus activation with the outcome shown, and the alerts for uploads refused on a control
 * socket (upload-refused.js) under the title, beside pestod's versions (service-version.js). rule-table.js renders the tables (search, filters,
 * sort, paging); rule-form.js is the add/edit form. Errors are kept per rule and shown next to
 * it. Users who may not change the tables (no administrative access, or a refusal from
 * pestod) see them read-only.
 *
 * Renders are batched to one per frame however many signals arrive. Every string the user
 * reads goes through cockpit.gettext (po/, doc/cockpit.md).
 */
"use strict";

(() => {
    const _ = cockpit.gettext;
    const { BUS_NAME, ROOT, MANAGER, TABLE, PROPERTIES, describe, unwrap } = PestoLiveModel;
    const DENIED = ["org.freedesktop.DBus.Error.AccessDenied", "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"];

    /** The page's own state. */
    const ui = {
        /** Rule path → the D-Bus error of the latest action on it. */
        errors: new Map(),
        /** Rule paths with a call in flight. */
        busy: new Set(),
        /** A change was refused for lack of authorisation. */
        denied: false,
        /** A page-level message: { kind, title, text }. */
        notice: null,
        /** "Start pestod": null, "starting", or the error of the last attempt. */
        start: null,
    };

    /** pestod's objects (live-model.js), made by setup(). */
    let model = null;
    let table = null;
    let form = null;
    /** Uploads pestod refused on a control socket since the page opened (upload-refused.js). */
    let uploadRefusals = null;
    const permission = cockpit.permission({ admin: true });
    const $ = (id) => document.getElementById(id);

    // ------------------------------------------------------------------ Calls

    /** Whether an error says the caller may not change the tables. */
    function isDenied(error) { return DENIED.includes(error.name); }

    /** A Table method call. */
    function tableCall(tablePath, method, args, signature) {
        return model.client.call(tablePath, TABLE, method, args, { type: signature });
    }

    /** A Manager method call. */
    function managerCall(method) { return model.client.call(ROOT, MANAGER, method, []); }

    /** Runs an action on a rule; its error is shown next to the rule. */
    function ruleAction(path, action) {
        ui.busy.add(path);
        ui.errors.delete(path);
        scheduleRender();
        return action()
                .catch((error) => {
                    if (isDenied(error)) ui.denied = true;
                    if (model.rules.has(path)) ui.errors.set(path, error);
                    else ui.notice = { kind: "danger", title: _("The change was refused"), text: describe(error) };
                })
                .finally(() => {
                    ui.busy.delete(path);
                    scheduleRender();
                });
    }

    /**
     * Runs `steps` (a function returning a promise) as one transaction: inside this page's
     * open transaction as they are, else between Lock and Commit, rolled back on any error.
     */
    async function transaction(steps) {
        if (model.lockName) return steps();
        await managerCall("Lock");
        try {
            await steps();
            await managerCall("Commit");
        } catch (error) {
            await managerCall("Rollback").catch(() => {});
            throw error;
        } finally {
            await managerCall("Unlock").catch(() => {});
        }
    }

    /** The rule description a{sv} for Insert and Apply: defaults left out. */
    function encodeRule(rule) {
        const dict = { protocol: cockpit.variant("s", rule.protocol), "first-port": cockpit.variant("q", rule.firstPort) };
        if (rule.address) dict.address = cockpit.variant("s", rule.address);
        if (rule.interface) dict.interface = cockpit.variant("s", rule.interface);
        if (rule.lastPort) dict["last-port"] = cockpit.variant("q", rule.lastPort);
        if (rule.targetAddress) dict["target-address"] = cockpit.variant("s", rule.targetAddress);
        if (rule.targetPort) dict["target-port"] = cockpit.variant("q", rule.targetPort);
        if (rule.scan) dict.scan = cockpit.variant("b", true);
        if (rule.owner) dict.owner = cockpit.variant("s", rule.owner);
        if (rule.proxyProtocol) dict["proxy-protocol"] = cockpit.variant("s", rule.proxyProtocol);
        if (rule.source && rule.source !== "pestod") dict.source = cockpit.variant("s", rule.source);
        return dict;
    }

    /** The rule's notation in its table. */
    function notationOf(rule) {
        const t = model.tables.get(rule.Table);
        return RuleText.notation(PestoRuleTable.fields(rule), t ? t.Name : "HOST");
    }

    /** Activates a rule (its sockets bind; failures are shown from the signals). */
    function activate(rule) { return ruleAction(rule.path, () => tableCall(rule.Table, "Activate", [rule.Id], "u")) }
    /** Deactivates a rule (its sockets close). */
    function deactivate(rule) { return ruleAction(rule.path, () => tableCall(rule.Table, "Deactivate", [rule.Id], "u")) }

    /** Deletes a rule after a confirmation; an active one is deactivated and deleted in one Apply. */
    async function remove(rule) {
        const body = document.createElement("div");
        const what = document.createElement("p");
        what.append(cockpit.format(_("Rule $0 forwards $1."), rule.Id, notationOf(rule)));
        body.append(what);
        if (rule.Active) {
            const active = document.createElement("p");
            active.append(cockpit.format(cockpit.ngettext("It is active, with $0 bound socket: it stops forwarding at once.",
                                                          "It is active, with $0 bound sockets: it stops forwarding at once.",
                                                          rule.BoundSockets), rule.BoundSockets));
            body.append(active);
        }
        if (model.lockName) {
            const note = document.createElement("p");
            note.append(_("It is part of this page's transaction until Commit."));
            body.append(note);
        }
        const sure = await PestoDialog.confirm({ title: cockpit.format(_("Delete rule $0?"), rule.Id), body, action: _("Delete") });
        if (!sure) return;
        const current = model.rules.get(rule.path);
        if (!current) return;
        await ruleAction(current.path, () => current.Active
            ? tableCall(current.Table, "Apply", [[], [current.Id], {}], "a(ua{sv})aua{sv}")
            : tableCall(current.Table, "Delete", [current.Id], "u"));
    }

    /** Takes pestod's lock for the page and remembers our unique name as its holder. */
    function startTransaction() {
        managerCall("Lock")
                .then(() => model.client.call(ROOT, PROPERTIES, "Get", [MANAGER, "LockOwner"]))
                .then(([owner]) => {
                    model.lockName = unwrap(owner);
                    ui.notice = null;
                    render();
                })
                .catch((error) => {
                    if (isDenied(error)) ui.denied = true;
                    ui.notice = { kind: "danger", title: _("Cannot start a transaction"), text: describe(error) };
                    render();
                });
    }

    /** Ends this page's transaction: `Commit` keeps the changes, `Rollback` undoes them (after a confirmation). */
    async function endTransaction(how) {
        if (how === "Rollback") {
            const sure = await PestoDialog.confirm({
                title: _("Discard the transaction's changes?"),
                body: _("Every change made since the transaction started is rolled back, and the tables are unlocked."),
                action: _("Discard changes"),
            });
            if (!sure) return;
        }
        managerCall(how)
                .then(() => managerCall("Unlock"))
                .then(() => {
                    model.lockName = "";
                    ui.notice = how === "Commit" ? null : { kind: "info", title: _("Transaction cancelled"), text: _("Every change made since it started was rolled back.") };
                    render();
                })
                .catch((error) => {
                    ui.notice = { kind: "danger", title: cockpit.format(_("$0 failed"), how), text: describe(error) };
                    render();
                });
    }

    /** "Start pestod": a call that starts it by D-Bus activation where that is set up; the outcome is shown. */
    function startService() {
        ui.start = "starting";
        render();
        model.client.call(ROOT, PROPERTIES, "GetAll", [MANAGER])
                .then(() => {
                    ui.start = null;
                    model.load();
                })
                .catch((error) => {
                    ui.start = error;
                    render();
                });
    }

    // ------------------------------------------------------------------ Rendering

    /** document.createElement with attributes and children (text is always text). */
    function el(tag, attributes, ...children) {
        const node = document.createElement(tag);
        for (const [key, value] of Object.entries(attributes || {})) {
            if (key === "class") node.className = value;
            else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
            else node.setAttribute(key, value);
        }
        for (const child of children) if (child !== null && child !== undefined) node.append(child);
        return node;
    }

    let renderPending = false;
    /** Renders once at the next frame, however many signals arrive before it. */
    function scheduleRender() {
        if (renderPending) return;
        renderPending = true;
        window.requestAnimationFrame(() => {
            renderPending = false;
            render();
        });
    }

    /** Whether the page may offer changes. */
    function readOnly() { return permission.allowed === false || ui.denied; }

    /** Tables in display order: HOST, then SPLICE. */
    function sortedTables() {
        return [...model.tables.values()].sort((a, b) => (a.Name === "HOST" ? 0 : 1) - (b.Name === "HOST" ? 0 : 1));
    }

    /** Brings the whole page in line with the model. */
    function render() {
        renderHeader();
        renderAlerts();
        table.render(sortedTables());
        $("filters").hidden = model.tables.size === 0;
        renderFormTables();
        if (form.isOpen()) form.refresh();
    }

    /** The service line (version, tables, lock state) and which toolbar buttons show. */
    function renderHeader() {
        const running = !!model.owner && !!model.manager;
        const lockOwner = running ? model.manager.LockOwner : "";
        const mine = lockOwner !== "" && lockOwner === model.lockName;
        const line = $("service-line");
        line.replaceChildren();
        if (model.owner === undefined) {
            line.append(_("Connecting to pestod…"));
        } else if (model.owner === null) {
            line.append(_("pestod is not running"));
        } else if (!running) {
            line.append(_("Reading pestod's tables…"));
        } else {
            const names = sortedTables().map((t) => t.Name).join(" · ");
            line.append(cockpit.format(_("$0 on the system bus · tables: $1 · "), PestoServiceVersion.text(model.manager), names));
            const lock = el("span", { id: "lock-state", class: "lock " + (lockOwner === "" ? "lock-free" : mine ? "lock-mine" : "lock-other") });
            if (lockOwner === "") lock.append(_("Unlocked"));
            else if (mine) lock.append(cockpit.format(_("Locked by this page ($0): changes are one transaction until Commit or Cancel"), lockOwner));
            else lock.append(cockpit.format(_("Locked by $0: changes from others are refused until it unlocks"), lockOwner));
            line.append(lock);
        }
        const editable = running && !readOnly();
        $("add-open").hidden = !editable;
        $("add-open").disabled = lockOwner !== "" && !mine;
        $("transaction-start").hidden = !editable || mine;
        $("transaction-start").disabled = lockOwner !== "";
        $("transaction-commit").hidden = !editable || !mine;
        $("transaction-cancel").hidden = !editable || !mine;
        if (!editable) $("add-card").hidden = true;
    }

    /** A PatternFly-like inline alert. */
    function alert(kind, title, text, ...extra) {
        return el("div", { class: "alert alert-" + kind, role: "alert" },
                  el("p", { class: "alert-title" }, title), text ? el("p", { class: "alert-text" }, text) : null, ...extra);
    }

    /** Not running (and the outcome of "Start pestod"), the latest page-level notice, read-only. */
    function renderAlerts() {
        const box = $("alerts");
        box.replaceChildren();
        if (model.owner === null) {
            const starting = ui.start === "starting";
            const button = el("button", { type: "button", class: "btn btn-secondary", id: "start-service", onclick: startService },
                              starting ? _("Starting pestod…") : _("Start pestod"));
            button.disabled = starting;
            box.append(alert("warning", _("pestod is not running"),
                             cockpit.format(_("Nothing owns $0 on the system bus. This page shows the tables as soon as pestod starts (systemctl start pestod, or D-Bus activation: the button below asks the bus to start it)."), BUS_NAME),
                             button));
            box.lastChild.id = "not-running";
            if (ui.start && ui.start !== "starting") {
                box.append(alert("danger", _("pestod could not be started"),
                                 cockpit.format(_("The bus answered: $0. Nothing on this system starts $1 on demand: install pestod's D-Bus service file, or start it with systemctl start pestod."),
                                                describe(ui.start), BUS_NAME)));
                box.lastChild.id = "start-failed";
            }
        } else {
            ui.start = null;
        }
        if (ui.notice) {
            const close = el("button", { type: "button", class: "btn btn-link alert-close", "aria-label": _("Close"), onclick: () => { ui.notice = null; render() } }, "×");
            box.append(alert(ui.notice.kind, ui.notice.title, ui.notice.text, close));
            box.lastChild.id = "notice";
        }
        const refusals = uploadRefusals.render();
        if (refusals) box.append(refusals);
        if (model.manager && readOnly()) {
            box.append(alert("info", _("Read-only"),
                             _("You are not allowed to change the forwarding tables. Turn on administrative access (top right in Cockpit) to edit them.")));
            box.lastChild.id = "read-only";
        }
    }

    /** The form's table choices follow the tables pestod has. */
    function renderFormTables() {
        const select = $("f-table");
        const wanted = sortedTables().map((t) => t.path);
        const have = [...select.options].map((o) => o.value);
        if (wanted.join() === have.join()) return;
        const selected = select.value;
        select.replaceChildren(...sortedTables().map((t) => el("option", { value: t.path }, t.Name)));
        if (wanted.includes(selected)) select.value = selected;
    }

    /** Wires the static elements, opens the D-Bus client and renders. */
    function setup() {
        cockpit.translate();
        document.documentElement.lang = cockpit.language;
        for (const help of document.querySelectorAll(".helper")) help.dataset.hint = help.textContent;
        uploadRefusals = PestoUploadRefused.create({ el, rerender: render });
        const ctx = {
            ui, el, readOnly, sortedTables, tableCall, transaction, encodeRule, isDenied, renderFormTables,
            rerender: scheduleRender,
            actions: { activate, deactivate, remove, edit: (rule) => form.open(rule) },
        };
        model = PestoLiveModel.create({
            changed: () => { table.invalidate(); scheduleRender() },
            ruleRemoved: (path) => ui.errors.delete(path),
            lockLost: (text) => { ui.notice = { kind: "warning", title: _("The transaction ended"), text } },
            problem: (title, text) => { ui.notice = { kind: "danger", title, text } },
            uploadRefused: (socket, reason, rules) => {
                uploadRefusals.add(socket, reason, rules);
                scheduleRender();
            },
        });
        ctx.model = model;
        table = PestoRuleTable.create(ctx);
        table.wireToolbar(scheduleRender);
        form = PestoRuleForm.create(ctx);
        $("add-open").addEventListener("click", () => form.open(null));
        $("transaction-start").addEventListener("click", startTransaction);
        $("transaction-commit").addEventListener("click", () => endTransaction("Commit"));
        $("transaction-cancel").addEventListener("click", () => endTransaction("Rollback"));
        permission.addEventListener("changed", render);
        render();
    }

    document.addEventListener("DOMContentLoaded", setup);
})();

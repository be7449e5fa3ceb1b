// SPDX-License-Identifier: GPL-2.0-or-later

/* pesto.js: the Cockpit page for pestod's forwarding tables.
 *
 * Theory of operation
 * -------------------
 * live-model.js keeps pestod's objects, followed from D-Bus signals, and the one D-Bus client
 * every call goes through (so the calls of a transaction come from the connection holding
 * the lock). This file renders that model and turns the user's actions into pestod's
 * methods: Insert and Activate from the form, Activate, Deactivate, Delete (Apply for an
 * active rule) and an edit as one transaction on each rule, Lock … Commit or Rollback for the
 * page's own transaction. Errors are kept per rule and shown next to it. Users who may not
 * change the tables (no administrative access, or a refusal from pestod) see them read-only.
 *
 * Rendering is keyed: each table and each rule keeps its DOM elements, updated in place, so
 * a signal never replaces a button under the user's pointer, and renders are batched to one
 * per frame however many signals arrive.
 */
"use strict";

(() => {
    const { BUS_NAME, ROOT, MANAGER, TABLE, PROPERTIES, describe, unwrap } = PestoLiveModel;
    const DENIED = ["org.freedesktop.DBus.Error.AccessDenied", "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"];

    /** The page's own state. */
    const ui = {
        /** The proxy-protocol of the rule being edited ("" for a new one): the page shows the
         *  key read-only and carries it over into the replacement, so an edit never drops it. */
        keptProxyProtocol: "",
        /** Likewise its source ("" for a new one: pestod's default). */
        keptSource: "",
        /** Rule path → the D-Bus error of the latest action on it. */
        errors: new Map(),
        /** Rule paths with a call in flight. */
        busy: new Set(),
        /** A change was refused for lack of authorisation. */
        denied: false,
        /** A page-level message: { kind, title, text }. */
        notice: null,
        /** The rule path the add form replaces, or null when it adds. */
        replacing: null,
    };

    /** pestod's objects (live-model.js), made by setup(). */
    let model = null;
    const permission = cockpit.permission({ admin: true });

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
                    else ui.notice = { kind: "danger", title: "The change was refused", text: describe(error) };
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

    /** The rule description a{sv} for Insert: defaults left out. */
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

    /** A Rule object's properties as the notation helpers take them. */
    function ruleFields(r) {
        return {
            protocol: r.Protocol, address: r.Address, interface: r.Interface, firstPort: r.FirstPort, lastPort: r.LastPort,
            targetAddress: r.TargetAddress, targetPort: r.TargetPort, scan: r.Scan, owner: r.Owner,
            proxyProtocol: r.ProxyProtocol || "", source: r.Source || "pestod"
        };
    }

    /** Activates a rule (its sockets bind; failures are shown from the signals). */
    function activate(rule) { return ruleAction(rule.path, () => tableCall(rule.Table, "Activate", [rule.Id], "u")); }
    /** Deactivates a rule (its sockets close). */
    function deactivate(rule) { return ruleAction(rule.path, () => tableCall(rule.Table, "Deactivate", [rule.Id], "u")); }

    /** Deletes a rule; an active one is deactivated and deleted in one Apply. */
    function remove(rule) {
        return ruleAction(rule.path, () => rule.Active
            ? tableCall(rule.Table, "Apply", [[], [rule.Id], {}], "a(ua{sv})aua{sv}")
            : tableCall(rule.Table, "Delete", [rule.Id], "u"));
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
                    ui.notice = { kind: "danger", title: "Cannot start a transaction", text: describe(error) };
                    render();
                });
    }

    /** Ends this page's transaction: `Commit` keeps the changes, `Rollback` undoes them. */
    function endTransaction(how) {
        managerCall(how)
                .then(() => managerCall("Unlock"))
                .then(() => {
                    model.lockName = "";
                    ui.notice = how === "Commit" ? null : { kind: "info", title: "Transaction cancelled", text: "Every change made since it started was rolled back." };
                    render();
                })
                .catch((error) => {
                    ui.notice = { kind: "danger", title: how + " failed", text: describe(error) };
                    render();
                });
    }

    // ------------------------------------------------------------------ Rendering

    const $ = (id) => document.getElementById(id);

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
        renderTables();
        renderFormTables();
    }

    /** The service line (version, tables, lock state) and which toolbar buttons show. */
    function renderHeader() {
        const running = !!model.owner && !!model.manager;
        const lockOwner = running ? model.manager.LockOwner : "";
        const mine = lockOwner !== "" && lockOwner === model.lockName;
        const line = $("service-line");
        line.replaceChildren();
        if (model.owner === undefined) {
            line.append("Connecting to pestod…");
        } else if (model.owner === null) {
            line.append("pestod is not running");
        } else if (!running) {
            line.append("Reading pestod's tables…");
        } else {
            const names = sortedTables().map((t) => t.Name).join(" and ");
            line.append(`pestod ${model.manager.Version} on the system bus · ${names} table${model.tables.size === 1 ? "" : "s"} · `);
            const lock = el("span", { id: "lock-state", class: "lock " + (lockOwner === "" ? "lock-free" : mine ? "lock-mine" : "lock-other") });
            if (lockOwner === "") lock.append("Unlocked");
            else if (mine) lock.append(`Locked by this page (${lockOwner}): changes are one transaction until Commit or Cancel`);
            else lock.append(`Locked by ${lockOwner}: changes from others are refused until it unlocks`);
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

    /** Not running, the latest page-level notice, read-only. */
    function renderAlerts() {
        const box = $("alerts");
        box.replaceChildren();
        if (model.owner === null) {
            box.append(alert("warning", "pestod is not running",
                             `Nothing owns ${BUS_NAME} on the system bus. This page shows the tables as soon as pestod starts ` +
                             "(systemctl start pestod, or D-Bus activation: the button below makes a call that starts it where it is installed).",
                             el("button", { type: "button", class: "btn btn-secondary", id: "start-service", onclick: () => model.load() }, "Start pestod")));
            box.lastChild.id = "not-running";
        }
        if (ui.notice) {
            const close = el("button", { type: "button", class: "btn btn-link alert-close", "aria-label": "Close", onclick: () => { ui.notice = null; render() } }, "×");
            box.append(alert(ui.notice.kind, ui.notice.title, ui.notice.text, close));
            box.lastChild.id = "notice";
        }
        if (model.manager && readOnly()) {
            box.append(alert("info", "Read-only",
                             "You are not allowed to change the forwarding tables. Turn on administrative access (top right in Cockpit) to edit them."));
            box.lastChild.id = "read-only";
        }
    }

    /** Table path → { section, tbody, summary, empty, rows: Map rule path → row record }. */
    const tableViews = new Map();

    /** One card per table, HOST first; cards of tables that went away are removed. */
    function renderTables() {
        const container = $("tables");
        for (const [path, view] of tableViews) {
            if (!model.tables.has(path)) {
                view.section.remove();
                tableViews.delete(path);
            }
        }
        for (const table of sortedTables()) {
            let view = tableViews.get(table.path);
            if (!view) {
                view = createTableView(table);
                tableViews.set(table.path, view);
            }
            container.append(view.section);
            updateTableView(view, table);
        }
    }

    const COLUMNS = ["State", "ID", "Rule", "Protocol", "Address", "Interface", "Ports", "Target", "Owner", "Sockets", ""];

    /** A table's card: header with counters, the rules table, the empty note. */
    function createTableView(table) {
        const tbody = el("tbody");
        const summary = el("span", { class: "card-summary" });
        const empty = el("p", { class: "empty" }, "No rules. Add one here, with pestoctl, or with busctl.");
        const title = table.Name === "HOST" ? "HOST table · inbound" : table.Name === "SPLICE" ? "SPLICE table · outbound" : table.Name + " table";
        const section = el("section", { class: "card table-card", "data-table": table.Name },
                           el("header", { class: "card-header" }, el("h2", {}, title), summary),
                           el("table", { class: "rules" },
                              el("thead", {}, el("tr", {}, ...COLUMNS.map((c) => el("th", { scope: "col" }, c)))),
                              tbody),
                           empty);
        return { section, tbody, summary, empty, rows: new Map() };
    }

    /** Updates a card in place: counters, and one row per rule in ID order (rows are reused). */
    function updateTableView(view, table) {
        view.summary.textContent = `${table.RuleCount} rule${table.RuleCount === 1 ? "" : "s"} · ${table.ActiveCount} active · ` +
            `${table.SocketCount} socket${table.SocketCount === 1 ? "" : "s"} of ${table.MaxSockets}`;
        const rules = [...model.rules.values()].filter((r) => r.Table === table.path).sort((a, b) => a.Id - b.Id);
        const present = new Set(rules.map((r) => r.path));
        for (const [path, row] of view.rows) {
            if (!present.has(path)) {
                row.tr.remove();
                row.errorRow.remove();
                view.rows.delete(path);
            }
        }
        for (const rule of rules) {
            let row = view.rows.get(rule.path);
            if (!row) {
                row = createRow(rule);
                view.rows.set(rule.path, row);
            }
            view.tbody.append(row.tr, row.errorRow);
            updateRow(row, rule, table);
        }
        view.empty.hidden = rules.length > 0;
    }

    /** A rule's row, its buttons (bound to the rule's path, not to a snapshot) and its error row. */
    function createRow(rule) {
        const cells = {};
        const tr = el("tr", { class: "rule", "data-rule-id": String(rule.Id) });
        for (const name of ["state", "id", "notation", "protocol", "address", "interface", "ports", "target", "owner", "sockets", "actions"]) {
            cells[name] = el("td", { class: "col-" + name, "data-label": name });
            tr.append(cells[name]);
        }
        const buttons = {
            activate: el("button", { type: "button", class: "btn btn-secondary btn-sm", "data-action": "activate" }, "Activate"),
            deactivate: el("button", { type: "button", class: "btn btn-secondary btn-sm", "data-action": "deactivate" }, "Deactivate"),
            edit: el("button", { type: "button", class: "btn btn-link btn-sm", "data-action": "edit" }, "Edit"),
            delete: el("button", { type: "button", class: "btn btn-danger-link btn-sm", "data-action": "delete" }, "Delete"),
        };
        const path = rule.path;
        const current = () => model.rules.get(path);
        buttons.activate.addEventListener("click", () => current() && activate(current()));
        buttons.deactivate.addEventListener("click", () => current() && deactivate(current()));
        buttons.delete.addEventListener("click", () => current() && remove(current()));
        buttons.edit.addEventListener("click", () => current() && openForm(current()));
        const actions = el("span", { class: "actions" }, buttons.activate, buttons.deactivate, buttons.edit, buttons.delete);
        cells.actions.append(actions);
        const errorText = el("span", { class: "rule-error-text" });
        const dismiss = el("button", { type: "button", class: "btn btn-link btn-sm", "aria-label": "Dismiss" }, "Dismiss");
        dismiss.addEventListener("click", () => { ui.errors.delete(path); render() });
        const errorRow = el("tr", { class: "rule-error", "data-rule-id": String(rule.Id) },
                            el("td", { colspan: String(COLUMNS.length) }, errorText, dismiss));
        return { tr, cells, actions, buttons, errorRow, errorText };
    }

    /** Updates a rule's row in place from the model. */
    function updateRow(row, rule, table) {
        const fields = ruleFields(rule);
        const failing = rule.BindFailures > 0;
        const state = !rule.Active ? "inactive" : failing ? "failing" : "active";
        row.tr.className = "rule state-" + state + (ui.busy.has(rule.path) ? " busy" : "");
        row.cells.state.replaceChildren(el("span", { class: "badge badge-" + state },
                                          state === "active" ? "Active" : state === "failing" ? "Failing" : "Inactive"));
        row.cells.id.textContent = String(rule.Id);
        row.cells.notation.replaceChildren(el("code", {}, RuleText.notation(fields, table.Name)));
        row.cells.protocol.textContent = rule.Protocol.toUpperCase();
        row.cells.address.textContent = rule.Address || "any";
        row.cells.interface.textContent = rule.Interface || "any";
        row.cells.ports.textContent = RuleText.range(rule.FirstPort, rule.LastPort);
        const targetLast = Math.min(65535, rule.TargetPort + rule.LastPort - rule.FirstPort);
        row.cells.target.textContent = (rule.TargetAddress || "default") + " port " + RuleText.range(rule.TargetPort, targetLast) +
            (rule.Scan ? " (scan)" : "") + (rule.ProxyProtocol ? ` (PROXY ${rule.ProxyProtocol})` : "") +
            (rule.Source === "client" ? " (from the client's address)" : "");
        row.cells.owner.textContent = rule.Owner || "—";
        row.cells.sockets.replaceChildren();
        if (rule.Active) row.cells.sockets.append(el("span", { class: "bound" }, `${rule.BoundSockets} bound`));
        if (rule.Active && table.OverlapPolicy === "first-match") {
            // First match (doc/overlap.md): how many of its ports this rule wins now.
            const ports = rule.LastPort - rule.FirstPort + 1;
            row.cells.sockets.append(el("span", { class: "won" }, `wins ${rule.PortsWon} of ${ports} port${ports === 1 ? "" : "s"}`));
        }
        if (rule.BindFailures > 0) {
            row.cells.sockets.append(el("span", { class: "failed" },
                                        `${rule.BindFailures} failed` + (rule.LastError ? ` (${rule.LastError})` : "")));
        } else if (rule.LastError) {
            row.cells.sockets.append(el("span", { class: "last-error" }, `last error ${rule.LastError}`));
        }
        if (!rule.Active && rule.BindFailures === 0 && !rule.LastError) row.cells.sockets.append("—");

        const editable = !readOnly();
        const lockOwner = model.manager ? model.manager.LockOwner : "";
        const lockedByOther = lockOwner !== "" && lockOwner !== model.lockName;
        row.actions.hidden = !editable;
        row.buttons.activate.hidden = rule.Active;
        row.buttons.deactivate.hidden = !rule.Active;
        for (const button of Object.values(row.buttons)) button.disabled = ui.busy.has(rule.path) || lockedByOther;

        const error = ui.errors.get(rule.path);
        row.errorRow.hidden = !error;
        row.errorText.textContent = error ? describe(error) : "";
    }

    // ------------------------------------------------------------------ The add / edit form

    const form = {
        spec: () => $("f-spec"), table: () => $("f-table"), id: () => $("f-id"), protocol: () => $("f-protocol"),
        address: () => $("f-address"), interface: () => $("f-interface"), first: () => $("f-first"), last: () => $("f-last"),
        targetAddress: () => $("f-target-address"), targetPort: () => $("f-target-port"), owner: () => $("f-owner"),
        scan: () => $("f-scan"), activate: () => $("f-activate"),
    };

    /** The form's table choices follow the tables pestod has. */
    function renderFormTables() {
        const select = form.table();
        const wanted = sortedTables().map((t) => t.path);
        const have = [...select.options].map((o) => o.value);
        if (wanted.join() === have.join()) return;
        const selected = select.value;
        select.replaceChildren(...sortedTables().map((t) => el("option", { value: t.path }, t.Name)));
        if (wanted.includes(selected)) select.value = selected;
    }

    /** The next unused ID in a table. */
    function nextId(tablePath) {
        let max = 0;
        for (const r of model.rules.values()) if (r.Table === tablePath) max = Math.max(max, r.Id);
        return max + 1;
    }

    /** Opens the form empty (add) or filled with `rule` (edit: replace it in one transaction). */
    function openForm(rule) {
        renderFormTables();
        $("add-card").hidden = false;
        $("add-error").hidden = true;
        ui.replacing = rule ? rule.path : null;
        ui.keptProxyProtocol = rule ? (rule.ProxyProtocol || "") : "";
        ui.keptSource = rule ? (rule.Source || "") : "";
        $("add-card").querySelector("h2").textContent = rule ? `Edit rule ${rule.Id}` : "Add a rule";
        $("add-submit").textContent = rule ? "Replace (one transaction)" : "Add";
        form.table().disabled = !!rule;
        if (rule) {
            form.table().value = rule.Table;
            fillFields(ruleFields(rule));
            form.id().value = String(rule.Id);
            form.activate().checked = rule.Active;
            form.spec().value = RuleText.notation(ruleFields(rule), model.tables.get(rule.Table).Name);
        } else {
            form.spec().value = "";
            fillFields({ protocol: "tcp", address: "", interface: "", firstPort: "", lastPort: "", targetAddress: "", targetPort: "", scan: false, owner: "cockpit" });
            form.id().value = String(nextId(form.table().value));
            form.activate().checked = true;
        }
        updatePreview();
        form.spec().focus();
    }

    /** Puts a rule into the form's fields; defaults stay empty. */
    function fillFields(rule) {
        form.protocol().value = rule.protocol || "tcp";
        form.address().value = rule.address;
        form.interface().value = rule.interface;
        form.first().value = rule.firstPort ? String(rule.firstPort) : "";
        form.last().value = rule.lastPort && rule.lastPort !== rule.firstPort ? String(rule.lastPort) : "";
        form.targetAddress().value = rule.targetAddress;
        form.targetPort().value = rule.targetPort && rule.targetPort !== rule.firstPort ? String(rule.targetPort) : "";
        form.scan().checked = !!rule.scan;
        if (rule.owner !== undefined && rule.owner !== "") form.owner().value = rule.owner;
    }

    /** The rule the form's fields describe (not validated: pestod does that). */
    function formRule() {
        const number = (input) => (input.value.trim() === "" ? 0 : Number(input.value));
        const first = number(form.first());
        return {
            protocol: form.protocol().value, address: form.address().value.trim(), interface: form.interface().value.trim(),
            firstPort: first, lastPort: number(form.last()) || first, targetAddress: form.targetAddress().value.trim(),
            targetPort: number(form.targetPort()) || first, scan: form.scan().checked, owner: form.owner().value,
            proxyProtocol: ui.keptProxyProtocol, source: ui.keptSource,
        };
    }

    /** The notation of what the form will send, next to its button. */
    function updatePreview() {
        const rule = formRule();
        const table = model.tables.get(form.table().value);
        $("f-preview").textContent = rule.firstPort && table ? RuleText.notation(rule, table.Name) : "";
    }

    /** The spec field changed: parse it into the fields. */
    function onSpecInput() {
        const help = $("f-spec-help");
        const text = form.spec().value;
        if (text.trim() === "") {
            help.textContent = "Fills the fields below; or fill them in yourself.";
            help.className = "helper";
            return;
        }
        try {
            const { table, rule } = RuleText.parse(text);
            if (table) {
                const path = sortedTables().find((t) => t.Name === table);
                if (!path) throw new RuleText.SpecError(`pestod has no ${table} table (it has one only with a network namespace)`);
                if (!form.table().disabled) form.table().value = path.path;
            }
            fillFields({ ...rule, protocol: rule.protocol || form.protocol().value });
            help.textContent = "Parsed into the fields below.";
            help.className = "helper";
        } catch (error) {
            help.textContent = error.message;
            help.className = "helper helper-error";
        }
        updatePreview();
    }

    /** Adds the rule (Insert, then Activate if ticked), or replaces the edited rule in one transaction. */
    function submitForm(event) {
        event.preventDefault();
        const rule = formRule();
        const tablePath = form.table().value;
        const id = Number(form.id().value);
        const activateIt = form.activate().checked;
        const replacing = ui.replacing ? model.rules.get(ui.replacing) : null;
        const insert = () => tableCall(tablePath, "Insert", [id, encodeRule(rule)], "ua{sv}");
        const activateNew = () => (activateIt ? tableCall(tablePath, "Activate", [id], "u") : Promise.resolve());
        let work;
        if (replacing) {
            work = transaction(async () => {
                if (replacing.Active) await tableCall(replacing.Table, "Deactivate", [replacing.Id], "u");
                await tableCall(replacing.Table, "Delete", [replacing.Id], "u");
                await insert();
                await activateNew();
            });
        } else {
            work = insert().then(activateNew);
        }
        $("add-submit").disabled = true;
        work.then(() => {
            $("add-error").hidden = true;
            if (replacing) {
                $("add-card").hidden = true;
            } else {
                form.id().value = String(Math.max(id + 1, nextId(tablePath)));
            }
        }).catch((error) => {
            if (isDenied(error)) ui.denied = true;
            $("add-error").textContent = describe(error);
            $("add-error").hidden = false;
            render();
        }).finally(() => { $("add-submit").disabled = false });
    }

    /** Wires the static elements, opens the D-Bus client and renders. */
    function setup() {
        $("add-open").addEventListener("click", () => openForm(null));
        $("add-close").addEventListener("click", () => { $("add-card").hidden = true });
        $("add-form").addEventListener("submit", submitForm);
        form.spec().addEventListener("input", onSpecInput);
        for (const name of ["protocol", "address", "interface", "first", "last", "targetAddress", "targetPort", "scan", "table"])
            form[name]().addEventListener("input", updatePreview);
        form.table().addEventListener("change", () => { if (!ui.replacing) form.id().value = String(nextId(form.table().value)) });
        $("transaction-start").addEventListener("click", startTransaction);
        $("transaction-commit").addEventListener("click", () => endTransaction("Commit"));
        $("transaction-cancel").addEventListener("click", () => endTransaction("Rollback"));
        permission.addEventListener("changed", render);
        model = PestoLiveModel.create({
            changed: scheduleRender,
            ruleRemoved: (path) => ui.errors.delete(path),
            lockLost: (text) => { ui.notice = { kind: "warning", title: "The transaction ended", text } },
            problem: (title, text) => { ui.notice = { kind: "danger", title, text } },
        });
        render();
    }

    document.addEventListener("DOMContentLoaded", setup);
})();

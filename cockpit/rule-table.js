// SPDX-License-Identifier: GPL-2.0-or-later

/* rule-table.js: the page's rule tables: one card per pestod table, with search, filters,
 * sortable columns and paging.
 *
 * Theory of operation
 * -------------------
 * pestod allows 65,535 rules per table, so the page never puts every rule in the DOM: each
 * card shows one page of rows (50 by default), and the rows of that page are keyed by rule
 * path and updated in place, so a signal never replaces a button under the user's pointer.
 *
 * The work per render is linear in the rules, with no per-rule allocation beyond the first
 * time a rule is seen: each rule gets its search text (ID, notation, owner, addresses) once,
 * cached on its model object (a rule's fields never change; only its state does). The filter
 * and the order of each table are cached under a key (model version, filters, sort), so a
 * render caused by a signal that changed nothing visible to the filter reuses them. The
 * search box, the filters (state, protocol, owner) and the sort are shared by the tables;
 * paging is per table. Each render records how long it took in `window.pestoTimings`, which
 * the browser test reads (times are reported, never asserted).
 *
 * Below 768 px (PatternFly's md breakpoint) pesto.css stacks each row into a block whose
 * cells carry their column name (data-label), as PatternFly's grid table does.
 */
"use strict";

const PestoRuleTable = (() => {
    const _ = cockpit.gettext;
    const PAGE_SIZES = [20, 50, 100, 500];

    /** The columns: key, title, and how rules compare by it (null: not sortable). */
    const COLUMNS = [
        { key: "state", title: () => _("State"), compare: (a, b) => stateRank(a) - stateRank(b) },
        { key: "id", title: () => _("ID"), compare: (a, b) => a.Id - b.Id },
        { key: "notation", title: () => _("Rule"), compare: (a, b) => text(a).notation.localeCompare(text(b).notation) },
        { key: "protocol", title: () => _("Protocol"), compare: (a, b) => a.Protocol.localeCompare(b.Protocol) },
        { key: "address", title: () => _("Address"), compare: (a, b) => (a.Address || "").localeCompare(b.Address || "") },
        { key: "interface", title: () => _("Interface"), compare: (a, b) => (a.Interface || "").localeCompare(b.Interface || "") },
        { key: "ports", title: () => _("Ports"), compare: (a, b) => a.FirstPort - b.FirstPort || a.LastPort - b.LastPort },
        { key: "target", title: () => _("Target"), compare: null },
        { key: "owner", title: () => _("Owner"), compare: (a, b) => (a.Owner || "").localeCompare(b.Owner || "") },
        { key: "sockets", title: () => _("Sockets"), compare: (a, b) => (a.BoundSockets || 0) - (b.BoundSockets || 0) },
        { key: "actions", title: () => "", compare: null },
    ];

    /** active < failing < inactive. */
    function stateRank(rule) { return !rule.Active ? 2 : rule.BindFailures > 0 ? 1 : 0; }

    /** A rule's state name. */
    function stateOf(rule) { return ["active", "failing", "inactive"][stateRank(rule)]; }

    /** The rule's notation and search text, computed once per rule object. */
    function text(rule) {
        if (!rule.__text) {
            const notation = RuleText.notation(PestoRuleTable.fields(rule), rule.__tableName || "HOST");
            rule.__text = {
                notation,
                search: [String(rule.Id), notation, rule.Owner || "", rule.Address || "", rule.Interface || "",
                         rule.TargetAddress || "", rule.Protocol].join("\n").toLowerCase(),
            };
        }
        return rule.__text;
    }

    /** A Rule object's properties as the notation helpers take them. */
    function fields(r) {
        return {
            protocol: r.Protocol, address: r.Address, interface: r.Interface, firstPort: r.FirstPort, lastPort: r.LastPort,
            targetAddress: r.TargetAddress, targetPort: r.TargetPort, scan: r.Scan, owner: r.Owner,
            proxyProtocol: r.ProxyProtocol || "", source: r.Source || "pestod"
        };
    }

    /**
     * Creates the tables' view. `ctx` gives: model, ui ({ errors, busy }), readOnly(),
     * actions ({ activate, deactivate, remove, edit }) and el (the element helper).
     */
    function create(ctx) {
        const { el } = ctx;
        const $ = (id) => document.getElementById(id);
        const state = { search: "", status: "all", protocol: "all", owner: "all", sort: "id", descending: false, pageSize: 50 };
        /** Table path → view. */
        const views = new Map();
        let version = 0;
        const timings = (window.pestoTimings = window.pestoTimings || { renders: 0 });

        /** The model changed: cached filters and orders are stale. */
        function invalidate() { version++; }

        /** The filter toolbar's inputs update the shared state. */
        function wireToolbar(rerender) {
            const onChange = () => {
                timings.filterStarted = performance.now();
                state.search = $("filter-search").value.trim().toLowerCase();
                state.status = $("filter-state").value;
                state.protocol = $("filter-protocol").value;
                state.owner = $("filter-owner").value;
                for (const view of views.values()) view.page = 0;
                rerender();
            };
            for (const id of ["filter-search", "filter-state", "filter-protocol", "filter-owner"]) $(id).addEventListener("input", onChange);
            $("filter-clear").addEventListener("click", () => {
                $("filter-search").value = "";
                $("filter-state").value = "all";
                $("filter-protocol").value = "all";
                $("filter-owner").value = "all";
                onChange();
            });
        }

        /** The owner filter offers the owners pestod's rules have. */
        function renderOwners() {
            const owners = new Set();
            for (const rule of ctx.model.rules.values()) owners.add(rule.Owner || "");
            const select = $("filter-owner");
            const wanted = ["all", ...[...owners].sort()];
            const have = [...select.options].map((o) => o.value);
            if (wanted.join("\n") === have.join("\n")) return;
            const selected = select.value;
            select.replaceChildren(...wanted.map((o) => el("option", { value: o }, o === "all" ? _("All owners") : o === "" ? _("(none)") : o)));
            select.value = wanted.includes(selected) ? selected : "all";
            if (select.value !== selected) state.owner = "all";
        }

        /** Renders every table card in `tables` (display order) into #tables. */
        function render(tables) {
            const started = performance.now();
            const container = $("tables");
            const byTable = new Map(tables.map((t) => [t.path, []]));
            for (const rule of ctx.model.rules.values()) {
                const list = byTable.get(rule.Table);
                if (list) list.push(rule);
            }
            for (const [path, view] of views) {
                if (!byTable.has(path)) {
                    view.section.remove();
                    views.delete(path);
                }
            }
            renderOwners();
            let shown = 0;
            for (const table of tables) {
                let view = views.get(table.path);
                if (!view) {
                    view = createView(table);
                    views.set(table.path, view);
                }
                container.append(view.section);
                shown += updateView(view, table, byTable.get(table.path));
            }
            const total = ctx.model.rules.size;
            timings.renders++;
            timings.lastRender = performance.now() - started;
            if (timings.filterStarted !== undefined) {
                timings.lastFilter = performance.now() - timings.filterStarted;
                timings.filterStarted = undefined;
            }
            if (total > 0 && shown > 0 && timings.firstRows === undefined) timings.firstRows = performance.now();
        }

        /** A table's card: header with counters, the rules table, pagination, the empty note. */
        function createView(table) {
            const tbody = el("tbody");
            const summary = el("span", { class: "card-summary" });
            const empty = el("p", { class: "empty" });
            const title = table.Name === "HOST" ? _("HOST table · inbound") : table.Name === "SPLICE" ? _("SPLICE table · outbound") : table.Name;
            const headerCells = COLUMNS.map((column) => {
                const th = el("th", { scope: "col", class: "col-" + column.key });
                if (column.compare) {
                    const button = el("button", { type: "button", class: "sort", "data-sort": column.key }, column.title(), el("span", { class: "sort-icon", "aria-hidden": "true" }));
                    button.addEventListener("click", () => {
                        state.descending = state.sort === column.key ? !state.descending : false;
                        state.sort = column.key;
                        ctx.rerender();
                    });
                    th.append(button);
                } else {
                    th.append(column.title());
                }
                return th;
            });
            const pager = createPager(table);
            const section = el("section", { class: "card table-card", "data-table": table.Name },
                               el("header", { class: "card-header" }, el("h2", {}, title), summary),
                               el("div", { class: "table-scroll" },
                                  el("table", { class: "rules", "aria-label": title },
                                     el("thead", {}, el("tr", {}, ...headerCells)), tbody)),
                               empty, pager.element);
            return { section, tbody, summary, empty, headerCells, pager, rows: new Map(), page: 0, cache: null };
        }

        /** The pagination bar of a card (pf-c-pagination, compact). */
        function createPager(table) {
            const info = el("span", { class: "pager-info" });
            const size = el("select", { class: "pager-size", "aria-label": _("Rules per page") },
                            ...PAGE_SIZES.map((n) => el("option", { value: String(n) }, cockpit.format(_("$0 per page"), n))));
            size.value = String(state.pageSize);
            const button = (action, label, symbol) => el("button", { type: "button", class: "btn btn-plain", "data-page": action, "aria-label": label, title: label }, symbol);
            const first = button("first", _("First page"), "«");
            const previous = button("previous", _("Previous page"), "‹");
            const next = button("next", _("Next page"), "›");
            const last = button("last", _("Last page"), "»");
            const element = el("nav", { class: "pager", "aria-label": cockpit.format(_("Pages of the $0 table"), table.Name) },
                               info, size, first, previous, next, last);
            return { element, info, size, first, previous, next, last };
        }

        /** The rules of one table after the filters, in the chosen order (cached). */
        function visibleRules(view, table, rules) {
            const key = [version, state.search, state.status, state.protocol, state.owner, state.sort, state.descending].join("\u0001");
            if (view.cache && view.cache.key === key) return view.cache.rules;
            const column = COLUMNS.find((c) => c.key === state.sort) || COLUMNS[1];
            const list = [];
            for (const rule of rules) {
                rule.__tableName = table.Name;
                if (state.status !== "all" && stateOf(rule) !== state.status) continue;
                if (state.protocol !== "all" && rule.Protocol !== state.protocol) continue;
                if (state.owner !== "all" && (rule.Owner || "") !== state.owner) continue;
                if (state.search && !text(rule).search.includes(state.search)) continue;
                list.push(rule);
            }
            const sign = state.descending ? -1 : 1;
            list.sort((a, b) => sign * (column.compare(a, b) || a.Id - b.Id));
            view.cache = { key, rules: list };
            return list;
        }

        /** Updates a card in place; returns the number of rows shown. */
        function updateView(view, table, rules) {
            const rulesText = cockpit.format(cockpit.ngettext("$0 rule", "$0 rules", table.RuleCount), table.RuleCount.toLocaleString(cockpit.language));
            view.summary.textContent = [rulesText, cockpit.format(_("$0 active"), table.ActiveCount.toLocaleString(cockpit.language)),
                                        cockpit.format(cockpit.ngettext("$0 socket of $1", "$0 sockets of $1", table.SocketCount),
                                                       table.SocketCount.toLocaleString(cockpit.language), table.MaxSockets.toLocaleString(cockpit.language))].join(" · ");
            for (const [i, column] of COLUMNS.entries()) {
                const th = view.headerCells[i];
                if (!column.compare) continue;
                const sorted = state.sort === column.key;
                if (sorted) th.setAttribute("aria-sort", state.descending ? "descending" : "ascending");
                else th.removeAttribute("aria-sort");
            }
            const visible = visibleRules(view, table, rules);
            const pages = Math.max(1, Math.ceil(visible.length / state.pageSize));
            view.page = Math.min(view.page, pages - 1);
            const from = view.page * state.pageSize;
            const slice = visible.slice(from, from + state.pageSize);

            const present = new Set(slice.map((r) => r.path));
            for (const [path, row] of view.rows) {
                if (!present.has(path)) {
                    row.tr.remove();
                    row.errorRow.remove();
                    view.rows.delete(path);
                }
            }
            for (const rule of slice) {
                let row = view.rows.get(rule.path);
                if (!row) {
                    row = createRow(rule);
                    view.rows.set(rule.path, row);
                }
                view.tbody.append(row.tr, row.errorRow);
                updateRow(row, rule, table);
            }

            const filtered = visible.length !== rules.length;
            view.empty.hidden = slice.length > 0;
            view.empty.textContent = rules.length === 0 ? _("No rules. Add one here, with pestoctl, or with busctl.")
                : _("No rule matches the search and filters.");
            const pager = view.pager;
            pager.element.hidden = visible.length <= PAGE_SIZES[0] && view.page === 0;
            const range = visible.length === 0 ? "0" : `${(from + 1).toLocaleString(cockpit.language)}–${(from + slice.length).toLocaleString(cockpit.language)}`;
            pager.info.textContent = filtered
                ? cockpit.format(_("$0 of $1 matching ($2 in the table)"), range, visible.length.toLocaleString(cockpit.language), rules.length.toLocaleString(cockpit.language))
                : cockpit.format(_("$0 of $1"), range, visible.length.toLocaleString(cockpit.language));
            pager.first.disabled = pager.previous.disabled = view.page === 0;
            pager.next.disabled = pager.last.disabled = view.page >= pages - 1;
            if (!pager.wired) {
                pager.wired = true;
                const go = (page) => () => { view.page = page(); ctx.rerender() };
                pager.first.addEventListener("click", go(() => 0));
                pager.previous.addEventListener("click", go(() => Math.max(0, view.page - 1)));
                pager.next.addEventListener("click", go(() => view.page + 1));
                pager.last.addEventListener("click", go(() => Number.MAX_SAFE_INTEGER));
                pager.size.addEventListener("change", () => {
                    state.pageSize = Number(pager.size.value);
                    for (const other of views.values()) { other.page = 0; other.pager.size.value = pager.size.value }
                    ctx.rerender();
                });
            }
            return slice.length;
        }

        /** A rule's row, its buttons (bound to the rule's path, not to a snapshot) and its error row. */
        function createRow(rule) {
            const cells = {};
            const tr = el("tr", { class: "rule", "data-rule-id": String(rule.Id) });
            for (const column of COLUMNS) {
                cells[column.key] = el("td", { class: "col-" + column.key, "data-label": column.title() });
                tr.append(cells[column.key]);
            }
            const buttons = {
                activate: el("button", { type: "button", class: "btn btn-secondary btn-sm", "data-action": "activate" }, _("Activate")),
                deactivate: el("button", { type: "button", class: "btn btn-secondary btn-sm", "data-action": "deactivate" }, _("Deactivate")),
                edit: el("button", { type: "button", class: "btn btn-link btn-sm", "data-action": "edit" }, _("Edit")),
                delete: el("button", { type: "button", class: "btn btn-danger-link btn-sm", "data-action": "delete" }, _("Delete")),
            };
            const path = rule.path;
            const current = () => ctx.model.rules.get(path);
            for (const [name, button] of Object.entries(buttons))
                button.addEventListener("click", () => current() && ctx.actions[name === "delete" ? "remove" : name](current()));
            const actions = el("span", { class: "actions" }, buttons.activate, buttons.deactivate, buttons.edit, buttons.delete);
            cells.actions.append(actions);
            const errorText = el("span", { class: "rule-error-text" });
            const dismiss = el("button", { type: "button", class: "btn btn-link btn-sm", "aria-label": _("Dismiss") }, _("Dismiss"));
            dismiss.addEventListener("click", () => { ctx.ui.errors.delete(path); ctx.rerender() });
            const errorRow = el("tr", { class: "rule-error", "data-rule-id": String(rule.Id) },
                                el("td", { colspan: String(COLUMNS.length) }, errorText, dismiss));
            return { tr, cells, actions, buttons, errorRow, errorText };
        }

        /** Updates a rule's row in place from the model. */
        function updateRow(row, rule, table) {
            const status = stateOf(rule);
            row.tr.className = "rule state-" + status + (ctx.ui.busy.has(rule.path) ? " busy" : "");
            row.cells.state.replaceChildren(el("span", { class: "badge badge-" + status },
                                              status === "active" ? _("Active") : status === "failing" ? _("Failing") : _("Inactive")));
            row.cells.id.textContent = String(rule.Id);
            row.cells.notation.replaceChildren(el("code", {}, text(rule).notation));
            row.cells.protocol.textContent = rule.Protocol.toUpperCase();
            row.cells.address.textContent = rule.Address || _("any");
            row.cells.interface.textContent = rule.Interface || _("any");
            row.cells.ports.textContent = RuleText.range(rule.FirstPort, rule.LastPort);
            const targetLast = Math.min(65535, rule.TargetPort + rule.LastPort - rule.FirstPort);
            row.cells.target.textContent = cockpit.format(_("$0 port $1"), rule.TargetAddress || _("default"), RuleText.range(rule.TargetPort, targetLast)) +
                (rule.Scan ? " " + _("(scan)") : "") + (rule.ProxyProtocol ? ` (PROXY ${rule.ProxyProtocol})` : "") +
                (rule.Source === "client" ? " " + _("(from the client's address)") : "");
            row.cells.owner.textContent = rule.Owner || "—";
            row.cells.sockets.replaceChildren();
            if (rule.Active) row.cells.sockets.append(el("span", { class: "bound" }, cockpit.format(_("$0 bound"), rule.BoundSockets)));
            if (rule.Active && table.OverlapPolicy === "first-match") {
                // First match (doc/overlap.md): how many of its ports this rule wins now.
                const ports = rule.LastPort - rule.FirstPort + 1;
                row.cells.sockets.append(el("span", { class: "won" },
                                            cockpit.format(cockpit.ngettext("wins $0 of $1 port", "wins $0 of $1 ports", ports), rule.PortsWon, ports)));
            }
            if (rule.BindFailures > 0) {
                row.cells.sockets.append(el("span", { class: "failed" },
                                            cockpit.format(_("$0 failed"), rule.BindFailures) + (rule.LastError ? ` (${rule.LastError})` : "")));
            } else if (rule.LastError) {
                row.cells.sockets.append(el("span", { class: "last-error" }, cockpit.format(_("last error $0"), rule.LastError)));
            }
            if (!rule.Active && rule.BindFailures === 0 && !rule.LastError) row.cells.sockets.append("—");

            const lockOwner = ctx.model.manager ? ctx.model.manager.LockOwner : "";
            const lockedByOther = lockOwner !== "" && lockOwner !== ctx.model.lockName;
            row.actions.hidden = ctx.readOnly();
            row.buttons.activate.hidden = rule.Active;
            row.buttons.deactivate.hidden = !rule.Active;
            for (const button of Object.values(row.buttons)) button.disabled = ctx.ui.busy.has(rule.path) || lockedByOther;

            const error = ctx.ui.errors.get(rule.path);
            row.errorRow.hidden = !error;
            row.errorText.textContent = error ? PestoLiveModel.describe(error) : "";
        }

        return { render, invalidate, wireToolbar, state };
    }

    return { create, fields, stateOf };
})();

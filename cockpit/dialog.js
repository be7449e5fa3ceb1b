// SPDX-License-Identifier: GPL-2.0-or-later

/* dialog.js: a confirmation dialog in PatternFly's modal pattern (pf-c-modal-box, small, with a
 * warning or danger title): a backdrop over the page, the question, and two buttons, the
 * action first and Cancel second. Escape, Cancel and a click on the backdrop cancel; focus
 * goes to Cancel, so Enter never confirms a destructive action by accident, and comes back to
 * where it was when the dialog closes. One dialog at a time.
 */
"use strict";

const PestoDialog = (() => {
    const _ = cockpit.gettext;
    let open = null;

    /** document.createElement with a class and children. */
    function node(tag, className, ...children) {
        const element = document.createElement(tag);
        if (className) element.className = className;
        for (const child of children) if (child !== null && child !== undefined) element.append(child);
        return element;
    }

    /**
     * Asks `title` with `body` (text or a node); resolves true when the user confirms with the
     * button labelled `action`, false otherwise. `danger` styles the action as destructive.
     */
    function confirm({ title, body, action, danger = true, id = "confirm-dialog" }) {
        if (open) open(false);
        return new Promise((resolve) => {
            const before = document.activeElement;
            const ok = node("button", "btn " + (danger ? "btn-danger" : "btn-primary"), action);
            ok.type = "button";
            ok.id = id + "-confirm";
            const cancel = node("button", "btn btn-link", _("Cancel"));
            cancel.type = "button";
            cancel.id = id + "-cancel";
            const heading = node("h1", "modal-title", node("span", "modal-title-icon", danger ? "⚠" : "ℹ"), " ", title);
            heading.id = id + "-title";
            const box = node("div", "modal-box" + (danger ? " modal-danger" : ""),
                             node("header", "modal-header", heading),
                             node("div", "modal-body", body),
                             node("footer", "modal-footer", ok, cancel));
            box.id = id;
            box.setAttribute("role", "dialog");
            box.setAttribute("aria-modal", "true");
            box.setAttribute("aria-labelledby", heading.id);
            const backdrop = node("div", "modal-backdrop", box);

            const close = (answer) => {
                if (open !== close) return;
                open = null;
                document.removeEventListener("keydown", onKey, true);
                backdrop.remove();
                if (before && before.focus) before.focus();
                resolve(answer);
            };
            const onKey = (event) => {
                if (event.key === "Escape") {
                    event.preventDefault();
                    close(false);
                } else if (event.key === "Tab") {
                    // Keep focus inside the dialog.
                    event.preventDefault();
                    (document.activeElement === ok ? cancel : ok).focus();
                }
            };
            ok.addEventListener("click", () => close(true));
            cancel.addEventListener("click", () => close(false));
            backdrop.addEventListener("click", (event) => { if (event.target === backdrop) close(false) });
            document.addEventListener("keydown", onKey, true);
            open = close;
            document.body.append(backdrop);
            cancel.focus();
        });
    }

    return { confirm };
})();

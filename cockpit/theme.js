// SPDX-License-Identifier: GPL-2.0-or-later

/* theme.js: follows Cockpit's light or dark style.
 *
 * Cockpit's shell keeps the user's choice ("auto", "light" or "dark", from the user menu) in
 * localStorage under "shell:style"; pages live in iframes of the same origin and see it.
 * "auto" follows the browser's prefers-color-scheme. The shell announces a change with a
 * "cockpit-style" event carrying { style }, and other frames see the storage change. This
 * file sets the class PatternFly's dark theme uses, `pf-theme-dark` (PatternFly 4, Cockpit
 * 287's), on <html>; pesto.css switches its colours on it. It runs before the body is
 * parsed, so the page never flashes light.
 */
"use strict";

(() => {
    const query = window.matchMedia ? window.matchMedia("(prefers-color-scheme: dark)") : null;

    /** The stored style, "auto" when there is none or storage is refused. */
    function storedStyle() {
        try {
            return window.localStorage.getItem("shell:style") || "auto";
        } catch (_error) {
            return "auto";
        }
    }

    /** Applies `style` ("auto", "light", "dark"; the stored one when not given). */
    function apply(style) {
        const chosen = style || storedStyle();
        const dark = chosen === "dark" || (chosen === "auto" && !!query && query.matches);
        document.documentElement.classList.toggle("pf-theme-dark", dark);
    }

    window.addEventListener("storage", (event) => { if (event.key === "shell:style") apply() });
    window.addEventListener("cockpit-style", (event) => apply(event.detail && event.detail.style));
    if (query) query.addEventListener("change", () => apply());
    apply();
})();

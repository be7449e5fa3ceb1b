// SPDX-License-Identifier: GPL-2.0-or-later

/* service-version.js: pestod's versions as the page's service line names them.
 *
 * The Manager has two: `ProductVersion`, pestod's release (the number `pestod --version` and
 * `pestoctl --version` print), and `Version`, the D-Bus contract's. The page shows both,
 * "pestod 1.2.0 (interface 1.0)"; a pestod older than `ProductVersion` has only the
 * interface's, and the page says just that rather than passing it off as the release.
 */
"use strict";

const PestoServiceVersion = (() => {
    const _ = cockpit.gettext;

    /** The versions of a Manager's properties ({ Version, ProductVersion }) as one phrase. */
    function text(manager) {
        const product = manager && typeof manager.ProductVersion === "string" ? manager.ProductVersion : "";
        const contract = manager && typeof manager.Version === "string" ? manager.Version : "";
        if (product !== "" && contract !== "") return cockpit.format(_("pestod $0 (interface $1)"), product, contract);
        if (product !== "") return cockpit.format(_("pestod $0"), product);
        if (contract !== "") return cockpit.format(_("pestod (interface $0)"), contract);
        return "pestod";
    }

    return { text };
})();

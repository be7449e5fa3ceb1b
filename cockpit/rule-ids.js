// SPDX-License-Identifier: GPL-2.0-or-later

/* rule-ids.js: the IDs the page proposes for new rules, by the project's one rule
 * (doc/dbus-api.md, "Choosing rule IDs"; pestoctl follows the same):
 *
 *  - the first new rule of a change gets the table's highest ID rounded down to a multiple
 *    of 10, plus 10 (10 in an empty table);
 *  - further new rules of the same change continue in steps of 10 from the previous one;
 *  - an ID already taken is skipped upward one by one;
 *  - once the top of the u32 range is reached, the lowest free ID from 1 up.
 */
"use strict";

const RuleIds = (() => {
    const STEP = 10;
    const TOP = 0xffffffff;

    /**
     * `count` IDs for one change to a table whose rules hold the IDs in `taken` (a Set of
     * numbers). Fewer when every ID from 1 to 4294967295 is taken.
     */
    function propose(taken, count) {
        let highest = null;
        for (const id of taken) if (highest === null || id > highest) highest = id;
        const proposed = new Set();
        const free = (id) => id !== 0 && !taken.has(id) && !proposed.has(id);
        const start = Math.floor((highest || 0) / STEP) * STEP + STEP;
        let candidate = start > TOP ? null : start;
        let lowest = 1;
        const out = [];
        while (out.length < count) {
            let id = null;
            while (candidate !== null) {
                if (free(candidate)) {
                    id = candidate;
                    candidate = candidate + STEP > TOP ? null : candidate + STEP;
                    break;
                }
                candidate = candidate + 1 > TOP ? null : candidate + 1;
            }
            if (id === null) {
                while (!free(lowest)) {
                    if (lowest === TOP) return out;
                    lowest++;
                }
                id = lowest;
            }
            proposed.add(id);
            out.push(id);
        }
        return out;
    }

    return { propose };
})();

if (typeof module !== "undefined") module.exports = RuleIds;

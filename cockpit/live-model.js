// SPDX-License-Identifier: GPL-2.0-or-later

/* live-model.js: pestod's objects, followed live from D-Bus signals, for Cockpit pages.
 *
 * Theory of operation
 * -------------------
 * One D-Bus client, `cockpit.dbus("top.passt.Pesto1", {bus: "system", superuser: "try"})`,
 * carries everything: reads, changes and the lock. It must be one connection, because
 * pestod's lock belongs to the caller's unique bus name: the calls of a transaction have to
 * come from the connection that took the lock. With `superuser: "try"` the calls go through
 * Cockpit's privileged bridge when the user has turned on administrative access, so pestod's
 * polkit check sees an administrator; otherwise through the user's own bridge, where reads
 * work and changes are refused.
 *
 * The model never polls. It keeps pestod's objects (the Manager, each Table, each Rule with
 * its properties) and follows them from signals alone (doc/live-model.md):
 *
 *  1. subscribe to every signal under /top/passt/Pesto1 (sent by the name's owner);
 *  2. on each "owner" event (pestod took its name: at start, after a restart or a D-Bus
 *     activation), call Properties.GetAll on the Manager, then Properties.GetAll and
 *     Table.List on each of its Tables, and rebuild the model. Signals that arrive before a
 *     reply are already reflected in it (the bus keeps one order per connection) and are
 *     dropped. (GetManagedObjects would be one call, but at 65,535 rules its reply is larger
 *     than the bus's 32 MiB limit; List's is not);
 *  3. then apply InterfacesAdded/InterfacesRemoved (rules appear and go), PropertiesChanged
 *     (rule state, table counters, LockOwner), and the Table signals RuleStateChanged and
 *     BindFailuresChanged (the same rule state, keyed by ID);
 *  4. an "owner" event with no owner means pestod left the bus: the model is emptied until
 *     the next owner event.
 *
 * The page is told through hooks: `changed()` after every change, `ruleRemoved(path)`,
 * `lockLost(text)` when a lock this page held is gone, `problem(title, text)`, and (optional)
 * `uploadRefused(socket, reason, rules)` for each Manager `UploadRefused` signal, an event
 * that is passed on as it comes (even while the model loads) and kept nowhere in the model.
 */
"use strict";

const PestoLiveModel = (() => {
    const BUS_NAME = "top.passt.Pesto1";
    const ROOT = "/top/passt/Pesto1";
    const MANAGER = "top.passt.Pesto1.Manager";
    const TABLE = "top.passt.Pesto1.Table";
    const RULE = "top.passt.Pesto1.Rule";
    const OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager";
    const PROPERTIES = "org.freedesktop.DBus.Properties";
    /** How long the reads that (re)build the model may take, in ms: a table of 65,535 rules on a
     *  busy machine takes pestod longer to list than D-Bus's default of 25 s. */
    const LOAD_TIMEOUT = 600000;

    /** The plain value of a D-Bus variant as Cockpit encodes it ({t, v}). */
    const unwrap = (variant) => (variant && typeof variant === "object" && "v" in variant ? variant.v : variant);

    /** Merges a{sv} properties into an object. */
    function merge(target, properties) {
        for (const name in properties) target[name] = unwrap(properties[name]);
        return target;
    }

    /** "Name: message" of a D-Bus error. */
    function describe(error) {
        const name = error.name || error.problem || "error";
        return error.message && error.message !== name ? name + ": " + error.message : name;
    }

    /** Creates the model and opens its client; `hooks` as in the header. */
    function create(hooks) {
        const model = {
            /** pestod's unique name; null when it is not on the bus; undefined before we know. */
            owner: undefined,
            /** GetManagedObjects is on its way: table and rule signals until its reply are dropped. */
            loading: false,
            /** GetAll for the Manager is on its way: its signals until the reply are dropped. */
            loadingManager: false,
            /** The Manager's properties (Version, ProductVersion, LockOwner, Tables), or null. */
            manager: null,
            /** Table object path → its properties. */
            tables: new Map(),
            /** Rule object path → its properties. */
            rules: new Map(),
            /** Our unique name while this page holds pestod's lock, else "". */
            lockName: "",
            /** The cockpit.dbus client. */
            client: null,
        };
        let loadGeneration = 0;
        /** Tables whose GetAll and List replies are still on their way: their signals are dropped. */
        const loadingTables = new Set();

        /** Whether a signal from `path` concerns a table still loading (or the load's start). */
        function stillLoading(path) {
            if (model.loadingManager) return true;
            for (const table of loadingTables) if (path === table || path.startsWith(table + "/")) return true;
            return false;
        }

        /** Adds or updates the interfaces of one object (GetManagedObjects, InterfacesAdded). */
        function addInterfaces(path, interfaces) {
            for (const name in interfaces) {
                if (name === MANAGER) model.manager = merge(model.manager || {}, interfaces[name]);
                else if (name === TABLE) model.tables.set(path, merge(model.tables.get(path) || { path }, interfaces[name]));
                else if (name === RULE) model.rules.set(path, merge(model.rules.get(path) || { path }, interfaces[name]));
            }
        }

        /** Drops the interfaces of one object (InterfacesRemoved). */
        function removeInterfaces(path, names) {
            if (names.includes(RULE)) {
                model.rules.delete(path);
                hooks.ruleRemoved(path);
            }
            if (names.includes(TABLE)) model.tables.delete(path);
            if (names.includes(MANAGER)) model.manager = null;
        }

        /** The object holding an interface's properties, or null. */
        function objectFor(path, iface) {
            if (iface === MANAGER) return path === ROOT ? model.manager : null;
            if (iface === TABLE) return model.tables.get(path) || null;
            if (iface === RULE) return model.rules.get(path) || null;
            return null;
        }

        /** Forgets a lock this page held once pestod says someone else (or no one) holds it. */
        function checkLock(text) {
            if (model.lockName && (!model.manager || model.manager.LockOwner !== model.lockName)) {
                model.lockName = "";
                hooks.lockLost(text);
            }
        }

        /** Applies one signal from pestod to the model. */
        function onSignal(path, iface, member, args) {
            // An event, not state: never dropped while the model loads.
            if (path === ROOT && iface === MANAGER && member === "UploadRefused") {
                if (hooks.uploadRefused && args.length === 3) hooks.uploadRefused(args[0], args[1], args[2]);
                return;
            }
            if (!model.owner) return;
            const aboutManager = path === ROOT && iface === PROPERTIES && args[0] === MANAGER;
            const about = iface === OBJECT_MANAGER ? args[0] : path;
            if (aboutManager ? model.loadingManager : stillLoading(about)) return;
            if (iface === OBJECT_MANAGER && member === "InterfacesAdded") {
                addInterfaces(args[0], args[1]);
            } else if (iface === OBJECT_MANAGER && member === "InterfacesRemoved") {
                removeInterfaces(args[0], args[1]);
            } else if (iface === PROPERTIES && member === "PropertiesChanged") {
                const target = objectFor(path, args[0]);
                if (target) merge(target, args[1]);
                if (aboutManager) checkLock("pestod no longer holds the lock for this page; uncommitted changes were rolled back.");
            } else if (iface === TABLE && (member === "RuleStateChanged" || member === "BindFailuresChanged")) {
                const rule = model.rules.get(path + "/rules/" + args[0]);
                if (rule && member === "RuleStateChanged") {
                    rule.Active = args[1];
                    rule.BoundSockets = args[2];
                    rule.BindFailures = args[3];
                } else if (rule) {
                    rule.BindFailures = args[1];
                    rule.LastError = args[2];
                }
            } else {
                return;
            }
            hooks.changed();
        }

        /** A Rule object's properties from one element of Table.List (rule a{sv}, status (buusu)). */
        function ruleFromList(tablePath, id, fields, status) {
            const v = (key, fallback) => (key in fields ? unwrap(fields[key]) : fallback);
            return {
                path: tablePath + "/rules/" + id, Id: id, Table: tablePath,
                Protocol: v("protocol", "tcp"), Address: v("address", ""), Interface: v("interface", ""),
                FirstPort: v("first-port", 0), LastPort: v("last-port", 0), TargetAddress: v("target-address", ""),
                TargetPort: v("target-port", 0), Scan: v("scan", false), Owner: v("owner", ""),
                ProxyProtocol: v("proxy-protocol", ""), Source: v("source", "pestod"),
                Active: status[0], BoundSockets: status[1], BindFailures: status[2], LastError: status[3], PortsWon: status[4],
            };
        }

        /**
         * Rebuilds the model: the Manager's properties, then each of its tables' properties
         * and rules (Properties.GetAll and Table.List). Each part drops the signals about it that
         * arrive before its own reply. Not GetManagedObjects: at pestod's 65,535 rules its
         * reply (about 44 MiB) is larger than the bus allows (32 MiB), and the bus would drop
         * pestod; List's is about 21 MiB (doc/cockpit.md). A call made while pestod is not
         * running starts it where D-Bus activation is set up.
         */
        function load() {
            const generation = ++loadGeneration;
            const timings = (window.pestoTimings = window.pestoTimings || { renders: 0 });
            timings.loadStarted = performance.now();
            model.loadingManager = true;
            model.loading = true;
            loadingTables.clear();
            const failed = (error) => {
                if (generation !== loadGeneration) return;
                model.loadingManager = false;
                model.loading = false;
                loadingTables.clear();
                if (error.name !== "org.freedesktop.DBus.Error.ServiceUnknown" && error.name !== "org.freedesktop.DBus.Error.NameHasNoOwner")
                    hooks.problem("Cannot read pestod's tables", describe(error));
                hooks.changed();
            };
            model.client.call(ROOT, PROPERTIES, "GetAll", [MANAGER], { timeout: LOAD_TIMEOUT })
                    .then(([properties]) => {
                        if (generation !== loadGeneration) return;
                        model.manager = merge({}, properties);
                        model.loadingManager = false;
                        checkLock("pestod no longer holds the lock for this page; uncommitted changes were rolled back.");
                        const paths = model.manager.Tables || [];
                        for (const path of paths) loadingTables.add(path);
                        const before = [...model.rules.keys()];
                        model.tables.clear();
                        model.rules.clear();
                        return Promise.all(paths.map((path) => Promise.all([
                            model.client.call(path, PROPERTIES, "GetAll", [TABLE], { timeout: LOAD_TIMEOUT }),
                            model.client.call(path, TABLE, "List", [], { timeout: LOAD_TIMEOUT }),
                        ]).then(([[properties], [rules]]) => {
                            if (generation !== loadGeneration) return;
                            model.tables.set(path, merge({ path }, properties));
                            for (const [id, fields, status] of rules) {
                                const rule = ruleFromList(path, id, fields, status);
                                model.rules.set(rule.path, rule);
                            }
                            loadingTables.delete(path);
                        }))).then(() => {
                            if (generation !== loadGeneration) return;
                            for (const path of before) if (!model.rules.has(path)) hooks.ruleRemoved(path);
                            model.loading = false;
                            timings.tablesRead = performance.now();
                            if (!model.owner) model.owner = "(activated)";
                            hooks.changed();
                        });
                    })
                    .catch(failed);
        }

        /** Empties the model: pestod left the bus. */
        function clear() {
            loadGeneration++;
            model.loading = false;
            model.loadingManager = false;
            model.manager = null;
            model.tables.clear();
            for (const path of [...model.rules.keys()]) {
                model.rules.delete(path);
                hooks.ruleRemoved(path);
            }
            checkLock("pestod left the bus; uncommitted changes were not kept.");
        }

        /** Opens the D-Bus client and follows pestod's name. */
        function connect() {
            const client = cockpit.dbus(BUS_NAME, { bus: "system", superuser: "try" });
            model.client = client;
            client.subscribe({ path_namespace: ROOT }, onSignal);
            client.addEventListener("owner", (_event, owner) => {
                model.owner = owner || null;
                if (owner) load();
                else clear();
                hooks.changed();
            });
            client.addEventListener("close", (_event, options) => {
                // Cockpit closes the channel when administrative access is turned on or off;
                // open a new one, which routes calls the new way.
                model.owner = undefined;
                clear();
                hooks.problem("Connection to the system bus closed", cockpit.message(options));
                hooks.changed();
                window.setTimeout(connect, 1000);
            });
        }

        model.load = load;
        connect();
        return model;
    }

    return { create, describe, unwrap, BUS_NAME, ROOT, MANAGER, TABLE, RULE, PROPERTIES };
})();

// SPDX-License-Identifier: GPL-2.0-or-later

// ObjectTree: which objects exist at which paths, their interfaces and their properties.
//
// Objects are not registered one by one; they are derived from the engine on demand, so a
// rule object exists exactly while its rule does. Paths:
//   /, /top, /top/passt                          introspection nodes leading to the manager
//   /top/passt/Pesto1                            Manager, ObjectManager
//   /top/passt/Pesto1/tables                     introspection node
//   /top/passt/Pesto1/tables/<host|splice>       Table
//   /top/passt/Pesto1/tables/<t>/rules           introspection node
//   /top/passt/Pesto1/tables/<t>/rules/<id>      Rule
// Every object also has Properties, Introspectable and Peer (Peer is answered by libdbus).

import PestoDBus
import PestoEngine
import PestoModel
import PestoSystem

enum ObjectTree {
    /// An object of the tree.
    enum Object: Equatable {
        /// A path on the way to a real object, with its child node names.
        case node([String])
        case manager
        case table(TableKind)
        case rule(TableKind, UInt32)

        /// The interfaces the object implements.
        var interfaces: [DBusInterfaceSpec] {
            switch self {
            case .node: return Self.nodeInterfaces
            case .manager: return Self.managerInterfaces
            case .table: return Self.tableInterfaces
            case .rule: return Self.ruleInterfaces
            }
        }

        // Built once: every method call asks for its object's interfaces.
        private static let nodeInterfaces = [PestoInterfaces.introspectable, PestoInterfaces.peer]
        private static let managerInterfaces = [PestoInterfaces.manager, PestoInterfaces.objectManager] + PestoInterfaces.standard
        private static let tableInterfaces = [PestoInterfaces.table] + PestoInterfaces.standard
        private static let ruleInterfaces = [PestoInterfaces.rule] + PestoInterfaces.standard

        /// The names of the child nodes, for introspection.
        var children: [String] {
            switch self {
            case .node(let names): return names
            case .manager: return ["tables"]
            case .table: return ["rules"]
            case .rule: return []
            }
        }
    }

    /// The path of the node holding the tables, and the prefix of the paths below it.
    private static let tablesPath = PestoBusNames.managerPath + "/tables"
    private static let tablesPrefix = tablesPath + "/"

    /// The object at `path`, or nil.
    static func resolve(_ path: String, engine: ForwardingEngine) -> Object? {
        // The common case first, without building or splitting a string: a table's own path
        // (Status, Insert, Activate, ... all go there).
        if path == PestoBusNames.tablePath(.host) { return .table(.host) }
        if path == PestoBusNames.tablePath(.splice) { return engine.splice == nil ? nil : .table(.splice) }
        switch path {
        case "/": return .node(["top"])
        case "/top": return .node(["passt"])
        case "/top/passt": return .node(["Pesto1"])
        case PestoBusNames.managerPath: return .manager
        case tablesPath: return .node(engine.tables.map(\.kind.rawValue))
        default: break
        }
        let prefix = tablesPrefix
        guard path.hasPrefix(prefix) else { return nil }
        let parts = path.dropFirst(prefix.count).split(separator: "/", omittingEmptySubsequences: false)
        guard let kind = TableKind(rawValue: String(parts[0])), let table = engine.table(kind) else { return nil }
        switch parts.count {
        case 1: return .table(kind)
        case 2 where parts[1] == "rules": return .node(table.ids.map { String($0) })
        case 3 where parts[1] == "rules":
            // Canonical decimal only: "007" is not rule 7's path.
            guard let id = UInt32(parts[2]), String(id) == parts[2], table.contains(id) else { return nil }
            return .rule(kind, id)
        default: return nil
        }
    }

    /// The properties of `object` for `interface`, in contract order; nil if it lacks the
    /// interface. `lockOwner` is the Manager's `LockOwner` (the lock is the server's state).
    static func properties(_ object: Object, _ interface: String, engine: ForwardingEngine, lockOwner: String? = nil) -> [(
        String, DBusValue
    )]? {
        guard object.interfaces.contains(where: { $0.name == interface }) else { return nil }
        return implementedProperties(object, interface, engine: engine, lockOwner: lockOwner)
    }

    /// The names of a rule object's interfaces (InterfacesRemoved), built once.
    static let ruleInterfaceNames = Object.rule(.host, 0).interfaces.map(\.name)

    /// `properties` of an interface `object` is known to implement (no check: this runs
    /// for every rule of a large Apply, through InterfacesAdded).
    private static func implementedProperties(
        _ object: Object, _ interface: String, engine: ForwardingEngine, lockOwner: String?
    ) -> [(String, DBusValue)]? {
        switch (object, interface) {
        case (.manager, PestoInterfaces.manager.name):
            return [
                ("Version", .string(PestoBusNames.version)),
                ("ProductVersion", .string(ProductVersion.current)),
                ("LockOwner", .string(lockOwner ?? "")),
                ("Tables", .objectPaths(engine.tables.map { PestoBusNames.tablePath($0.kind) })),
            ]
        case (.table(let kind), PestoInterfaces.table.name):
            guard let t = engine.table(kind) else { return nil }
            return [
                ("Name", .string(kind.name)),
                ("Capabilities", .strings(t.capabilities.names)),
                ("RuleCount", .uint32(UInt32(t.ruleCount))),
                ("ActiveCount", .uint32(UInt32(t.activeCount))),
                ("MaxRules", .uint32(UInt32(clamping: t.limits.maxRules))),
                ("SocketCount", .uint32(UInt32(clamping: t.openSockets))),
                ("MaxSockets", .uint32(UInt32(clamping: t.limits.maxSockets))),
                ("OverlapPolicy", .string(t.overlapPolicy.rawValue)),
            ]
        case (.rule(let kind, let id), PestoInterfaces.rule.name):
            guard let t = engine.table(kind), let rule = try? t.read(id), let s = try? t.status(id) else { return nil }
            return ruleProperties(kind, id, rule, s, portsWon: (try? t.portsWon(id)) ?? 0)
        default:
            return []  // standard interfaces have no properties
        }
    }

    /// The Rule interface's properties of rule `id` of table `kind`, given its rule and state.
    private static func ruleProperties(_ kind: TableKind, _ id: UInt32, _ rule: Rule, _ s: RuleStatus, portsWon: UInt32) -> [(
        String, DBusValue
    )] {
        let fields = RuleCodec.fields(rule)
        var props: [(String, DBusValue)] = []
        props.reserveCapacity(fields.count + 7)
        props.append(("Id", .uint32(id)))
        props.append(("Table", .objectPath(PestoBusNames.tablePath(kind))))
        for f in fields { props.append((f.property, f.value)) }
        props.append(("Active", .bool(s.active)))
        props.append(("BoundSockets", .uint32(s.bound)))
        props.append(("BindFailures", .uint32(s.failed)))
        props.append(("LastError", .string(s.lastErrorName)))
        props.append(("PortsWon", .uint32(portsWon)))
        return props
    }

    /// `a{sa{sv}}` of a rule object as it was when reported (InterfacesAdded of a rule whose
    /// report was held back until its update was final shows it as inserted: inactive, so
    /// winning no port).
    /// `portsWon`, when given, is the rule's (GetManagedObjects from a snapshot, SlicedRead.swift).
    static func ruleInterfacesAndProperties(
        _ kind: TableKind, _ id: UInt32, _ rule: Rule, _ status: RuleStatus, portsWon: UInt32? = nil
    ) -> DBusValue {
        .dictionary(
            key: "s", value: "a{sv}",
            Object.rule(kind, id).interfaces.map { i in
                DBusValue.DictEntry(
                    .string(i.name),
                    .vardict(
                        i.name == PestoInterfaces.rule.name
                            ? ruleProperties(kind, id, rule, status, portsWon: portsWon ?? (status.active ? status.bound : 0)) : []))
            })
    }

    /// `a{sa{sv}}`: every interface of `object` with its properties (InterfacesAdded, GetManagedObjects).
    static func interfacesAndProperties(_ object: Object, engine: ForwardingEngine, lockOwner: String? = nil) -> DBusValue {
        .dictionary(
            key: "s", value: "a{sv}",
            object.interfaces.map { i in
                DBusValue.DictEntry(
                    .string(i.name), .vardict(implementedProperties(object, i.name, engine: engine, lockOwner: lockOwner) ?? []))
            })
    }
}

extension PestoServer {
    /// `org.freedesktop.DBus.Properties` on any object.
    func propertiesCall(_ object: ObjectTree.Object, member: String, args: [DBusValue]) throws(DBusErrorReply) -> [DBusValue] {
        let interface = args[0].stringValue ?? ""
        guard let props = ObjectTree.properties(object, interface, engine: engine, lockOwner: lockOwner) else {
            throw DBusErrorReply(DBusErrorReply.unknownInterface, "The object has no interface \(ClientText.quote(interface)).")
        }
        switch member {
        case "Get":
            let name = args[1].stringValue ?? ""
            guard let value = props.first(where: { $0.0 == name })?.1 else {
                throw DBusErrorReply(DBusErrorReply.unknownProperty, "Interface \(interface) has no property \(ClientText.quote(name)).")
            }
            return [.variant(value)]
        case "GetAll":
            return [.vardict(props)]
        default:  // Set
            let name = args[1].stringValue ?? ""
            guard props.contains(where: { $0.0 == name }) else {
                throw DBusErrorReply(DBusErrorReply.unknownProperty, "Interface \(interface) has no property \(ClientText.quote(name)).")
            }
            throw DBusErrorReply(
                DBusErrorReply.propertyReadOnly, "Property \(name) is read-only; use the \(interface) methods to change state.")
        }
    }

    /// `GetManagedObjects`: every table and rule object under the manager.
    func managedObjects() -> DBusValue {
        var entries: [DBusValue.DictEntry] = []
        for t in engine.tables {
            entries.append(
                .init(.objectPath(PestoBusNames.tablePath(t.kind)), ObjectTree.interfacesAndProperties(.table(t.kind), engine: engine)))
            for id in t.ids {
                entries.append(
                    .init(
                        .objectPath(PestoBusNames.rulePath(t.kind, id)),
                        ObjectTree.interfacesAndProperties(.rule(t.kind, id), engine: engine)))
            }
        }
        return .dictionary(key: "o", value: "a{sa{sv}}", entries)
    }
}

// SPDX-License-Identifier: GPL-2.0-or-later

// Interfaces: the D-Bus contract (doc/dbus-api.md) as data, and the introspection XML made from it.
//
// The service dispatches, validates signatures and answers Introspect from these
// definitions, and `dbus/top.passt.Pesto1.xml` is generated from them too
// (`pestod --print-introspection`), so the code, the live introspection and the shipped file
// cannot drift apart: a test compares the file with `contractXML`. The Rule object's field
// properties are named and typed by PestoModel's RuleField, the one list of a rule's fields.

import PestoModel

/// One named argument of a method or signal.
public struct DBusArgumentSpec: Sendable {
    public let name: String
    public let signature: String
}

/// A method: its name, input and output arguments, and what it does.
public struct DBusMethodSpec: Sendable {
    public let name: String
    public let inputs: [DBusArgumentSpec]
    public let outputs: [DBusArgumentSpec]
    public let doc: String
    /// Whether the caller must be authorised (polkit action `top.passt.Pesto1.modify`):
    /// announced with systemd's `org.freedesktop.systemd1.Privileged` annotation.
    public var privileged = false
    /// The signature the call's arguments must have (kept: every call is checked against it).
    public let inputSignature: String

    /// A method with these arguments; not privileged.
    public init(name: String, inputs: [DBusArgumentSpec], outputs: [DBusArgumentSpec], doc: String) {
        self.name = name
        self.inputs = inputs
        self.outputs = outputs
        self.doc = doc
        inputSignature = inputs.map(\.signature).joined()
    }
}

/// A signal.
public struct DBusSignalSpec: Sendable {
    public let name: String
    public let arguments: [DBusArgumentSpec]
    public let doc: String
}

/// A read-only property.
public struct DBusPropertySpec: Sendable {
    /// Whether changes are announced with PropertiesChanged.
    public enum Emits: String, Sendable {
        case changes = "true"
        case never = "const"
    }

    public let name: String
    public let signature: String
    public let emits: Emits
    public let doc: String
}

/// An interface: methods, signals, properties.
public struct DBusInterfaceSpec: Sendable {
    public let name: String
    public let doc: String
    public let methods: [DBusMethodSpec]
    public let signals: [DBusSignalSpec]
    public let properties: [DBusPropertySpec]

    /// The method called `name`, if any.
    public func method(_ name: String) -> DBusMethodSpec? { methods.first { $0.name == name } }
    /// The property called `name`, if any.
    public func property(_ name: String) -> DBusPropertySpec? { properties.first { $0.name == name } }
}

private func arg(_ name: String, _ sig: String) -> DBusArgumentSpec { DBusArgumentSpec(name: name, signature: sig) }
private func method(_ name: String, _ inputs: [DBusArgumentSpec] = [], _ outputs: [DBusArgumentSpec] = [], _ doc: String) -> DBusMethodSpec
{
    DBusMethodSpec(name: name, inputs: inputs, outputs: outputs, doc: doc)
}
/// A method that changes the tables (or takes the lock), so its caller is authorised first.
private func privileged(_ method: DBusMethodSpec) -> DBusMethodSpec {
    var m = method
    m.privileged = true
    return m
}
private func prop(_ name: String, _ sig: String, _ emits: DBusPropertySpec.Emits, _ doc: String) -> DBusPropertySpec {
    DBusPropertySpec(name: name, signature: sig, emits: emits, doc: doc)
}

/// The interfaces of the contract and the standard ones pestod implements.
public enum PestoInterfaces {
    /// `top.passt.Pesto1.Manager`.
    public static let manager = DBusInterfaceSpec(
        name: "top.passt.Pesto1.Manager",
        doc:
            "The service: the name-owner lock that makes a series of changes one transaction. Changes (the Table methods that modify, and Lock) are authorised first, per caller and in the caller's order; a caller with 64 changes, or 16 MiB of arguments, already waiting for authorisation, or held back behind a large change in progress (Unlock, Commit and Rollback included), gets org.freedesktop.DBus.Error.LimitsExceeded.",
        methods: [
            privileged(
                method(
                    "Lock", [], [],
                    "Take the lock: until Unlock, or until the caller leaves the bus, only the caller may change the tables. Its uncommitted changes are rolled back if it leaves; a Lock whose caller leaves before it is authorised is never granted."
                )),
            method("Unlock", [], [], "Release the lock; uncommitted changes are rolled back."),
            method(
                "Commit", [], [],
                "Make the changes made under the lock permanent. With a state file the reply comes once they are saved; if they cannot be (SaveFailed), they are undone and the lock stays held."
            ),
            method("Rollback", [], [], "Undo, newest first, every change made under the lock since Lock or the last Commit."),
        ],
        signals: [
            DBusSignalSpec(
                name: "UploadRefused", arguments: [arg("socket", "s"), arg("reason", "s"), arg("rules", "aa{sv}")],
                doc:
                    "An upload of an upstream pesto client on the control socket (pestod --control) was refused and changed nothing: socket is the control socket's path, reason says why (the same words as pestod's warning), rules are the uploaded rules (at most 1024, each as Read gives a rule; none when the upload could not be read). Upstream's protocol has no reply, so this signal is where the refusal shows."
            )
        ],
        properties: [
            prop("Version", "s", .never, "The D-Bus contract's version (this interface's), not the product's."),
            prop("ProductVersion", "s", .never, "pestod's release version, the one pestoctl --version and the Cockpit page show."),
            prop("LockOwner", "s", .changes, "The unique bus name holding the lock, or an empty string."),
            prop("Tables", "ao", .never, "The tables' object paths."),
        ])

    /// `top.passt.Pesto1.Table`.
    public static let table = DBusInterfaceSpec(
        name: "top.passt.Pesto1.Table",
        doc: "One forwarding table (HOST: inbound, SPLICE: outbound). Rules are kept in ID order; every mutating call is atomic.",
        methods: [
            privileged(
                method("Insert", [arg("id", "u"), arg("rule", "a{sv}")], [], "Add a rule, inactive. Conflicts are not checked here.")),
            privileged(method("Delete", [arg("id", "u")], [], "Remove an inactive rule.")),
            privileged(
                method(
                    "Activate", [arg("id", "u")], [arg("bound", "u"), arg("failed", "u")],
                    "Bind and listen on every socket of the rule; completes even if binds fail.")),
            privileged(method("Deactivate", [arg("id", "u")], [], "Close the rule's listening sockets; relayed connections are not cut.")),
            method(
                "Status", [arg("id", "u")],
                [arg("active", "b"), arg("bound", "u"), arg("failed", "u"), arg("last_error", "s"), arg("ports_won", "u")],
                "The rule's state; last_error is the errno name of the latest bind failure or empty; ports_won is the rule's PortsWon."),
            method("Read", [arg("id", "u")], [arg("rule", "a{sv}")], "The rule as stored, defaults filled in."),
            method(
                "ReadIndex", [arg("index", "u")], [arg("id", "u"), arg("rule", "a{sv}")],
                "The rule at a position in ID order; NoSuchRule past the end."),
            method(
                "List", [], [arg("rules", "a(ua{sv}(buusu))")],
                "Every rule with its status (as Status returns it), in ID order. A reply larger than the bus takes in one message (32 MiB less 4 KiB) is not sent: LimitsExceeded; ReadIndex reads the rules one by one."
            ),
            privileged(
                method(
                    "Apply", [arg("insert", "a(ua{sv})"), arg("remove", "au"), arg("options", "a{sv}")], [arg("results", "a(uuu)")],
                    "Insert and activate new rules and deactivate and delete removed ones in one call, rolled back entirely on any error or on too many bind failures (options: max-failures u, best-effort b). Either array longer than MaxRules is InvalidArgs."
                )),
        ],
        signals: [
            DBusSignalSpec(
                name: "RuleStateChanged", arguments: [arg("id", "u"), arg("active", "b"), arg("bound", "u"), arg("failed", "u")],
                doc: "A rule was activated or deactivated, or a retry or scan changed its socket counts."),
            DBusSignalSpec(
                name: "BindFailuresChanged", arguments: [arg("id", "u"), arg("failed", "u"), arg("last_error", "s")],
                doc: "A rule's bind failure count changed."),
        ],
        properties: [
            prop("Name", "s", .never, "HOST or SPLICE."),
            prop("Capabilities", "as", .never, "What the table supports: ipv4 ipv6 tcp udp scan ifname."),
            prop("RuleCount", "u", .changes, "Number of rules."),
            prop("ActiveCount", "u", .changes, "Number of active rules."),
            prop("MaxRules", "u", .never, "Most rules the table holds."),
            prop("SocketCount", "u", .changes, "Listening sockets currently open."),
            prop("MaxSockets", "u", .never, "Most sockets the table's rules may need together."),
            prop(
                "OverlapPolicy", "s", .never,
                "How overlapping active rules are treated (pestod --overlap): refuse (activating one fails with Conflict) or first-match (allowed; a new connection or flow goes to the matching active rule with the lowest ID)."
            ),
        ])

    /// `top.passt.Pesto1.Rule`.
    public static let rule = DBusInterfaceSpec(
        name: "top.passt.Pesto1.Rule",
        doc: "One rule of a table, at /top/passt/Pesto1/tables/TABLE/rules/ID.",
        methods: [],
        signals: [],
        properties: [
            prop("Id", "u", .never, "The rule's ID."),
            prop("Table", "o", .never, "The table holding the rule."),
        ]
            // One property per field of a rule, named and typed by RuleField (the one list).
            + RuleField.allCases.map { prop($0.property, fieldSignature($0.kind), .never, fieldDoc($0)) }
            + [
                prop("Active", "b", .changes, "Whether the rule is active."),
                prop("BoundSockets", "u", .changes, "Sockets bound."),
                prop("BindFailures", "u", .changes, "Sockets whose bind failed."),
                prop("LastError", "s", .changes, "Errno name of the latest bind failure, or empty."),
                prop(
                    "PortsWon", "u", .changes,
                    "How many of the rule's ports it wins: a new connection or flow there can reach it (with OverlapPolicy refuse, BoundSockets while active; with first-match, the served ports where no lower-ID active rule takes everything it matches)."
                ),
            ])

    /// The D-Bus type of a rule field's property.
    static func fieldSignature(_ kind: RuleField.Kind) -> String {
        switch kind {
        case .text: return "s"
        case .port: return "q"
        case .flag: return "b"
        }
    }

    /// The documentation of a rule field's property (a switch: a new field needs its own).
    static func fieldDoc(_ field: RuleField) -> String {
        switch field {
        case .proto: return "tcp or udp."
        case .address: return "Listening address; empty for any address (dual stack)."
        case .interface: return "Interface bound to, or empty."
        case .firstPort: return "First listening port."
        case .lastPort: return "Last listening port."
        case .targetAddress: return "Destination address; empty for the table's default."
        case .targetPort: return "Destination port of FirstPort."
        case .scan: return "Listens only on ports bound on the target side."
        case .owner: return "Tag of the client that made the rule."
        case .proxyProtocol:
            return "PROXY protocol header sent to the target before a TCP connection's data: empty (none), v1 or v2."
        case .source:
            return "Whose address connections and flows come from at the target: pestod (its own) or client (the client's)."
        }
    }

    /// The contract's own interfaces, in the order of the shipped XML.
    public static let contract = [manager, table, rule]

    /// `org.freedesktop.DBus.Properties`.
    public static let properties = DBusInterfaceSpec(
        name: "org.freedesktop.DBus.Properties", doc: "",
        methods: [
            method("Get", [arg("interface_name", "s"), arg("property_name", "s")], [arg("value", "v")], ""),
            method("GetAll", [arg("interface_name", "s")], [arg("properties", "a{sv}")], ""),
            method("Set", [arg("interface_name", "s"), arg("property_name", "s"), arg("value", "v")], [], ""),
        ],
        signals: [
            DBusSignalSpec(
                name: "PropertiesChanged",
                arguments: [arg("interface_name", "s"), arg("changed_properties", "a{sv}"), arg("invalidated_properties", "as")], doc: "")
        ],
        properties: [])

    /// `org.freedesktop.DBus.Introspectable`.
    public static let introspectable = DBusInterfaceSpec(
        name: "org.freedesktop.DBus.Introspectable", doc: "",
        methods: [method("Introspect", [], [arg("xml_data", "s")], "")], signals: [], properties: [])

    /// `org.freedesktop.DBus.Peer` (answered by libdbus itself).
    public static let peer = DBusInterfaceSpec(
        name: "org.freedesktop.DBus.Peer", doc: "",
        methods: [method("Ping", [], [], ""), method("GetMachineId", [], [arg("machine_uuid", "s")], "")], signals: [], properties: [])

    /// `org.freedesktop.DBus.ObjectManager`.
    public static let objectManager = DBusInterfaceSpec(
        name: "org.freedesktop.DBus.ObjectManager", doc: "",
        methods: [method("GetManagedObjects", [], [arg("objects", "a{oa{sa{sv}}}")], "")],
        signals: [
            DBusSignalSpec(
                name: "InterfacesAdded", arguments: [arg("object_path", "o"), arg("interfaces_and_properties", "a{sa{sv}}")], doc: ""),
            DBusSignalSpec(name: "InterfacesRemoved", arguments: [arg("object_path", "o"), arg("interfaces", "as")], doc: ""),
        ],
        properties: [])

    /// The standard interfaces every pestod object has.
    public static let standard = [properties, introspectable, peer]
}

// MARK: - XML

extension DBusInterfaceSpec {
    /// The interface's introspection XML, indented by `indent` spaces; with doc comments if asked.
    public func xml(indent: Int = 2, docs: Bool = false) -> String {
        let pad = String(repeating: " ", count: indent)
        var out = ""
        func comment(_ text: String, _ p: String) {
            if docs && !text.isEmpty { out += "\(p)<!-- \(escapeComment(text)) -->\n" }
        }
        comment(doc, pad)
        out += "\(pad)<interface name=\"\(name)\">\n"
        for m in methods {
            comment(m.doc, pad + "  ")
            if m.inputs.isEmpty && m.outputs.isEmpty && !m.privileged {
                out += "\(pad)  <method name=\"\(m.name)\"/>\n"
                continue
            }
            out += "\(pad)  <method name=\"\(m.name)\">\n"
            for a in m.inputs { out += "\(pad)    <arg name=\"\(a.name)\" type=\"\(a.signature)\" direction=\"in\"/>\n" }
            for a in m.outputs { out += "\(pad)    <arg name=\"\(a.name)\" type=\"\(a.signature)\" direction=\"out\"/>\n" }
            if m.privileged { out += "\(pad)    <annotation name=\"org.freedesktop.systemd1.Privileged\" value=\"true\"/>\n" }
            out += "\(pad)  </method>\n"
        }
        for s in signals {
            comment(s.doc, pad + "  ")
            out += "\(pad)  <signal name=\"\(s.name)\">\n"
            for a in s.arguments { out += "\(pad)    <arg name=\"\(a.name)\" type=\"\(a.signature)\"/>\n" }
            out += "\(pad)  </signal>\n"
        }
        for p in properties {
            comment(p.doc, pad + "  ")
            out += "\(pad)  <property name=\"\(p.name)\" type=\"\(p.signature)\" access=\"read\">\n"
            out += "\(pad)    <annotation name=\"org.freedesktop.DBus.Property.EmitsChangedSignal\" value=\"\(p.emits.rawValue)\"/>\n"
            out += "\(pad)  </property>\n"
        }
        out += "\(pad)</interface>\n"
        return out
    }

    private func escapeComment(_ s: String) -> String { s.replacing("--", with: "- -") }
}

/// The introspection document of one object.
public func introspectionXML(interfaces: [DBusInterfaceSpec], children: [String], docs: Bool = false) -> String {
    var out = """
        <!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"
         "http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">
        <node>

        """
    for i in interfaces { out += i.xml(docs: docs) }
    for c in children { out += "  <node name=\"\(c)\"/>\n" }
    out += "</node>\n"
    return out
}

extension PestoInterfaces {
    /// The content of `dbus/top.passt.Pesto1.xml`: the contract's interfaces, documented.
    public static var contractXML: String {
        var xml = introspectionXML(interfaces: contract, children: [], docs: true)
        xml = xml.replacing(
            "<node>\n",
            with:
                "<!-- pestod D-Bus contract, version 1 (bus name top.passt.Pesto1). Generated from Sources/PestoDBus/Interfaces.swift by the pestod option print-introspection; semantics in doc/. -->\n<node>\n"
        )
        return xml
    }
}

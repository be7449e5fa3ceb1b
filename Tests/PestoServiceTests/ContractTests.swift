// SPDX-License-Identifier: GPL-2.0-or-later

// pestod on a private bus: the contract's methods with busctl, gdbus and a libdbus client.

import Foundation
import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoDBus
@testable import PestoService

@Suite("pestod D-Bus contract", .serialized, .timeLimit(.minutes(10)))
struct ContractTests {
    @Test("busctl Insert + Activate opens a real listener; Status, Read, List report it")
    func busctlInsertActivate() throws {
        let f = try PestodFixture()
        let port = TestSockets.freePorts(1).lowerBound
        let path = PestodFixture.hostPath
        let iface = PestodFixture.tableInterface
        var r = try f.busctl([
            "call", PestodFixture.dest, path, iface, "Insert", "ua{sv}", "100", "3",
            "protocol", "s", "tcp", "address", "s", "127.0.0.1", "first-port", "q", "\(port)",
        ])
        #expect(r.status == 0, "\(r.err)")
        r = try f.busctl(["call", PestodFixture.dest, path, iface, "Activate", "u", "100"])
        #expect(r.out == "uu 1 0\n", "\(r.err)")
        guard case .success(let fd) = TestSockets.connect(port: port) else {
            Issue.record("TCP connection to the activated port failed")
            return
        }
        close(fd)
        r = try f.busctl(["call", PestodFixture.dest, path, iface, "Status", "u", "100"])
        #expect(r.out == "buusu true 1 0 \"\" 1\n")
        r = try f.busctl(["call", PestodFixture.dest, path, iface, "Read", "u", "100"])
        #expect(
            r.out.contains("\"first-port\" q \(port)") && r.out.contains("\"address\" s \"127.0.0.1\"")
                && r.out.contains("\"target-port\" q \(port)"))
        r = try f.busctl(["call", PestodFixture.dest, path, iface, "List"])
        #expect(r.out.hasPrefix("a(ua{sv}(buusu)) 1 100 11 "), "\(r.out)")
        #expect(r.out.hasSuffix("true 1 0 \"\" 1\n"))
        #expect(f.listeningSockets().count == 1)

        // The same through gdbus.
        let g = try f.gdbus(["call", "--dest", PestodFixture.dest, "--object-path", path, "--method", "\(iface).Status", "100"])
        #expect(g.out == "(true, uint32 1, uint32 0, '', uint32 1)\n", "\(g.err)")
        let g2 = try f.gdbus(["call", "--dest", PestodFixture.dest, "--object-path", path, "--method", "\(iface).Deactivate", "100"])
        #expect(g2.status == 0 && g2.out == "()\n", "\(g2.err)")
        #expect(f.listeningSockets().isEmpty)
        if case .success(let fd) = TestSockets.connect(port: port) {
            close(fd)
            Issue.record("port still open after Deactivate")
        }
    }

    @Test("busctl introspect lists every member of the contract")
    func introspection() throws {
        let f = try PestodFixture()
        try f.table("Insert", [.uint32(1), PestodFixture.rule(TestSockets.freePorts(1).lowerBound)])
        let objects: [(String, DBusInterfaceSpec)] = [
            (PestodFixture.managerPath, PestoInterfaces.manager),
            (PestodFixture.hostPath, PestoInterfaces.table),
            (PestoBusNames.rulePath(.host, 1), PestoInterfaces.rule),
        ]
        for (path, spec) in objects {
            let r = try f.busctl(["introspect", "--no-pager", PestodFixture.dest, path])
            #expect(r.status == 0, "\(r.err)")
            #expect(r.out.contains(spec.name))
            for m in spec.methods { #expect(r.out.contains(".\(m.name) "), "\(path): method \(m.name)") }
            for s in spec.signals { #expect(r.out.contains(".\(s.name) "), "\(path): signal \(s.name)") }
            for p in spec.properties { #expect(r.out.contains(".\(p.name) "), "\(path): property \(p.name)") }
            // The live XML holds the interface exactly as generated from the contract's definitions.
            let xml = try f.client.call(PestodFixture.dest, path, "org.freedesktop.DBus.Introspectable", "Introspect")
            #expect(xml.first?.stringValue?.contains(spec.xml()) == true, "\(path)")
        }
        let tree = try f.busctl(["tree", "--list", PestodFixture.dest])
        #expect(tree.out.contains(PestoBusNames.rulePath(.host, 1)))
        let peer = try f.busctl(["call", PestodFixture.dest, PestodFixture.managerPath, "org.freedesktop.DBus.Peer", "Ping"])
        #expect(peer.status == 0)
    }

    @Test("dbus/top.passt.Pesto1.xml is what the code generates")
    func shippedXML() throws {
        let file = Products.repository.appendingPathComponent("dbus/top.passt.Pesto1.xml")
        let shipped = try String(contentsOf: file, encoding: .utf8)
        #expect(shipped == PestoInterfaces.contractXML, "regenerate with: pestod --print-introspection > dbus/top.passt.Pesto1.xml")
        let printed = try run(Products.path("pestod"), ["--print-introspection"])
        #expect(printed.out == shipped)
        let lint = try? run("/usr/bin/xmllint", ["--noout", file.path])
        if let lint { #expect(lint.status == 0, "\(lint.err)") }
    }

    @Test("exactly the methods that change the tables, and Lock, are privileged, and the XML says so")
    func privilegedMethods() {
        let privileged = [PestoInterfaces.manager, PestoInterfaces.table].flatMap { i in
            i.methods.filter(\.privileged).map { "\(i.name).\($0.name)" }
        }
        #expect(
            Set(privileged) == [
                "top.passt.Pesto1.Manager.Lock", "top.passt.Pesto1.Table.Insert", "top.passt.Pesto1.Table.Delete",
                "top.passt.Pesto1.Table.Activate", "top.passt.Pesto1.Table.Deactivate", "top.passt.Pesto1.Table.Apply",
            ])
        let annotations = PestoInterfaces.contractXML.components(separatedBy: "org.freedesktop.systemd1.Privileged").count - 1
        #expect(annotations == privileged.count)
    }

    @Test("Properties: Get, GetAll, Set refused; ObjectManager lists tables and rules")
    func properties() throws {
        let f = try PestodFixture(pestodArguments: ["--max-rules", "7"])
        let port = TestSockets.freePorts(1).lowerBound
        try f.table("Insert", [.uint32(5), PestodFixture.rule(port, [("owner", .string("ctr-1"))])])
        let props = "org.freedesktop.DBus.Properties"
        func get(_ path: String, _ iface: String, _ name: String) throws(DBusErrorReply) -> DBusValue? {
            try f.client.call(PestodFixture.dest, path, props, "Get", [.string(iface), .string(name)]).first?.variantValue
        }
        #expect(try get(PestodFixture.hostPath, PestoInterfaces.table.name, "Name") == .string("HOST"))
        #expect(try get(PestodFixture.hostPath, PestoInterfaces.table.name, "MaxRules") == .uint32(7))
        #expect(try get(PestodFixture.hostPath, PestoInterfaces.table.name, "RuleCount") == .uint32(1))
        #expect(try get(PestodFixture.managerPath, PestoInterfaces.manager.name, "Tables") == .objectPaths([PestodFixture.hostPath]))
        #expect(try get(PestodFixture.managerPath, PestoInterfaces.manager.name, "LockOwner") == .string(""))
        let rulePath = PestoBusNames.rulePath(.host, 5)
        #expect(try get(rulePath, PestoInterfaces.rule.name, "Owner") == .string("ctr-1"))
        #expect(try get(rulePath, PestoInterfaces.rule.name, "FirstPort") == .uint16(port))
        #expect(try get(rulePath, PestoInterfaces.rule.name, "Active") == .bool(false))
        let all = try f.client.call(PestodFixture.dest, rulePath, props, "GetAll", [.string(PestoInterfaces.rule.name)])
        #expect(all.first?.vardictValue?.map(\.0) == PestoInterfaces.rule.properties.map(\.name))

        #expect(
            f.errorName { () throws(DBusErrorReply) in
                _ = try f.client.call(
                    PestodFixture.dest, rulePath, props, "Set",
                    [.string(PestoInterfaces.rule.name), .string("Active"), .variant(.bool(true))])
            } == DBusErrorReply.propertyReadOnly)
        #expect(
            f.errorName { () throws(DBusErrorReply) in _ = try get(rulePath, PestoInterfaces.rule.name, "Nope") }
                == DBusErrorReply.unknownProperty)
        #expect(
            f.errorName { () throws(DBusErrorReply) in _ = try get(rulePath, "org.example.Nope", "Id") } == DBusErrorReply.unknownInterface)
        #expect(
            f.errorName { () throws(DBusErrorReply) in _ = try get(PestoBusNames.rulePath(.host, 6), PestoInterfaces.rule.name, "Id") }
                == DBusErrorReply.unknownObject)

        let managed = try f.client.call(
            PestodFixture.dest, PestodFixture.managerPath, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects")
        guard case .dictionary("o", "a{sa{sv}}", let entries)? = managed.first else {
            Issue.record("GetManagedObjects returned \(managed)")
            return
        }
        #expect(entries.map(\.key) == [.objectPath(PestodFixture.hostPath), .objectPath(rulePath)])
    }
}

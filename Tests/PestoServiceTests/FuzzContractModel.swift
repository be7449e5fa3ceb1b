// SPDX-License-Identifier: GPL-2.0-or-later

// The fuzz run's contract model (independent of pestod's code).
//
// Everything below is written from doc/dbus-api.md (the rule description: first ≤ last;
// target-address of the listening address's family, not multicast, not with a dual-stack
// rule; target ports not past 65535). Addresses are read
// with the C library's inet_pton, never with pestod's parser. Where the documents leave an
// answer open (the order of two checks, a case they do not mention), the model accepts every
// answer the documents allow and follows the one pestod gives; such cases are counted and
// printed as "open" in the summary.

import Foundation
import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoDBus
@testable import PestoService

/// Error names, spelled as doc/dbus-api.md spells them.
enum ContractError {
    static let prefix = "top.passt.Pesto1.Error."
    static let invalidRule = prefix + "InvalidRule"
    static let noSuchRule = prefix + "NoSuchRule"
    static let ruleExists = prefix + "RuleExists"
    static let ruleActive = prefix + "RuleActive"
    static let ruleInactive = prefix + "RuleInactive"
    static let conflict = prefix + "Conflict"
    static let noSpace = prefix + "NoSpace"
    static let locked = prefix + "Locked"
    static let notLocked = prefix + "NotLocked"
    static let bindFailed = prefix + "BindFailed"
    static let invalidArgs = "org.freedesktop.DBus.Error.InvalidArgs"
    static let unknownMethod = "org.freedesktop.DBus.Error.UnknownMethod"
    static let unknownObject = "org.freedesktop.DBus.Error.UnknownObject"
    static let unknownInterface = "org.freedesktop.DBus.Error.UnknownInterface"
    static let unknownProperty = "org.freedesktop.DBus.Error.UnknownProperty"
    static let propertyReadOnly = "org.freedesktop.DBus.Error.PropertyReadOnly"
    static let success = "success"
}

/// The answers the model allows for one call ("success" or error names).
typealias Answers = Set<String>

/// An address as the contract means it: IPv4 or IPv6 bytes, IPv4-mapped IPv6 text read as IPv4.
struct ModelAddress: Hashable, CustomStringConvertible {
    let v6: Bool
    let bytes: [UInt8]

    /// Parses address text with inet_pton; nil when neither family accepts it.
    static func parse(_ text: String) -> ModelAddress? {
        var a4 = in_addr()
        if inet_pton(AF_INET, text, &a4) == 1 {
            return ModelAddress(v6: false, bytes: withUnsafeBytes(of: &a4) { Array($0) })
        }
        var a6 = in6_addr()
        if inet_pton(AF_INET6, text, &a6) == 1 {
            let b = withUnsafeBytes(of: &a6) { Array($0) }
            if b[0..<10].allSatisfy({ $0 == 0 }) && b[10] == 0xFF && b[11] == 0xFF {
                return ModelAddress(v6: false, bytes: Array(b[12..<16]))
            }
            return ModelAddress(v6: true, bytes: b)
        }
        return nil
    }

    var isWildcard: Bool { bytes.allSatisfy { $0 == 0 } }
    var isMulticast: Bool { v6 ? bytes[0] == 0xFF : bytes[0] & 0xF0 == 0xE0 }
    var description: String {
        v6 ? "v6:" + bytes.map { String($0, radix: 16) }.joined(separator: ".") : bytes.map(String.init).joined(separator: ".")
    }
}

/// A rule as the contract describes it, defaults filled in.
struct ModelRule: Equatable, CustomStringConvertible {
    var proto: String
    /// nil: any address, dual stack.
    var address: ModelAddress?
    var interface: String
    var first: UInt16
    var last: UInt16
    /// nil: the table's default target.
    var target: ModelAddress?
    var targetPort: UInt16
    var scan: Bool
    var owner: String
    /// "", "v1" or "v2".
    var proxyProtocol = ""
    /// "pestod" or "client" ("" in a request means "pestod").
    var source = "pestod"

    var portCount: Int { max(0, Int(last) - Int(first) + 1) }

    /// The doc's conflict rule: same protocol, overlapping ports, interfaces the kernel would
    /// let collide (not two different named ones), matching addresses (dual stack matches
    /// everything; within one family a wildcard matches every address; else equal).
    func conflicts(with o: ModelRule) -> Bool {
        guard proto == o.proto, first <= o.last, o.first <= last else { return false }
        if !interface.isEmpty && !o.interface.isEmpty && interface != o.interface { return false }
        guard let a = address, let b = o.address else { return true }
        return a.v6 == b.v6 && (a.isWildcard || b.isWildcard || a == b)
    }

    /// How two conflicting rules' addresses match, for the summary: a dual-stack rule, a
    /// wildcard of one family, or equal addresses; and whether an interface was named.
    func conflictKind(with o: ModelRule) -> String {
        let how: String
        if address == nil || o.address == nil {
            how = "dual-stack"
        } else if address!.isWildcard || o.address!.isWildcard {
            how = address == o.address ? "equal wildcards" : "wildcard vs specific"
        } else {
            how = "equal addresses"
        }
        return interface.isEmpty && o.interface.isEmpty ? how : how + " (interface)"
    }

    var description: String {
        "\(proto) \(address?.description ?? "any")%\(interface) \(first)-\(last) -> \(target?.description ?? "default"):\(targetPort)\(scan ? " scan" : "")\(proxyProtocol.isEmpty ? "" : " proxy " + proxyProtocol)\(source == "pestod" ? "" : " source " + source) owner \(owner.count)"
    }
}

/// What the contract says about one rule description sent by a client.
struct RequestVerdict {
    enum Validity { case valid, invalid, open }
    /// Errors of the decoding step (InvalidArgs: shape; InvalidRule: missing key, bad protocol, unparsable address).
    var decodeErrors: Answers = []
    var rule: ModelRule?
    /// Whether the rule validator must reject it, must accept it, or the documents do not say.
    var validity = Validity.valid
    var reasons: [String] = []
}

/// The rule description's keys and their D-Bus types (doc/dbus-api.md, "Rule description").
let contractRuleKeys: [String: String] = [
    "protocol": "s", "address": "s", "interface": "s", "first-port": "q", "last-port": "q",
    "target-address": "s", "target-port": "q", "scan": "b", "owner": "s", "proxy-protocol": "s",
    "source": "s",
]

/// Decodes and judges a rule description the way the contract says pestod must.
func judgeRequest(_ fields: [(String, DBusValue)], capabilities: Set<String>) -> RequestVerdict {
    var v = RequestVerdict()
    var present = Set<String>()
    var values: [String: DBusValue] = [:]
    for (key, value) in fields {
        guard let type = contractRuleKeys[key] else {
            v.decodeErrors.insert(ContractError.invalidArgs)
            continue
        }
        if present.contains(key) { v.decodeErrors.insert(ContractError.invalidArgs) }
        present.insert(key)
        if value.signature != type { v.decodeErrors.insert(ContractError.invalidArgs) } else if values[key] == nil { values[key] = value }
    }
    func string(_ k: String) -> String? { values[k]?.stringValue }
    func port(_ k: String) -> UInt16? {
        if case .uint16(let p)? = values[k] { return p }
        return nil
    }
    let proto = string("protocol")
    if !present.contains("protocol") || !present.contains("first-port") { v.decodeErrors.insert(ContractError.invalidRule) }
    if let proto, proto != "tcp" && proto != "udp" { v.decodeErrors.insert(ContractError.invalidRule) }
    if let pp = string("proxy-protocol"), !["", "v1", "v2"].contains(pp) { v.decodeErrors.insert(ContractError.invalidRule) }
    if let source = string("source"), !["", "pestod", "client"].contains(source) { v.decodeErrors.insert(ContractError.invalidRule) }
    var address: ModelAddress? = nil
    if let text = string("address"), !text.isEmpty {
        address = ModelAddress.parse(text)
        if address == nil { v.decodeErrors.insert(ContractError.invalidRule) }
    }
    var target: ModelAddress? = nil
    if let text = string("target-address"), !text.isEmpty {
        target = ModelAddress.parse(text)
        if target == nil { v.decodeErrors.insert(ContractError.invalidRule) }
    }
    guard v.decodeErrors.isEmpty, let proto, let first = port("first-port") else { return v }
    let last = port("last-port") ?? first
    let rule = ModelRule(
        proto: proto, address: address, interface: string("interface") ?? "", first: first, last: last, target: target,
        targetPort: port("target-port") ?? first, scan: values["scan"]?.boolValue ?? false, owner: string("owner") ?? "",
        proxyProtocol: string("proxy-protocol") ?? "", source: (string("source") ?? "").isEmpty ? "pestod" : string("source")!)
    v.rule = rule
    func invalid(_ why: String) {
        v.validity = .invalid
        v.reasons.append(why)
    }
    func open(_ why: String) {
        if v.validity == .valid { v.validity = .open }
        v.reasons.append("open: " + why)
    }
    if first == 0 { invalid("first-port 0") }
    if last < first { invalid("last-port below first-port") }
    if Int(rule.targetPort) + Int(last) - Int(first) > 65535 { invalid("target ports pass 65535") }
    if rule.targetPort == 0 { open("target-port 0") }
    if let address, address.isMulticast { open("multicast listening address") }
    if let target {
        if address == nil { invalid("target-address with a dual-stack rule") }
        if let address, address.v6 != target.v6 { invalid("target-address of another family") }
        if target.isMulticast { invalid("multicast target-address") }
        if target.isWildcard { open("wildcard target-address") }
    }
    let name = Array(rule.interface.utf8)
    if name.count > 15 { invalid("interface longer than 15 bytes") }
    if rule.interface == "." || rule.interface == ".." { invalid("interface . or ..") }
    if name.contains(where: { $0 == UInt8(ascii: "/") || $0 == UInt8(ascii: ":") || $0 == 0x20 || (0x09...0x0D).contains($0) }) {
        invalid("interface with / : or whitespace")
    }
    if rule.owner.utf8.count > 255 { invalid("owner longer than 255 bytes") }
    if proto == "udp" && !rule.proxyProtocol.isEmpty { invalid("proxy-protocol on a udp rule") }
    // The fuzzed pestod has no --netns: no table can connect from the client's address.
    if rule.source == "client" { invalid("source client without a target namespace") }
    if !capabilities.contains(proto) { invalid("no \(proto) capability") }
    if let address, !capabilities.contains(address.v6 ? "ipv6" : "ipv4") { invalid("no capability for the address family") }
    if !rule.interface.isEmpty && !capabilities.contains("ifname") { invalid("no ifname capability") }
    if rule.scan && !capabilities.contains("scan") { invalid("scan without the scan capability") }
    return v
}

/// Reads a rule description as pestod returns it (Read, ReadIndex, List): every key, with its
/// type; nil (a violation) when something is missing or mistyped.
func readReturnedRule(_ value: DBusValue) -> ModelRule? {
    guard let pairs = value.vardictValue else { return nil }
    let d = Dictionary(pairs, uniquingKeysWith: { a, _ in a })
    guard d.count == pairs.count, Set(d.keys) == Set(contractRuleKeys.keys) else { return nil }
    for (k, t) in contractRuleKeys where d[k]?.signature != t { return nil }
    func port(_ k: String) -> UInt16 {
        if case .uint16(let p)? = d[k] { return p }
        return 0
    }
    func address(_ k: String) -> ModelAddress?? {
        let text = d[k]?.stringValue ?? ""
        if text.isEmpty { return .some(nil) }
        return ModelAddress.parse(text).map { .some($0) }
    }
    guard let a = address("address"), let t = address("target-address") else { return nil }
    return ModelRule(
        proto: d["protocol"]?.stringValue ?? "", address: a, interface: d["interface"]?.stringValue ?? "", first: port("first-port"),
        last: port("last-port"), target: t, targetPort: port("target-port"), scan: d["scan"]?.boolValue ?? false,
        owner: d["owner"]?.stringValue ?? "", proxyProtocol: d["proxy-protocol"]?.stringValue ?? "",
        source: d["source"]?.stringValue ?? "")
}

/// Reads a rule object's properties (top.passt.Pesto1.Rule) into a rule.
func ruleFromProperties(_ p: [String: DBusValue]) -> ModelRule? {
    func port(_ k: String) -> UInt16? {
        if case .uint16(let x)? = p[k] { return x }
        return nil
    }
    func address(_ k: String) -> ModelAddress?? {
        guard let text = p[k]?.stringValue else { return nil }
        if text.isEmpty { return .some(nil) }
        return ModelAddress.parse(text).map { .some($0) }
    }
    guard let proto = p["Protocol"]?.stringValue, let a = address("Address"), let interface = p["Interface"]?.stringValue,
        let first = port("FirstPort"), let last = port("LastPort"), let t = address("TargetAddress"), let tp = port("TargetPort"),
        let scan = p["Scan"]?.boolValue, let owner = p["Owner"]?.stringValue, let proxyProtocol = p["ProxyProtocol"]?.stringValue,
        let source = p["Source"]?.stringValue
    else { return nil }
    return ModelRule(
        proto: proto, address: a, interface: interface, first: first, last: last, target: t, targetPort: tp, scan: scan, owner: owner,
        proxyProtocol: proxyProtocol, source: source)
}

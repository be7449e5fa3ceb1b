// SPDX-License-Identifier: GPL-2.0-or-later

// The one list of a rule's fields: every field round-trips, required fields and address
// syntax are checked where fields become a rule, and the forwarding key ignores the owner.

import PestoModel
import Testing

@Suite("rule fields")
struct RuleFieldTests {
    static let rule = Rule(
        proto: .udp, address: IPAddress("192.0.2.1"), interface: "eth0", firstPort: 5000, lastPort: 5010,
        targetAddress: IPAddress("2001:db8::1"), targetPort: 6000, scan: true, owner: "ctr 1")

    @Test("a rule's field values build the same rule back")
    func roundTrip() throws {
        var fields: [RuleField: RuleFieldValue] = [:]
        for (field, value) in Self.rule.fieldValues {
            #expect(value.kind == field.kind)
            fields[field] = value
        }
        #expect(fields.count == RuleField.allCases.count)
        #expect(try Rule(fields: fields) == Self.rule)
    }

    @Test("absent fields take their defaults: last-port and target-port follow first-port")
    func defaults() throws {
        let rule = try Rule(fields: [.proto: .text("tcp"), .firstPort: .port(80)])
        #expect(rule == Rule(proto: .tcp, firstPort: 80, lastPort: 80, targetPort: 80))
        #expect(rule[.address] == .text(""))
        #expect(rule[.scan] == .flag(false))
    }

    @Test("protocol and first-port are required; a bad protocol or address is named")
    func refusals() {
        func message(_ fields: [RuleField: RuleFieldValue]) -> String? {
            do {
                _ = try Rule(fields: fields)
                return nil
            } catch { return error.code == .invalidRule ? error.message : "wrong code" }
        }
        #expect(message([.firstPort: .port(1)]) == "protocol is required (\"tcp\" or \"udp\").")
        #expect(message([.proto: .text("tcp")]) == "first-port is required.")
        #expect(message([.proto: .text("sctp"), .firstPort: .port(1)])?.contains("\"sctp\"") == true)
        #expect(
            message([.proto: .text("tcp"), .firstPort: .port(1), .targetAddress: .text("10.0.0.300")])
                == "target-address \"10.0.0.300\" is not an IPv4 or IPv6 address.")
    }

    @Test("keys and property names are distinct and follow the contract's spelling")
    func names() {
        #expect(Set(RuleField.allCases.map(\.key)).count == RuleField.allCases.count)
        #expect(Set(RuleField.allCases.map(\.property)).count == RuleField.allCases.count)
        #expect(RuleField(key: "target-port") == .targetPort)
        #expect(RuleField.targetPort.property == "TargetPort")
        #expect(RuleField(key: "targetPort") == nil)
    }

    @Test("the forwarding key is the rule without its owner")
    func forwardingKey() {
        var other = Self.rule
        other.owner = "someone else"
        #expect(other.forwardsSame(as: Self.rule))
        #expect(other.forwardingKey == Self.rule.forwardingKey)
        other.targetPort = 6001
        #expect(!other.forwardsSame(as: Self.rule))
    }
}

@Suite("counts in messages")
struct CountedTests {
    @Test("one thing is singular, any other count plural")
    func counted() {
        #expect(ClientText.counted(1, "rule") == "1 rule")
        #expect(ClientText.counted(0, "rule") == "0 rules")
        #expect(ClientText.counted(UInt32(2), "rule") == "2 rules")
        #expect(ClientText.counted(1, "entry", plural: "entries") == "1 entry")
        #expect(ClientText.counted(3, "entry", plural: "entries") == "3 entries")
    }
}

// SPDX-License-Identifier: GPL-2.0-or-later

// PortSpec against the shared table of spec cases, Tests/port-spec-cases.json: each spec must
// make exactly the rules listed, or be refused with exactly the message and piece listed. The
// browser test runs the same table through the Cockpit page's parser (cockpit/port-spec.js),
// so the page and pestoctl read every spec alike and say the same when they refuse one.

import Foundation
import PestoSystem
import Testing

@testable import PestoModel

/// One row of Tests/port-spec-cases.json.
struct PortSpecCase: Decodable, Sendable, CustomTestStringConvertible {
    /// A rule as the table writes it: the page's field names, "" for no address.
    struct RuleFields: Decodable, Equatable, Sendable {
        var address: String
        var interface: String
        var firstPort: Int
        var lastPort: Int
        var targetAddress: String
        var targetPort: Int
        var scan: Bool
    }

    var option: String
    var spec: String
    /// The rules made, in order; nil when refused or `none`.
    var rules: [RuleFields]?
    var bestEffort: Bool?
    var none: Bool?
    /// The refusal: the piece named and the whole message.
    var piece: String?
    var message: String?

    var testDescription: String { "\(option) \"\(spec)\"" }
}

/// The shared table, read once.
enum PortSpecCases {
    /// The file's contents: the ephemeral range and the cases.
    struct File: Decodable {
        var ephemeral: [Int]
        var cases: [PortSpecCase]
    }

    /// Tests/port-spec-cases.json, found from this file's path.
    static let path: String = {
        var parts = #filePath.split(separator: "/", omittingEmptySubsequences: false)
        parts.removeLast(2)  // PestoModelTests/<file>
        return parts.joined(separator: "/") + "/port-spec-cases.json"
    }()

    /// The table; nil when it cannot be read (the first test says so).
    static let file: File? = {
        guard let bytes = readFile(path, limit: 1 << 22) else { return nil }
        return try? JSONDecoder().decode(File.self, from: Data(bytes))
    }()
}

@Suite("PortSpec: the spec cases shared with the Cockpit page")
struct PortSpecCasesTests {
    @Test("the table reads and covers the messages the edges issue names")
    func table() throws {
        let file = try #require(PortSpecCases.file, "cannot read \(PortSpecCases.path)")
        let specs = Set(file.cases.map(\.spec))
        for required in ["127.0.0.1/350990", "70000", "35093,35094", "1.2.3/35190", "35100-35090"] {
            #expect(specs.contains(required), "the table lacks \(required)")
        }
        #expect(file.cases.count >= 40)
    }

    @Test("each spec makes the listed rules or the listed message", arguments: PortSpecCases.file?.cases ?? [])
    func specCase(_ row: PortSpecCase) throws {
        let file = try #require(PortSpecCases.file)
        let ephemeral = UInt16(file.ephemeral[0])...UInt16(file.ephemeral[1])
        let table: TableKind = row.option == "-T" || row.option == "-U" ? .splice : .host
        let proto: TransportProtocol = row.option.lowercased() == "-t" ? .tcp : .udp
        do {
            let parsed = try PortSpec.parse(row.spec, proto: proto, table: table, ephemeralPorts: ephemeral)
            #expect(row.message == nil, "accepted, but the table says: \(row.message ?? "")")
            #expect(parsed.isNone == (row.none ?? false))
            #expect(parsed.bestEffort == (row.bestEffort ?? false))
            let made = parsed.rules.map { rule in
                PortSpecCase.RuleFields(
                    address: rule.address?.description ?? "", interface: rule.interface, firstPort: Int(rule.firstPort),
                    lastPort: Int(rule.lastPort), targetAddress: rule.targetAddress?.description ?? "",
                    targetPort: Int(rule.targetPort), scan: rule.scan)
            }
            #expect(made == (row.rules ?? []))
            #expect(parsed.rules.allSatisfy { $0.proto == proto })
        } catch {
            #expect(error.message == row.message, "refused with piece \"\(error.piece)\"")
            #expect(error.piece == row.piece)
            #expect(error.spec == row.spec)
        }
    }
}

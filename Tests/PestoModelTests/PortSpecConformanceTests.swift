// SPDX-License-Identifier: GPL-2.0-or-later

// PortSpec against upstream pesto: every row of the port spec table in
// doc/pesto-conformance.md (recorded from a real upstream pesto and pasta) is read from the
// document itself, so the document and the test cannot drift. For each row the spec must get
// pesto's verdict and, when accepted, exactly pesto's rules, printed the way pesto prints them.

import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoModel

#if canImport(Glibc)
    import Glibc
#endif

/// One row of the port spec table.
struct ConformanceRow: Sendable, CustomTestStringConvertible {
    var option: String
    var spec: String
    /// pesto's exit status: 0 accepted, 1 refused.
    var pestoStatus: Int
    /// The rules pesto made, as it prints them (whitespace collapsed); empty when refused.
    var rules: [String]
    /// pestoctl's column: "same", or how it differs.
    var pestoctl: String

    var testDescription: String { "\(option) \"\(spec)\"" }
}

/// The doc's rows, read once.
enum ConformanceTable {
    /// doc/pesto-conformance.md, found from this file's path.
    static let path: String = {
        var parts = #filePath.split(separator: "/", omittingEmptySubsequences: false)
        parts.removeLast(3)  // Tests/PestoEngineTests/<file>
        return parts.joined(separator: "/") + "/doc/pesto-conformance.md"
    }()

    /// The text between the first pair of backticks of `cell` (the cell's code span), exactly.
    static func code(_ cell: Substring) -> String? {
        guard let open = cell.firstIndex(of: "`") else { return nil }
        let rest = cell[cell.index(after: open)...]
        guard let close = rest.firstIndex(of: "`") else { return nil }
        return String(rest[..<close])
    }

    /// Every code span of `cell`, in order.
    static func codes(_ cell: Substring) -> [String] {
        var result: [String] = []
        var rest = cell
        while let open = rest.firstIndex(of: "`") {
            let after = rest[rest.index(after: open)...]
            guard let close = after.firstIndex(of: "`") else { break }
            result.append(String(after[..<close]))
            rest = after[after.index(after: close)...]
        }
        return result
    }

    /// The rows of the "Port specs" table.
    static let rows: [ConformanceRow] = {
        guard let bytes = readFile(path, limit: 1 << 20) else { return [] }
        let text = String(decoding: bytes, as: UTF8.self)
        let lines = text.split(separator: "\n", omittingEmptySubsequences: false)
        guard let section = lines.firstIndex(of: "## Port specs") else { return [] }
        var rows: [ConformanceRow] = []
        for line in lines[section...] {
            guard line.hasPrefix("| `-") else { continue }
            // Cells are separated by " | "; no spec in the table contains one.
            let cells = line.dropFirst(2).split(separator: " | ", omittingEmptySubsequences: false)
            guard cells.count == 5, let option = code(cells[0]), let spec = code(cells[1]),
                let status = Int(cells[2].trimmingCharacters(in: " "))
            else { continue }
            var last = cells[4]
            if last.hasSuffix(" |") { last = last.dropLast(2) }
            rows.append(
                ConformanceRow(
                    option: option, spec: spec, pestoStatus: status,
                    rules: status == 0 ? codes(cells[3]) : [],
                    pestoctl: String(last).trimmingCharacters(in: " ")))
        }
        return rows
    }()
}

extension Substring {
    /// The substring without `characters` at either end.
    fileprivate func trimmingCharacters(in characters: Character) -> Substring {
        var s = self
        while s.first == characters { s = s.dropFirst() }
        while s.last == characters { s = s.dropLast() }
        return s
    }
}

extension String {
    fileprivate func trimmingCharacters(in characters: Character) -> String {
        String(Substring(self).trimmingCharacters(in: characters))
    }
}

/// A rule printed as upstream pesto prints it (fwd_rule_fmt), whitespace collapsed.
func pestoText(_ rule: Rule, bestEffort: Bool) -> String {
    let address = rule.address.map { "\($0)" } ?? "*"
    let interface = rule.interface.isEmpty ? "" : "%" + rule.interface
    let ports = rule.firstPort == rule.lastPort ? "\(rule.firstPort)" : "\(rule.firstPort)-\(rule.lastPort)"
    let targetLast = Int(rule.targetPort) + Int(rule.lastPort) - Int(rule.firstPort)
    let targets = rule.firstPort == rule.lastPort ? "\(rule.targetPort)" : "\(rule.targetPort)-\(targetLast)"
    let target = rule.targetAddress.map { "\($0):" } ?? ""
    var text = "\(rule.proto.rawValue.uppercased()) [\(address)]\(interface):\(ports) => \(target)\(targets)"
    if bestEffort { text += " (best effort)" }
    if rule.scan { text += " (auto-scan)" }
    return text
}

@Suite("Port spec conformance with upstream pesto")
struct PortSpecConformanceTests {
    /// The range the table was recorded with.
    static let ephemeral: ClosedRange<UInt16> = 32768...60999

    @Test("the table is there and covers the man pages' forms")
    func tableRead() {
        let specs = Set(ConformanceTable.rows.map(\.spec))
        #expect(ConformanceTable.rows.count >= 100, "\(ConformanceTable.path)")
        for form in [
            "none", "all", "auto", "22", "22:23", "22-80:32-90", "~25", "8000-8010,auto", "192.0.2.1%eth0/22",
            "0.0.0.0/8080:10.88.0.2/80", "[::]/8080:fd00::2/80", "35022-35024:35032", "",
        ] {
            #expect(specs.contains(form), "missing row for \"\(form)\"")
        }
        #expect(Set(ConformanceTable.rows.map(\.option)) == ["-t", "-u", "-T", "-U"])
    }

    @Test("every row: pesto's verdict and pesto's rules", arguments: ConformanceTable.rows)
    func row(_ row: ConformanceRow) {
        let proto: TransportProtocol = row.option == "-t" || row.option == "-T" ? .tcp : .udp
        let table: TableKind = row.option == "-t" || row.option == "-u" ? .host : .splice
        let result: PortSpec
        do {
            result = try PortSpec.parse(row.spec, proto: proto, table: table, ephemeralPorts: Self.ephemeral)
        } catch {
            #expect(row.pestoStatus == 1, "refused, but pesto accepts it: \(error)")
            #expect(!error.message.isEmpty)
            return
        }
        #expect(row.pestoStatus == 0, "accepted, but pesto refuses it: \(result.rules)")
        guard row.pestoStatus == 0 else { return }
        #expect(result.rules.map { pestoText($0, bestEffort: result.bestEffort) } == row.rules)
        // "same": pestod accepts every rule; otherwise the column says how pestod refuses one.
        let all: Capabilities = [.ipv4, .ipv6, .tcp, .udp, .scan, .ifname]
        let refused = result.rules.contains { (try? $0.validate(capabilities: all)) == nil }
        if row.pestoctl == "same" {
            #expect(!refused, "pestod would refuse a rule of a row marked \"same\"")
        } else {
            #expect(row.pestoctl.hasPrefix("exit 1: pestod refuses"))
            #expect(refused, "the row says pestod refuses a rule, but it accepts all of them")
        }
    }
}

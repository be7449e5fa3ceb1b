// SPDX-License-Identifier: GPL-2.0-or-later

// The shipped systemd unit stays sandboxed: `systemd-analyze security --offline=yes` must rate
// systemd/pestod.service's exposure below 3.0 ("OK"). Offline analysis reads only the unit
// file; the ExecStart binary need not be installed.

import Foundation
import PestoTestSupport
import Testing

@Suite("systemd unit", .timeLimit(.minutes(10)))
struct SystemdUnitTests {
    static let analyze = "/usr/bin/systemd-analyze"
    static let hasAnalyze = FileManager.default.isExecutableFile(atPath: analyze)

    /// The number after "Overall exposure level for UNIT:" in systemd-analyze's output.
    static func exposure(in output: String) -> Double? {
        guard let line = output.split(separator: "\n").first(where: { $0.contains("Overall exposure level for") }),
            let colon = line.lastIndex(of: ":")
        else { return nil }
        return line[line.index(after: colon)...].split(separator: " ").first.flatMap { Double($0) }
    }

    @Test("the exposure parser reads systemd-analyze's summary line")
    func parser() {
        #expect(Self.exposure(in: "✓ UMask= ...\n\n→ Overall exposure level for pestod.service: 1.9 OK 🙂\n") == 1.9)
        #expect(Self.exposure(in: "no summary") == nil)
    }

    @Test(
        "systemd-analyze security --offline=yes rates systemd/pestod.service below 3.0",
        .enabled(if: hasAnalyze, "needs systemd-analyze (Debian package systemd)"))
    func exposureBelowThree() throws {
        let unit = Products.repository.appendingPathComponent("systemd/pestod.service").path
        let r = try run(Self.analyze, ["security", "--offline=yes", "--no-pager", unit])
        #expect(r.status == 0, "\(r.err)")
        let level = try #require(Self.exposure(in: r.out), "no exposure level in: \(r.out) \(r.err)")
        #expect(level < 3.0, "exposure \(level):\n\(r.out.split(separator: "\n").filter { $0.hasPrefix("✗") }.joined(separator: "\n"))")
    }
}

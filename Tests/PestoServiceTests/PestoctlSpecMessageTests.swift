// SPDX-License-Identifier: GPL-2.0-or-later

// pestoctl's messages for bad port specs, end to end: the binary against a real pestod on a
// private bus. Each message names the user's own input, the real cause and what to write
// instead, and nothing changes in pestod's tables. The words come from PestoModel's
// PortSpecDiagnosis, which the Cockpit page's parser shares (Tests/port-spec-cases.json).

import Foundation
import PestoModel
import PestoTestSupport
import Testing

@testable import PestoDBus

@Suite("pestoctl: bad port spec messages", .timeLimit(.minutes(10)))
struct PestoctlSpecMessageTests {
    /// (arguments, words the message must hold: the input, the cause, the next step).
    static let cases: [([String], [String])] = [
        (
            ["-t", "1.2.3/35190"],
            ["-t: invalid port spec \"1.2.3/35190\"", "\"1.2.3\" before \"/\" is not an IP address", "127.0.0.1/35190"]
        ),
        (["-t", "70000"], ["\"70000\" is past 65535", "give a port from 1 to 65535"]),
        (["-t", "35100-35090"], ["\"35100-35090\" is a reversed range", "write 35090-35100"]),
        (["-u", "127.0.0.1/350990"], ["\"350990\" is past 65535"]),
        (["-t", "22:35100-35090"], ["\":35100-35090\" is a reversed range", "write 35090-35100"]),
    ]

    @Test("a bad spec exits 1 with a message naming input, cause and fix; nothing changes", .timeLimit(.minutes(2)))
    func messages() throws {
        let f = try PestodFixture()
        let before = "\(try f.table("List"))"
        for (arguments, words) in Self.cases {
            let r = try f.pestoctl(arguments)
            #expect(r.status == 1, "\(arguments): \(r.status) \(r.err)")
            for word in words {
                #expect(r.err.contains(word), "\(arguments): \(r.err)")
            }
            #expect(!r.err.contains("follows the ports"), "\(arguments): \(r.err)")
        }
        #expect("\(try f.table("List"))" == before)
    }
}

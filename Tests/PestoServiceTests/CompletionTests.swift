// SPDX-License-Identifier: GPL-2.0-or-later

// Shell completions: pestoctl's (completions/, written by hand) offer every long option its
// --help lists, for bash, zsh and fish; the bash one completes as a shell would call it; pestod's
// are generated from its command line (scripts/demo.sh installs both).

import Foundation
import PestoTestSupport
import Testing

@Suite("Shell completions")
struct CompletionTests {
    /// The repository's completions/ folder.
    static let folder: String = {
        var parts = #filePath.split(separator: "/", omittingEmptySubsequences: false)
        parts.removeLast(3)
        return parts.joined(separator: "/") + "/completions/"
    }()

    /// The long options `pestoctl --help` lists.
    static func longOptions() throws -> Set<String> {
        let help = try run(Products.path("pestoctl"), ["--help"]).out
        var options: Set<String> = []
        for word in help.split(whereSeparator: { " ,=[]|()\n".contains($0) }) where word.hasPrefix("--") && word.count > 2 {
            options.insert(String(word.dropFirst(2)))
        }
        return options
    }

    @Test("pestoctl's completions offer every long option of --help, in bash, zsh and fish")
    func everyOption() throws {
        let options = try Self.longOptions()
        #expect(
            options.isSuperset(of: [
                "add", "delete", "clear", "tcp-ports", "udp-ports", "tcp-ns", "udp-ns", "show", "debug",
                "help", "version", "best-effort", "id", "quiet", "json", "system", "session", "address",
            ]))
        for file in ["pestoctl.bash", "_pestoctl", "pestoctl.fish"] {
            let text = try String(contentsOfFile: Self.folder + file, encoding: .utf8)
            for option in options {
                let present =
                    file.hasSuffix(".fish")
                    ? text.contains("-l \(option) ") || text.hasSuffix("-l \(option)")
                    : text.contains("--\(option)")
                #expect(present, "\(file) lacks --\(option)")
            }
        }
    }

    @Test("the bash completion completes tables, specs, options and commands")
    func bash() throws {
        func complete(_ words: [String]) throws -> String {
            let script =
                "source \(Self.folder)pestoctl.bash; COMP_WORDS=(\(words.map { "'\($0)'" }.joined(separator: " "))); "
                + "COMP_CWORD=\(words.count - 1); _pestoctl; echo \"${COMPREPLY[*]}\""
            let r = try run("/bin/bash", ["-c", script])
            #expect(r.status == 0, "\(r.err)")
            return r.out.trimmingCharacters(in: .whitespacesAndNewlines)
        }
        #expect(try complete(["pestoctl", "-C", ""]) == "HOST SPLICE")
        #expect(try complete(["pestoctl", "-t", "a"]) == "all auto")
        #expect(try complete(["pestoctl", "--tc"]) == "--tcp-ports --tcp-ns")
        #expect(try complete(["pestoctl", "wat"]) == "watch")
    }

    @Test("pestod generates its completion scripts from its command line")
    func pestodGenerated() throws {
        for shell in ["bash", "zsh", "fish"] {
            let r = try run(Products.path("pestod"), ["--generate-completion-script", shell])
            #expect(r.status == 0)
            #expect(r.out.contains("no-state") && r.out.contains("control") && r.out.contains("netns"), "\(shell)")
        }
    }
}

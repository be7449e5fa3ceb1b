// SPDX-License-Identifier: GPL-2.0-or-later

// Shell completions: pestoctl's (completions/, written by hand) offer every long option its
// --help lists, for bash, zsh and fish; the bash one completes as a shell would call it; pestod's
// are generated from its command line (scripts/demo.sh installs both).

import Foundation
import PestoTestSupport
import Testing

@Suite("Shell completions", .timeLimit(.minutes(10)))
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

    /// pestod's generated completion script for `shell`, in a file.
    static func pestodScript(_ shell: String, in directory: TemporaryDirectory) throws -> String {
        let r = try run(Products.path("pestod"), ["--generate-completion-script", shell])
        #expect(r.status == 0)
        let path = directory.file("pestod.\(shell)")
        try r.out.write(toFile: path, atomically: false, encoding: .utf8)
        return path
    }

    /// A directory with two state files and a subdirectory, for path completions.
    static func pathFixture() throws -> TemporaryDirectory {
        let directory = try TemporaryDirectory()
        for name in ["state-a", "state-b"] { #expect(FileManager.default.createFile(atPath: directory.file(name), contents: nil)) }
        try FileManager.default.createDirectory(atPath: directory.file("sub"), withIntermediateDirectories: false)
        return directory
    }

    @Test("bash completes pestod's values (--log-level, --authorize, --overlap) and paths (--netns, --state, --control, --runtime-dir)")
    func pestodBash() throws {
        let directory = try Self.pathFixture()
        let script = try Self.pestodScript("bash", in: directory)
        func complete(_ words: [String]) throws -> Set<String> {
            let quoted = words.map { "'\($0)'" }.joined(separator: " ")
            let r = try run(
                "/bin/bash",
                [
                    "-c",
                    "source \(script); complete -p pestod >/dev/null || exit 9; COMP_WORDS=(\(quoted)); COMP_CWORD=\(words.count - 1); "
                        + "COMP_LINE=\"${COMP_WORDS[*]}\"; COMP_POINT=${#COMP_LINE}; COMPREPLY=(); "
                        + "_pestod pestod \"${COMP_WORDS[COMP_CWORD]}\" \"${COMP_WORDS[COMP_CWORD-1]}\"; printf '%s\\n' \"${COMPREPLY[@]}\"",
                ])
            #expect(r.status == 0, "\(r.err)")
            return Set(r.out.split(separator: "\n").map(String.init))
        }
        #expect(try complete(["pestod", "--log-level", ""]) == ["trace", "debug", "info", "notice", "warning", "error", "critical"])
        #expect(try complete(["pestod", "--log-level", "w"]) == ["warning"])
        #expect(try complete(["pestod", "--authorize", ""]) == ["polkit", "root", "none"])
        #expect(try complete(["pestod", "--overlap", ""]) == ["refuse", "first-match"])
        for option in ["--netns", "--state", "--control"] {
            #expect(
                try complete(["pestod", option, directory.file("state-")]) == [directory.file("state-a"), directory.file("state-b")],
                "\(option)")
        }
        #expect(try complete(["pestod", "--runtime-dir", directory.path + "/"]) == [directory.file("sub")])
        #expect(try complete(["pestod", "--replac"]) == ["--replace"])
    }

    @Test(
        "fish completes pestod's values and paths, and pestoctl's options",
        .enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/fish"), "fish is not installed (apt-get install fish)"))
    func fish() throws {
        let directory = try Self.pathFixture()
        let script = try Self.pestodScript("fish", in: directory)
        func complete(_ line: String, source: String = script) throws -> Set<String> {
            let r = try run("/usr/bin/fish", ["--no-config", "-c", "source \(source); complete -C \"\(line)\""])
            #expect(r.status == 0, "\(r.err)")
            return Set(r.out.split(separator: "\n").map { String($0.split(separator: "\t").first ?? "") })
        }
        #expect(try complete("pestod --log-level ") == ["trace", "debug", "info", "notice", "warning", "error", "critical"])
        #expect(try complete("pestod --authorize ") == ["polkit", "root", "none"])
        #expect(try complete("pestod --overlap ") == ["refuse", "first-match"])
        #expect(try complete("pestod --state \(directory.file("state-"))") == [directory.file("state-a"), directory.file("state-b")])
        #expect(try complete("pestod --netns \(directory.file("state-"))") == [directory.file("state-a"), directory.file("state-b")])
        #expect(try complete("pestod --runtime-dir \(directory.path)/").contains(directory.file("sub") + "/"))
        #expect(try complete("pestoctl --own", source: Self.folder + "pestoctl.fish") == ["--owner"])
        #expect(try complete("pestoctl -C ", source: Self.folder + "pestoctl.fish") == ["HOST", "SPLICE"])
    }

    @Test(
        "zsh: pestod's generated script parses and gives the value lists and path actions",
        .enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/zsh"), "zsh is not installed (apt-get install zsh)"))
    func zsh() throws {
        let directory = try TemporaryDirectory()
        let script = try Self.pestodScript("zsh", in: directory)
        for file in [script, Self.folder + "_pestoctl"] {
            let r = try run("/usr/bin/zsh", ["-n", file])
            #expect(r.status == 0, "\(file): \(r.err)")
        }
        let text = try String(contentsOfFile: script, encoding: .utf8)
        #expect(text.contains("('trace' 'debug' 'info' 'notice' 'warning' 'error' 'critical')"))
        #expect(text.contains("('none' 'root' 'polkit')") && text.contains("('refuse' 'first-match')"))
        for option in ["netns", "state", "control"] {
            #expect(text.contains("'--\(option)[") && text.contains(":_files'"), "\(option)")
        }
        #expect(text.contains(":_files -/'"), "--runtime-dir completes directories")
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

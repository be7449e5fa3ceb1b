// SPDX-License-Identifier: GPL-2.0-or-later

// StateFile: the text form of saved rules: the format of pestod's state file before the
// state store (StateStore.swift), read once to migrate it, and the form the takeover wire
// (TakeoverWire.swift) sends the tables in.
//
// Format (text, one rule per line, version first; values percent-encoded where needed):
//     pestod-state 1
//     rule host 5 active protocol=tcp address=127.0.0.1 interface= first-port=80 last-port=80 target-address= target-port=8080 scan=0 owner=ctr%201
// The store keeps a rule's fields in this same text (`fields(of:)`, `parseLine`).
//
// Loading is strict: any line it does not understand makes the whole file invalid; pestod
// then reports it, moves the file aside under a name no other file has
// (FILE.bad-<unix time>[.<n>], never replacing one) and starts with empty tables rather
// than with a guess.
//
// Restoring never loses a rule: a saved rule that cannot be restored exactly as saved
// (its table is missing because --netns was not given, the table is full, the rule is
// invalid for this table, or its activation conflicts) is left out of the tables and
// *carried*: kept in the store, apart from the live rules, and tried again at the next
// start. Where a carried rule and a live rule share a table and an ID, the live one is
// tried first and wins; the carried one stays carried.

import PestoDBus
import PestoEngine
import PestoModel
import PestoSystem

#if canImport(Glibc)
    import Glibc
#endif

/// Reads pestod's state file of the text format, and renders and parses that text.
public struct StateFile {
    /// The file's path.
    public let path: String

    public init(path: String) { self.path = path }

    /// One saved rule.
    public struct Entry: Equatable, Sendable {
        public var table: TableKind
        public var id: UInt32
        public var active: Bool
        public var rule: Rule
    }

    // MARK: Text

    static let header = "pestod-state 1"

    /// The file's content for `entries`: each rule's fields in `RuleField`'s order, text
    /// percent-encoded, ports in decimal, flags as 0 or 1.
    static func render(_ entries: [Entry]) -> String {
        var out = header + "\n"
        for e in entries { out += line(e) + "\n" }
        return out
    }

    /// One rule's line: `rule TABLE ID active|inactive` and its fields (`fields(of:)`).
    static func line(_ e: Entry) -> String {
        "rule \(e.table.rawValue) \(e.id) \(e.active ? "active" : "inactive") " + fields(of: e.rule)
    }

    /// A rule's fields as `key=value` words separated by spaces, in `RuleField`'s order.
    static func fields(of rule: Rule) -> String {
        var out = ""
        for (field, value) in rule.fieldValues {
            if !out.isEmpty { out += " " }
            switch value {
            case .text(let v): out += "\(field.key)=\(escape(v))"
            case .port(let v): out += "\(field.key)=\(v)"
            case .flag(let v): out += "\(field.key)=\(v ? 1 : 0)"
            }
        }
        return out
    }

    /// Parses a file's content; throws a message naming the bad line.
    static func parse(_ text: String) throws(PestoError) -> [Entry] {
        var lines = text.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        if lines.last == "" { lines.removeLast() }
        guard lines.first == header else { throw bad(1, "the first line is not \"\(header)\"") }
        var entries: [Entry] = []
        for (n, line) in lines.enumerated().dropFirst() {
            entries.append(try parseLine(line, number: n + 1))
        }
        return entries
    }

    /// Parses one rule's line (`line(_:)`); throws a message naming line `number`.
    static func parseLine(_ line: String, number: Int) throws(PestoError) -> Entry {
        let words = line.split(separator: " ", omittingEmptySubsequences: false).map(String.init)
        // Files written before a field was added lack it (`proxy-protocol`, `source`): it takes its
        // default. Every field the first version wrote is still required.
        let fieldCount = words.count - 4
        guard fieldCount >= RuleField.allCases.count - Self.fieldsAddedLater.count, fieldCount <= RuleField.allCases.count,
            words[0] == "rule"
        else {
            throw bad(number, "expected a rule with \(RuleField.allCases.count) fields")
        }
        guard let table = TableKind(rawValue: words[1]) else { throw bad(number, "unknown table \(words[1])") }
        guard let id = UInt32(words[2]) else { throw bad(number, "bad rule ID \(words[2])") }
        guard words[3] == "active" || words[3] == "inactive" else { throw bad(number, "bad state \(words[3])") }
        var fields: [RuleField: RuleFieldValue] = [:]
        for word in words[4...] {
            guard let eq = word.firstIndex(of: "="), let field = RuleField(key: String(word[..<eq])),
                fields[field] == nil
            else { throw bad(number, "bad field \(word)") }
            let text = String(word[word.index(after: eq)...])
            let value: RuleFieldValue?
            switch field.kind {
            case .text: value = unescape(text).map(RuleFieldValue.text)
            case .port: value = UInt16(text).map(RuleFieldValue.port)
            case .flag: value = text == "1" ? .flag(true) : text == "0" ? .flag(false) : nil
            }
            guard let value else { throw bad(number, "bad \(field.key)") }
            fields[field] = value
        }
        for field in RuleField.allCases where fields[field] == nil && !Self.fieldsAddedLater.contains(field) {
            throw bad(number, "missing field \(field.key)")
        }
        let rule: Rule
        do { rule = try Rule(fields: fields) } catch { throw bad(number, error.message) }
        return Entry(table: table, id: id, active: words[3] == "active", rule: rule)
    }

    /// Fields added after the file's first version, which an older file's lines lack.
    static let fieldsAddedLater: Set<RuleField> = [.proxyProtocol, .source]

    static func bad(_ line: Int, _ what: String) -> PestoError {
        PestoError(.system, "line \(line): \(what)")
    }

    /// Percent-encodes everything but [A-Za-z0-9._:-].
    static func escape(_ s: String) -> String {
        var out = ""
        for b in s.utf8 {
            let c = Character(Unicode.Scalar(b))
            if b < 0x80 && (c.isLetter || c.isNumber || ".-_:".contains(c)) {
                out.append(c)
            } else {
                out += "%" + String(b, radix: 16, uppercase: true).leftPadded2
            }
        }
        return out
    }

    /// Reverses `escape`; nil for malformed escapes or invalid UTF-8.
    static func unescape(_ s: String) -> String? {
        var bytes: [UInt8] = []
        var it = Array(s.utf8)[...]
        while let b = it.popFirst() {
            if b == UInt8(ascii: "%") {
                guard it.count >= 2, let v = UInt8(String(decoding: it.prefix(2), as: UTF8.self), radix: 16) else { return nil }
                bytes.append(v)
                it = it.dropFirst(2)
            } else {
                bytes.append(b)
            }
        }
        return String(validating: bytes, as: UTF8.self)
    }

    // MARK: Disk

    /// The directory holding the file.
    var directory: String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }

    /// What `load` found.
    public enum LoadResult: Sendable {
        /// No file yet: a first start.
        case missing
        case loaded([Entry])
        /// The file could not be used; it was moved to `movedTo` (nil if even that failed).
        case invalid(reason: String, movedTo: String?)
    }

    /// Reads the file; an invalid one is moved aside.
    public func load() -> LoadResult {
        guard case .success = Sys.exists(path) else { return .missing }
        let bytes: [UInt8]
        switch readWholeFile(path, limit: Self.maxSize) {
        case .success(let read): bytes = read
        case .failure(let e): return moveAside("cannot be read, or is larger than \(Self.maxSize >> 20) MiB: \(e)")
        }
        let text = String(decoding: bytes, as: UTF8.self)
        do {
            return .loaded(try Self.parse(text))
        } catch {
            return moveAside(error.message)
        }
    }

    /// The largest state file pestod reads: far above two full tables (2 × 65,535 rules).
    static let maxSize = 256 << 20

    /// Moves the file to FILE.bad-<unix time>, or FILE.bad-<unix time>.<n> with the first
    /// free n: link(2) refuses an existing name, so no earlier copy is ever replaced (where
    /// the file system has no hard links, a rename to a name just checked to be free).
    func moveAside(_ reason: String) -> LoadResult {
        let stamp = "\(path).bad-\(time(nil))"
        for n in 0..<1000 {
            let aside = n == 0 ? stamp : "\(stamp).\(n)"
            switch Sys.link(path, to: aside) {
            case .success:
                // The bad file is kept at `aside`; should the unlink fail, the next start finds
                // it again and moves it aside again, which loses nothing.
                _ = Sys.unlink(path)
                return .invalid(reason: reason, movedTo: aside)
            case .failure(.fileExists):
                continue
            case .failure:
                // No hard links here (some file systems): rename, to a name checked to be free.
                if case .failure = Sys.exists(aside), case .success = Sys.rename(path, to: aside) {
                    return .invalid(reason: reason, movedTo: aside)
                }
            }
            break
        }
        return .invalid(reason: reason, movedTo: nil)
    }
}

extension String {
    /// Two hex digits.
    fileprivate var leftPadded2: String { count >= 2 ? self : "0" + self }
}

extension StateFile {
    /// The committed state of every table of `engine`.
    public static func entries(of engine: ForwardingEngine) -> [Entry] {
        engine.tables.flatMap { t in
            t.list().map { Entry(table: t.kind, id: $0.id, active: $0.status.active, rule: $0.rule) }
        }
    }

    /// What `restore` did.
    public struct Restored: Sendable {
        /// How many rules are back in the tables exactly as saved.
        public var restored = 0
        /// The saved rules that are not, each with the reason; they are carried (kept in the file).
        public var carried: [(entry: Entry, reason: String)] = []
    }

    /// Puts saved rules back into `engine`'s tables: inserts all, then activates the active
    /// ones. A rule that cannot be inserted, or is saved active and cannot be activated, is
    /// left out of the tables (deleted again if it was inserted) and returned as carried;
    /// the others are restored regardless.
    public static func restore(_ entries: [Entry], into engine: ForwardingEngine) -> Restored {
        var result = Restored()
        var inserted: [Entry] = []
        for e in entries {
            guard let t = engine.table(e.table) else {
                result.carried.append((e, "there is no \(e.table.name) table (is --netns missing?)"))
                continue
            }
            do throws(PestoError) {
                try t.insert(id: e.id, rule: e.rule)
                inserted.append(e)
            } catch {
                result.carried.append((e, error.message))
            }
        }
        for e in inserted {
            guard e.active, let t = engine.table(e.table) else { continue }
            do throws(PestoError) { _ = try t.activate(id: e.id) } catch {
                try? t.delete(id: e.id)  // inactive, just inserted: cannot fail
                result.carried.append((e, error.message))
            }
        }
        result.restored = entries.count - result.carried.count
        return result
    }
}

// StateFile: the committed tables on disk, so a restarted pestod comes back as it was.
//
// Format (text, one rule per line, version first; values percent-encoded where needed):
//     pestod-state 1
//     rule host 5 active protocol=tcp address=127.0.0.1 interface= first-port=80 last-port=80 target-address= target-port=8080 scan=0 owner=ctr%201
// Saving writes the whole file anew after every commit: to FILE.tmp, fsync, rename over
// FILE, fsync the directory. A crash (kill -9, power loss) at any moment leaves either the
// old or the new complete file, never a mix. Loading is strict: any line it does not
// understand makes the whole file invalid; pestod then reports it, moves the file aside
// (FILE.bad-<unix time>) and starts with empty tables rather than with a guess.

import PestoEngine

#if canImport(Glibc)
import Glibc
#endif

/// Reads and writes pestod's state file.
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

    /// The file's content for `entries`.
    static func render(_ entries: [Entry]) -> String {
        var out = header + "\n"
        for e in entries {
            let r = e.rule
            out += "rule \(e.table.rawValue) \(e.id) \(e.active ? "active" : "inactive")"
            out += " protocol=\(r.proto.rawValue) address=\(r.address?.description ?? "") interface=\(escape(r.interface))"
            out += " first-port=\(r.firstPort) last-port=\(r.lastPort) target-address=\(r.targetAddress?.description ?? "")"
            out += " target-port=\(r.targetPort) scan=\(r.scan ? 1 : 0) owner=\(escape(r.owner))\n"
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
            let words = line.split(separator: " ", omittingEmptySubsequences: false).map(String.init)
            guard words.count == 13, words[0] == "rule" else { throw bad(n + 1, "expected a rule with 9 fields") }
            guard let table = TableKind(rawValue: words[1]) else { throw bad(n + 1, "unknown table \(words[1])") }
            guard let id = UInt32(words[2]) else { throw bad(n + 1, "bad rule ID \(words[2])") }
            guard words[3] == "active" || words[3] == "inactive" else { throw bad(n + 1, "bad state \(words[3])") }
            var fields: [String: String] = [:]
            for word in words[4...] {
                guard let eq = word.firstIndex(of: "=") else { throw bad(n + 1, "bad field \(word)") }
                fields[String(word[..<eq])] = String(word[word.index(after: eq)...])
            }
            func port(_ key: String) throws(PestoError) -> UInt16 {
                guard let v = fields[key].flatMap({ UInt16($0) }) else { throw bad(n + 1, "bad \(key)") }
                return v
            }
            func address(_ key: String) throws(PestoError) -> IPAddress? {
                guard let text = fields[key] else { throw bad(n + 1, "missing \(key)") }
                if text.isEmpty { return nil }
                guard let a = IPAddress(text) else { throw bad(n + 1, "bad \(key) \(text)") }
                return a
            }
            guard let protoText = fields["protocol"], let proto = TransportProtocol(rawValue: protoText) else {
                throw bad(n + 1, "bad protocol")
            }
            guard let interface = fields["interface"].flatMap(unescape), let owner = fields["owner"].flatMap(unescape),
                let scan = fields["scan"], scan == "0" || scan == "1"
            else { throw bad(n + 1, "bad interface, owner or scan") }
            let rule = Rule(
                proto: proto, address: try address("address"), interface: interface, firstPort: try port("first-port"),
                lastPort: try port("last-port"), targetAddress: try address("target-address"), targetPort: try port("target-port"),
                scan: scan == "1", owner: owner)
            entries.append(Entry(table: table, id: id, active: words[3] == "active", rule: rule))
        }
        return entries
    }

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

    /// Writes `entries` atomically: temp file, fsync, rename, fsync of the directory.
    public func save(_ entries: [Entry]) throws(PestoError) {
        let bytes = Array(Self.render(entries).utf8)
        let temp = path + ".tmp"
        let fd = open(temp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw PestoError(.system, "Cannot write \(temp).", underlyingError: .current) }
        var written = 0
        while written < bytes.count {
            let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + written, bytes.count - written) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else {
                let e = Errno.current
                close(fd)
                throw PestoError(.system, "Cannot write \(temp).", underlyingError: e)
            }
            written += n
        }
        guard fsync(fd) == 0 else {
            let e = Errno.current
            close(fd)
            throw PestoError(.system, "Cannot sync \(temp).", underlyingError: e)
        }
        close(fd)
        guard rename(temp, path) == 0 else { throw PestoError(.system, "Cannot replace \(path).", underlyingError: .current) }
        let dir = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if dir >= 0 {
            _ = fsync(dir)
            close(dir)
        }
    }

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
        guard access(path, F_OK) == 0 else { return .missing }
        guard let bytes = readFile(path, limit: Self.maxSize) else {
            return moveAside("cannot be read, or is larger than \(Self.maxSize >> 20) MiB: \(Errno.current)")
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

    private func moveAside(_ reason: String) -> LoadResult {
        let aside = "\(path).bad-\(time(nil))"
        return .invalid(reason: reason, movedTo: rename(path, aside) == 0 ? aside : nil)
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

    /// Puts saved rules back into `engine`'s tables (inserting all, then activating the active
    /// ones). Returns a problem per rule that could not be restored; the others still are.
    public static func restore(_ entries: [Entry], into engine: ForwardingEngine) -> [String] {
        var problems: [String] = []
        for e in entries {
            guard let t = engine.table(e.table) else {
                problems.append("rule \(e.id): there is no \(e.table.name) table (is --netns missing?)")
                continue
            }
            do { try t.insert(id: e.id, rule: e.rule) } catch { problems.append("rule \(e.id): \(error.message)") }
        }
        for e in entries where e.active {
            do { try engine.table(e.table)?.activate(id: e.id) } catch { problems.append("rule \(e.id): \(error.message)") }
        }
        return problems
    }
}

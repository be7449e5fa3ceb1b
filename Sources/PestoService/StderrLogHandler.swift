// SPDX-License-Identifier: GPL-2.0-or-later

// StderrLogHandler: pestod's log lines on stderr (the journal, under systemd), in the format of
// swift-log's StreamLogHandler, at a fraction of its cost per line.
//
// Theory of operation
// -------------------
// pestod logs one info line per change (the project asks logging at info to cost under 10% of a
// change's round trip). StreamLogHandler, per line, calls localtime(3) and strftime(3), and
// glibc's tzset behind them stats /etc/localtime every time; it then writes through the
// stdio stream under its lock. Here the timestamp text is kept for the second it names and
// made again (with tzset, so a changed time zone shows within a second) only when the second
// changes, and the line is assembled as bytes and written with one write(2) on descriptor 2.
// Suppressed levels cost nothing here: `Logger` checks `logLevel` before the message (an
// autoclosure) is even formatted.
//
// Line format, as StreamLogHandler's: `2026-11-30T11:07:33+0000 info pestod: [PestoService] text`
// (metadata, when any, goes between the label's colon and the source, `key=value` sorted).
//
// Under systemd, stderr is a stream to the journal, which stores every line at the unit's
// default priority unless the line starts with a syslog priority prefix (sd-daemon(3)):
// `<7>` debug, `<6>` info, `<5>` notice, `<4>` warning, `<3>` error, `<2>` critical. The
// journal is recognised as sd-daemon(3) says: $JOURNAL_STREAM holds the stream's
// `DEVICE:INODE`, which must match descriptor 2's (a child that inherited the variable but
// writes elsewhere is not fooled). Then every line starts with its level's prefix and has
// no timestamp of its own (the journal stamps each line), so `journalctl -p warning` shows
// the warnings and worse: `<4>warning pestod: [PestoService] text`.

import Logging
import PestoSystem
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// Writes log lines to stderr in StreamLogHandler's format, with a cached timestamp and one
/// write(2) per line.
public struct StderrLogHandler: LogHandler {
    public var logLevel: Logger.Level = .info
    public var metadata: Logger.Metadata = [:]
    public var metadataProvider: Logger.MetadataProvider?
    private let label: String
    /// Lines go to the journal: a priority prefix, no timestamp.
    private let journal: Bool

    /// A handler for the logger called `label`; `journal` (default: whether stderr is the
    /// journal's stream) chooses the journal's line format.
    public init(
        label: String, metadataProvider: Logger.MetadataProvider? = LoggingSystem.metadataProvider,
        journal: Bool = StderrLogHandler.stderrIsJournal
    ) {
        self.label = label
        self.metadataProvider = metadataProvider
        self.journal = journal
    }

    /// Whether descriptor 2 is the journal's stream: $JOURNAL_STREAM is its `DEVICE:INODE`.
    public static let stderrIsJournal: Bool = {
        guard let value = getenv("JOURNAL_STREAM").map({ String(cString: $0) }), case .success(let st) = Sys.fstat(2) else {
            return false
        }
        return isJournalStream(value, device: UInt64(st.st_dev), inode: UInt64(st.st_ino))
    }()

    /// Whether a $JOURNAL_STREAM `value` (`DEVICE:INODE`, decimal) names the file with this
    /// device and inode number.
    public static func isJournalStream(_ value: String, device: UInt64, inode: UInt64) -> Bool {
        let parts = value.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 2, let d = UInt64(parts[0]), let i = UInt64(parts[1]) else { return false }
        return d == device && i == inode
    }

    /// The syslog priority of a level, as the journal's `<N>` prefix takes it.
    public static func priority(_ level: Logger.Level) -> Int {
        switch level {
        case .trace, .debug: return 7
        case .info: return 6
        case .notice: return 5
        case .warning: return 4
        case .error: return 3
        case .critical: return 2
        }
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var line: [UInt8] = []
        line.reserveCapacity(160)
        if journal {
            line.append(contentsOf: [UInt8(ascii: "<"), UInt8(ascii: "0") + UInt8(Self.priority(event.level)), UInt8(ascii: ">")])
        } else {
            Self.clock.withLock { $0.appendTimestamp(to: &line) }
            line.append(UInt8(ascii: " "))
        }
        line.append(contentsOf: event.level.rawValue.utf8)
        if !label.isEmpty {
            line.append(UInt8(ascii: " "))
            line.append(contentsOf: label.utf8)
        }
        line.append(UInt8(ascii: ":"))
        if let pretty = prettyMetadata(event) {
            line.append(UInt8(ascii: " "))
            line.append(contentsOf: pretty.utf8)
        }
        line.append(contentsOf: " [".utf8)
        line.append(contentsOf: event.source.utf8)
        line.append(contentsOf: "] ".utf8)
        line.append(contentsOf: event.message.description.utf8)
        line.append(UInt8(ascii: "\n"))
        Self.writeToStderr(line)
    }

    /// The line's metadata as StreamLogHandler prints it (sorted `key=value`), nil when none.
    private func prettyMetadata(_ event: LogEvent) -> String? {
        let provided = metadataProvider?.get() ?? [:]
        guard !metadata.isEmpty || !provided.isEmpty || !(event.metadata ?? [:]).isEmpty || event.error != nil else { return nil }
        var all = metadata
        all.merge(provided) { _, new in new }
        all.merge(event.metadata ?? [:]) { _, new in new }
        if let error = event.error {
            all["error.message"] = "\(error)"
            all["error.type"] = "\(String(reflecting: type(of: error)))"
        }
        return all.sorted { $0.key < $1.key }.map { "\($0)=\($1)" }.joined(separator: " ")
    }

    /// Writes `line` whole to descriptor 2 (a short write continues; a closed or failing
    /// stderr loses the line, as it would lose any other output).
    private static func writeToStderr(_ line: [UInt8]) {
        line.withUnsafeBytes { bytes in
            var done = 0
            while done < bytes.count {
                switch Sys.write(2, bytes.baseAddress! + done, bytes.count - done, mayBeClosed: true) {
                case .success(let n) where n > 0: done += n
                case .failure(.interrupted): continue
                default: return
                }
            }
        }
    }

    /// The timestamp of the current second, shared by every handler (pestod logs from one
    /// thread, but a handler must be safe from any).
    private static let clock = Mutex(TimestampCache())

    /// The text of the last second a line was logged in.
    struct TimestampCache: ~Copyable {
        private var second: time_t = -1
        private var text: [UInt8] = []

        /// Appends `2026-11-30T11:07:33+0000` for now, remade only when the second changed.
        mutating func appendTimestamp(to line: inout [UInt8]) {
            let now = time(nil)
            if now != second {
                second = now
                text = Self.format(now)
            }
            line.append(contentsOf: text)
        }

        /// `t` in local time as StreamLogHandler writes it (`%Y-%m-%dT%H:%M:%S%z`).
        private static func format(_ t: time_t) -> [UInt8] {
            tzset()  // what localtime(3) does on every call: a changed zone shows within a second
            var seconds = t
            var local = tm()
            guard localtime_r(&seconds, &local) != nil else { return Array("<unknown>".utf8) }
            var buffer = [CChar](repeating: 0, count: 64)
            let n = strftime(&buffer, buffer.count, "%Y-%m-%dT%H:%M:%S%z", &local)
            return buffer.prefix(n).map { UInt8(bitPattern: $0) }
        }
    }
}

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

    /// A handler for the logger called `label`.
    public init(label: String, metadataProvider: Logger.MetadataProvider? = LoggingSystem.metadataProvider) {
        self.label = label
        self.metadataProvider = metadataProvider
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var line: [UInt8] = []
        line.reserveCapacity(160)
        Self.clock.withLock { $0.appendTimestamp(to: &line) }
        line.append(UInt8(ascii: " "))
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

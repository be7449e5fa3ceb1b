// SPDX-License-Identifier: GPL-2.0-or-later

// RefusalLogLimiter: decides which refusals are worth a log line.
//
// A client may send changes it is not allowed to make as fast as the bus carries them;
// logging each refusal would let it fill the journal (20,000 calls, 20,000 lines). So each
// sender gets at most one line per `intervalMilliseconds`; the refusals in between are
// counted and the count is reported with the sender's next line, or when it leaves the bus.
// The state is bounded: at most `capacity` senders are tracked one by one; beyond that
// (after dropping senders whose interval is over and who have nothing left to report) the
// rest share one entry, so a crowd of clients gets one line per interval between them.

import PestoDBus
import PestoEngine
import PestoModel
import PestoSystem

/// Rate limit for refusal log lines, per sender, with bounded state.
struct RefusalLogLimiter {
    /// The default interval: at most one line per sender every 5 seconds.
    static let defaultIntervalMilliseconds = 5_000
    /// The default number of senders tracked one by one.
    static let defaultCapacity = 256

    /// One sender's current interval.
    private struct Window {
        var start: MonotonicInstant
        var suppressed: Int
    }

    let intervalMilliseconds: Int
    let capacity: Int
    private var windows: [String: Window] = [:]
    /// The key shared by senders beyond `capacity` (not a valid bus name).
    static let othersKey = ""

    init(intervalMilliseconds: Int = defaultIntervalMilliseconds, capacity: Int = defaultCapacity) {
        precondition(intervalMilliseconds > 0 && capacity > 0)
        self.intervalMilliseconds = intervalMilliseconds
        self.capacity = capacity
    }

    /// Whether a refusal for `sender` at `now` gets a log line: nil when it is counted
    /// instead, else how many refusals were not logged since the last line for this sender
    /// (or, beyond `capacity`, for the senders sharing its entry).
    mutating func admit(_ sender: String, now: MonotonicInstant) -> Int? {
        var key = sender
        if windows[key] == nil && windows.count >= capacity {
            windows = windows.filter { $0.value.suppressed > 0 || !expired($0.value, now) }
            if windows.count >= capacity { key = Self.othersKey }
        }
        if var w = windows[key], !expired(w, now) {
            w.suppressed += 1
            windows[key] = w
            return nil
        }
        let unreported = windows[key]?.suppressed ?? 0
        windows[key] = Window(start: now, suppressed: 0)
        return unreported
    }

    /// Forgets `sender`, which left the bus; returns the refusals not yet reported for it.
    mutating func forget(_ sender: String) -> Int {
        windows.removeValue(forKey: sender)?.suppressed ?? 0
    }

    /// How many entries are kept (at most `capacity` + 1).
    var trackedCount: Int { windows.count }

    private func expired(_ w: Window, _ now: MonotonicInstant) -> Bool {
        now >= w.start.adding(milliseconds: intervalMilliseconds)
    }
}

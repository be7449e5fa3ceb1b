// SPDX-License-Identifier: GPL-2.0-or-later

// Running an engine's event loop in a test until something has happened.

import PestoEngine
import Testing

extension EventLoop {
    /// Runs the loop until `condition` holds, checking it every 5 ms of loop time; records an
    /// issue naming `what` and returns false if it did not hold within 5 s.
    @discardableResult
    public func turn(until condition: @escaping () -> Bool, _ what: String) -> Bool {
        if condition() { return true }
        var met = false
        let started = MonotonicInstant.now
        let poller = every(milliseconds: 5) { [unowned self] in
            if condition() {
                met = true
                stop()
            } else if MonotonicInstant.now.nanoseconds - started.nanoseconds > 5_000_000_000 {
                stop()
            }
        }
        run()
        cancelTimer(poller)
        if !met { Issue.record("never happened: \(what)") }
        return met
    }

    /// Runs the loop until `condition` holds, checking it every 5 ms of loop time, with no
    /// deadline: for a condition that is bound to hold (another thread's bounded wait ends).
    public func turn(forever condition: @escaping () -> Bool) {
        if condition() { return }
        let poller = every(milliseconds: 5) { [unowned self] in
            if condition() { stop() }
        }
        run()
        cancelTimer(poller)
    }
}

// SPDX-License-Identifier: GPL-2.0-or-later

// disrupt: how many connects to an unrelated rule fail while the table is being changed.
//
// A client thread makes exactly CONNECTS connects to PORT, one every INTERVAL (a connect that
// fails fast still waits for its slot, so a closed listener costs as many failures as the
// time it stays closed, not as many as a tight loop could make): connect, one byte echoed,
// close, each step bounded by a 1 s timeout. Meanwhile the main thread makes UPDATES changes
// (add the extra rule, remove it, alternately), spread evenly over the connects' window
// (update i starts at (i + 1/2) × window / UPDATES, or at once when the one before ran late).
// With UPDATES 0 it is the control: what the loop meets with no change at all.
//
// change: the time of one change at a time, nothing else running: add, then remove, RUNS
// times after one unmeasured pair; medians, minima and maxima.

import PestoModel
import PestoTestSupport
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// What the connect loop counts, shared with the main thread.
final class ConnectTally: Sendable {
    let done = Atomic<Int>(0)
    let failed = Atomic<Int>(0)
    let firstError = Atomic<Int32>(0)
    let finished = Atomic<Bool>(false)

    func fail(_ e: Errno) {
        failed.add(1, ordering: .relaxed)
        _ = firstError.compareExchange(expected: 0, desired: e.rawValue, ordering: .relaxed)
    }
}

/// One byte there and back on a connected socket; nil on success, else why not.
func echoOne(_ fd: Int32) -> Errno? {
    var b: UInt8 = 0x2A
    let w = write(fd, &b, 1)
    if w != 1 { return w < 0 ? .current : Errno(rawValue: EIO) }
    let r = read(fd, &b, 1)
    if r == 1 { return nil }
    return r < 0 ? .current : Errno(rawValue: ECONNRESET)
}

/// Sleeps until the monotonic clock reads `t` (returns at once if it has passed).
func sleep(until t: Double) {
    let left = t - monotonicSeconds()
    if left > 0 { usleep(UInt32(min(left, 3600) * 1e6)) }
}

/// Runs the disruption measurement and prints its result line.
func disrupt(port: UInt16, connects: Int, interval: Double, updates: Int, updater: Updater) throws {
    let tally = ConnectTally()
    let start = monotonicSeconds() + 0.05
    detachThread {
        for k in 0..<connects {
            sleep(until: start + Double(k) * interval)
            switch TestSockets.connect(port: port, timeoutMilliseconds: 1000, noDelay: true) {
            case .failure(let e):
                tally.fail(e)
            case .success(let fd):
                if let e = echoOne(fd) { tally.fail(e) }
                close(fd)
            }
            tally.done.add(1, ordering: .relaxed)
        }
        tally.finished.store(true, ordering: .releasing)
    }
    let window = Double(connects) * interval
    var times: [Double] = []
    var during = 0
    for i in 0..<updates {
        sleep(until: start + (Double(i) + 0.5) * window / Double(updates))
        let t0 = monotonicSeconds()
        if i % 2 == 0 { try updater.add() } else { try updater.remove() }
        times.append(monotonicSeconds() - t0)
        if !tally.finished.load(ordering: .acquiring) { during += 1 }
    }
    // An odd count leaves the rule in: take it out (unmeasured) so that the next run starts clean.
    if updates % 2 == 1 { try updater.remove() }
    // Each connect is bounded (1 s connect, 1 s read), so the loop ends by then.
    let deadline = start + window + Double(connects) * 2 + 5
    while !tally.finished.load(ordering: .acquiring) && monotonicSeconds() < deadline { usleep(10_000) }
    let first = tally.firstError.load(ordering: .relaxed)
    say(
        "disrupt failed \(tally.failed.load(ordering: .relaxed)) of \(tally.done.load(ordering: .relaxed))"
            + " updates \(updates) during \(during) median-ms \(times.isEmpty ? "-" : fixed(median(times) * 1000, 2))"
            + " max-ms \(fixed((times.max() ?? 0) * 1000, 2))" + (first != 0 ? " first \(Errno(rawValue: first).name)" : ""))
}

/// Times `runs` adds and removes, one at a time, after one unmeasured pair; prints the result line.
func change(runs: Int, updater: Updater) throws {
    try updater.add()
    try updater.remove()
    var adds: [Double] = []
    var removes: [Double] = []
    for _ in 0..<runs {
        var t0 = monotonicSeconds()
        try updater.add()
        adds.append(monotonicSeconds() - t0)
        t0 = monotonicSeconds()
        try updater.remove()
        removes.append(monotonicSeconds() - t0)
    }
    let ms = { (x: Double) in fixed(x * 1000, 3) }
    say(
        "change add-ms \(ms(median(adds))) remove-ms \(ms(median(removes)))"
            + " add-range \(ms(adds.min()!))-\(ms(adds.max()!)) remove-range \(ms(removes.min()!))-\(ms(removes.max()!)) runs \(runs)")
}

// SPDX-License-Identifier: GPL-2.0-or-later

// TurnLog: the log line that says whether a large change held the event loop: the loop's
// longest turns since the change's decoding (`EventLoop.turnTimes`, marked by the server when
// a large Apply arrives), written once the change is saved (or answered, without a store).
// The large-tables benchmark (Benchmarks/run-large.sh) reads it.

import Logging
import PestoEngine

extension PestoServer {
    /// Logs a large batch saved (off the loop) and the loop's longest turns since the last
    /// mark (a large Apply's decoding, `markTurns`): what the large-tables benchmark reads.
    func logLargeSave(operations: Int, milliseconds: UInt64?) {
        engine.loop.endTurnWatch()
        let t = engine.loop.turnTimes
        func ms(_ ns: UInt64) -> String { "\(ns / 1_000_000).\(ns / 100_000 % 10)" }
        let saved =
            milliseconds.map { "saved \(operations) operations in \($0) ms off the loop" }
            ?? "committed \(operations) operations (no store)"
        logger.info(
            "\(saved); loop turns since the change began: \(t.turns), longest \(ms(t.longest)) ms, longest after the first \(ms(t.longestLater)) ms, most CPU in one of those \(ms(t.longestLaterCPU)) ms (the first, which decoded it: \(ms(t.first)) ms, CPU \(ms(t.firstCPU)) ms)"
        )
    }
}

// SPDX-License-Identifier: GPL-2.0-or-later

// What the benchmarks measure with and print with: the monotonic clock in seconds, medians,
// and fixed-point numbers in columns (no Foundation, so no String(format:)).

import PestoEngine

/// Seconds since an arbitrary start, monotonic.
public func monotonicSeconds() -> Double { Double(MonotonicInstant.now.nanoseconds) / 1e9 }

/// The median (upper median for an even count) of a non-empty array.
public func median(_ xs: [Double]) -> Double { xs.sorted()[xs.count / 2] }

/// `x` with `decimals` digits after the point, right-aligned in `width` columns; "-" when
/// `x` is not finite (a ratio over nothing).
public func fixed(_ x: Double, _ decimals: Int = 1, width: Int = 0) -> String {
    var text: String
    if !x.isFinite {
        text = "-"
    } else {
        var scale = 1.0
        for _ in 0..<decimals { scale *= 10 }
        let r = (x * scale).rounded() / scale
        text = decimals == 0 ? String(Int(r)) : String(r)
        if decimals > 0 {
            let parts = text.split(separator: ".", omittingEmptySubsequences: false)
            let frac = parts.count > 1 ? String(parts[1]) : ""
            text = String(parts[0]) + "." + String((frac + String(repeating: "0", count: decimals)).prefix(decimals))
        }
    }
    return String(repeating: " ", count: max(0, width - text.count)) + text
}

// SPDX-License-Identifier: GPL-2.0-or-later

// The soak's memory watch (`--memory`): pestod is never killed, and its resident set (VmRSS in
// /proc/PID/status) is sampled every `--sample-every` seconds for the whole run. Samples of the
// warm-up (`--warm-up`: pools, tables and the allocator's arenas filling up) are shown but not
// judged; after it, the growth (last sample − first sample after the warm-up) and the slope of
// a least-squares line through the samples (KiB per minute) say whether pestod's memory grows
// under a steady load. No growth beyond noise is the aim; nothing here asserts it.
// Also the soak's summary lines (SummaryLines, for Benchmarks/run-all.sh).

import PestoTestSupport

#if canImport(Glibc)
    import Glibc
#endif

/// One field of /proc/PID/status in KiB (VmRSS, VmHWM), or nil if the process is gone.
func procStatusKiB(_ pid: pid_t, _ field: String) -> Int? {
    guard let text = readTextFile("/proc/\(pid)/status") else { return nil }
    for line in text.split(separator: "\n") where line.hasPrefix(field + ":") {
        return Int(line.split(separator: " ").dropFirst().first ?? "")
    }
    return nil
}

/// pestod's RSS over the run: (seconds since the start, KiB) pairs.
struct RSSSamples {
    var samples: [(seconds: Double, kib: Int)] = []
    let warmUp: Double

    /// The samples taken after the warm-up.
    var steady: [(seconds: Double, kib: Int)] { samples.filter { $0.seconds >= warmUp } }

    /// The slope of the least-squares line through the steady samples, in KiB per minute.
    var slopeKiBPerMinute: Double? {
        let s = steady
        guard s.count >= 3 else { return nil }
        let n = Double(s.count)
        let mx = s.reduce(0) { $0 + $1.seconds } / n
        let my = s.reduce(0) { $0 + Double($1.kib) } / n
        let sxx = s.reduce(0) { $0 + ($1.seconds - mx) * ($1.seconds - mx) }
        let sxy = s.reduce(0) { $0 + ($1.seconds - mx) * (Double($1.kib) - my) }
        return sxx > 0 ? sxy / sxx * 60 : nil
    }

    /// The report: RSS at the warm-up's end and at the end, growth, slope, range after warm-up.
    func report(peakKiB: Int?) -> [String] {
        let s = steady
        guard let first = s.first, let last = s.last else { return ["  pestod RSS: too few samples after the warm-up"] }
        func mib(_ k: Int) -> String { fixed(Double(k) / 1024, 2) }
        let low = s.map(\.kib).min() ?? 0
        let high = s.map(\.kib).max() ?? 0
        return [
            "  pestod RSS (\(samples.count) samples, \(s.count) after a \(fixed(warmUp, 0)) s warm-up):",
            "    at the warm-up's end (\(fixed(first.seconds, 0)) s): \(mib(first.kib)) MiB; at the end (\(fixed(last.seconds, 0)) s): \(mib(last.kib)) MiB",
            "    growth: \(last.kib - first.kib) KiB (\(fixed(100 * Double(last.kib - first.kib) / Double(max(first.kib, 1)), 2)) %); "
                + "slope \(slopeKiBPerMinute.map { fixed($0, 1) } ?? "n/a") KiB/min; range after the warm-up \(mib(low))–\(mib(high)) MiB"
                + (peakKiB.map { "; peak (VmHWM) \(mib($0)) MiB" } ?? ""),
        ]
    }
}

/// The soak's summary lines (group `soak`): lost changes always; with RSS samples, pestod's RSS
/// at the warm-up's end and at the end (ratio: end ÷ warm-up end), and the slope.
func summarize(rss: RSSSamples?, seconds: Double, lost: Int, connectionsFailed: Int, connections: Int, killed: Bool) {
    let run = "\(Int(seconds.rounded())) s" + (killed ? ", pestod killed" : "")
    SummaryLines.append(
        group: "soak", metric: "lost acknowledged changes (\(run))", value: Double(lost), unit: "changes", target: "0", better: "lower")
    if !killed {
        SummaryLines.append(
            group: "soak", metric: "TCP connections failed (\(run))", value: Double(connectionsFailed),
            unit: "of \(connections)", target: "0", better: "lower")
    }
    guard let rss, let first = rss.steady.first, let last = rss.steady.last else { return }
    let start = Double(first.kib) / 1024
    let end = Double(last.kib) / 1024
    SummaryLines.append(
        group: "soak", metric: "pestod RSS at the end of \(run)", value: end, unit: "MiB", baseline: "at the warm-up's end",
        baselineValue: start, ratio: end / start, target: "≤ 1.05", better: "lower")
    if let slope = rss.slopeKiBPerMinute {
        SummaryLines.append(
            group: "soak", metric: "pestod RSS slope after the warm-up (\(run))", value: slope, unit: "KiB/min",
            better: "lower")
    }
}

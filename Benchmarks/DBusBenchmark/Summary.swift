// SPDX-License-Identifier: GPL-2.0-or-later

// Summary lines: when PESTO_BENCH_SUMMARY names a file, every figure the benchmark measured
// is appended to it as one tab-separated line (the format is the benchmarks' shared one:
// group, metric, subject, value, unit, baseline, baseline value, ratio, target, better).
// Nothing else is written there; stdout is unchanged.

import PestoTestSupport

#if canImport(Glibc)
    import Glibc
#endif

/// One line of the summary file.
struct SummaryLine {
    var group: String
    var metric: String
    var subject: String
    var value: Double
    var unit: String
    /// What the ratio is against, and its figure; nil: no baseline ("-").
    var baseline: (name: String, value: Double)?
    /// The floor or ceiling as text ("≥ 0.47"), or "-".
    var target = "-"
    /// "higher" or "lower": which way is good for the ratio (or the value without a baseline).
    var better: String

    /// The tab-separated line, without its newline.
    var text: String {
        let number = { (x: Double) -> String in x.isFinite ? fixed(x, abs(x) >= 100 ? 1 : 4) : "-" }
        let ratio = baseline.map { number(value / $0.value) } ?? "-"
        return [
            group, metric, subject, number(value), unit, baseline?.name ?? "-", baseline.map { number($0.value) } ?? "-", ratio, target,
            better,
        ].joined(separator: "\t")
    }
}

/// Appends `lines` to the file PESTO_BENCH_SUMMARY names; does nothing when it is unset or
/// empty. A file that cannot be opened is reported on stderr, not fatal.
func appendSummary(_ lines: [SummaryLine]) {
    guard let name = getenv("PESTO_BENCH_SUMMARY").map({ String(cString: $0) }), !name.isEmpty, !lines.isEmpty else { return }
    let fd = open(name, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o644)
    guard fd >= 0 else {
        printError("pesto-dbus-bench: cannot open PESTO_BENCH_SUMMARY file \(name); no summary written")
        return
    }
    writeAll(fd, Array(lines.map { $0.text + "\n" }.joined().utf8))
    close(fd)
}

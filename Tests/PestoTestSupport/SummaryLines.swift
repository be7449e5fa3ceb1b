// SPDX-License-Identifier: GPL-2.0-or-later

// The benchmarks' summary lines: when PESTO_BENCH_SUMMARY names a file, a benchmark appends one
// tab-separated line per figure it measured, which Benchmarks/report.py turns into
// doc/performance.md's tables and chart (Benchmarks/README.md, "run-all.sh"). The fields:
// group, metric, subject, value, unit, baseline, baseline value, ratio, target, better.

#if canImport(Glibc)
    import Glibc
#endif

/// Appends summary lines to the file PESTO_BENCH_SUMMARY names; does nothing when it is unset.
public enum SummaryLines {
    /// The file the lines go to, or nil when PESTO_BENCH_SUMMARY is unset or empty.
    public static var path: String? {
        guard let p = getenv("PESTO_BENCH_SUMMARY").map({ String(cString: $0) }), !p.isEmpty else { return nil }
        return p
    }

    /// Appends one line. Numbers are written as plain decimals ('.' as the point), nil as "-";
    /// `better` says which way is good for the ratio (or for the value when there is no ratio).
    public static func append(
        group: String, metric: String, subject: String = "pestod", value: Double, unit: String, baseline: String = "-",
        baselineValue: Double? = nil, ratio: Double? = nil, target: String = "-", better: String
    ) {
        guard let path else { return }
        func num(_ x: Double?) -> String {
            guard let x, x.isFinite else { return "-" }
            return fixed(x, 4)
        }
        let fields = [group, metric, subject, num(value), unit, baseline, num(baselineValue), num(ratio), target, better]
        let line = fields.map { $0.replacingTabs }.joined(separator: "\t") + "\n"
        guard let f = fopen(path, "a") else {
            print("summary: cannot append to \(path)")
            return
        }
        fputs(line, f)
        fclose(f)
    }
}

extension String {
    /// The string with tabs and newlines turned into spaces (a field of a summary line).
    fileprivate var replacingTabs: String {
        String(map { $0 == "\t" || $0 == "\n" ? " " : $0 })
    }
}

// SPDX-License-Identifier: GPL-2.0-or-later

// churn: sustained short connections through one port, counted per time slice, to show
// whether a forwarder keeps its rate or collapses (for instance when TIME_WAIT sockets use up
// its outgoing ports). CLIENTS threads, client k from 127.0.0.(10+k) (each with its own
// ephemeral ports, as pesto-loadgen connrate --spread), loop for SECONDS: connect, one byte
// echoed, close, each step bounded by a 2 s timeout. The main thread reads the count at every
// slice boundary.

import PestoModel
import PestoTestSupport
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// Runs the churn and prints "churn R1 R2 … failures F [first ERRNO]", Rk the connections
/// per second completed in slice k.
func churn(port: UInt16, seconds: Double, slice: Double, clients: Int) {
    let tally = ConnectTally()
    let running = Atomic<Int>(clients)
    let start = monotonicSeconds()
    let end = start + seconds
    for k in 0..<clients {
        let source = IPAddress.v4(0x7F00_0000 | UInt32(10 + k))
        detachThread {
            while monotonicSeconds() < end {
                switch TestSockets.connect(port: port, from: source, timeoutMilliseconds: 2000, noDelay: true) {
                case .failure(let e):
                    tally.fail(e)
                    usleep(1000)  // refused, out of ports: do not spin
                case .success(let fd):
                    if let e = echoOne(fd) { tally.fail(e) } else { tally.done.add(1, ordering: .relaxed) }
                    close(fd)
                }
            }
            running.subtract(1, ordering: .relaxed)
        }
    }
    var rates: [String] = []
    var before = 0
    var boundary = start
    while boundary + slice <= end + 1e-6 {
        boundary += slice
        sleep(until: boundary)
        let now = tally.done.load(ordering: .relaxed)
        rates.append(String(Int((Double(now - before) / slice).rounded())))
        before = now
    }
    // Each operation times out after 2 s: every thread ends by end + 4 s.
    while running.load(ordering: .relaxed) > 0 && monotonicSeconds() < end + 10 { usleep(10_000) }
    let first = tally.firstError.load(ordering: .relaxed)
    say(
        "churn \(rates.joined(separator: " ")) failures \(tally.failed.load(ordering: .relaxed))"
            + (first != 0 ? " first \(Errno(rawValue: first).name)" : ""))
}

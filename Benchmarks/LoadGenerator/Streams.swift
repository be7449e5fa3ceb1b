// SPDX-License-Identifier: GPL-2.0-or-later

// pesto-loadgen streams: long relayed connections exchanging data both ways, checked for
// breaks and for lost, repeated or reordered bytes (Benchmarks/run-takeover.sh).
//
//   pesto-loadgen streams --port P --target-port T --count N [--bytes B] [--hold SECONDS]
//       Listens on 127.0.0.1:T (the target of pestod's rule for P), opens N connections to P
//       and accepts each relayed one on T. Both ends of every connection then write a
//       counting stream (byte i is byte i % 8 of the 64-bit counter i / 8), B bytes (default
//       256) per end every 10 ms, and read and check the other end's. Prints "ready N", and
//       when stdin closes (or after --hold seconds, default 3600), half-closes every end,
//       reads everything to end of file and prints
//       "streams N up <bytes> down <bytes> broken <n> lost <n>" (broken: an end that failed
//       or ended early; lost: a direction whose bytes read differ from those written, or a
//       byte out of place), then the first few problems. Exits 1 if any.
//
// One thread, non-blocking sockets and epoll; every wait is bounded.

import CPestoSys
import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport

#if canImport(Glibc)
    import Glibc
#endif

/// The byte at offset `i` of the counting stream.
@inline(__always)
func countingByte(_ i: UInt64) -> UInt8 { UInt8(truncatingIfNeeded: (i >> 3) >> ((i & 7) << 3)) }

/// One end of a connection: what it has written of its stream and read of its peer's.
struct StreamEnd {
    var fd: Int32
    var written: UInt64 = 0
    var read: UInt64 = 0
    var sawEnd = false
    var problem: String?
}

/// Runs the `streams` subcommand.
func streams(port: UInt16, targetPort: UInt16, count: Int, chunk: Int, hold: Double) -> Never {
    let limit = DescriptorPlan.current.openFileLimit
    if 2 * count + 16 > limit { fail("--count \(count) needs more descriptors than RLIMIT_NOFILE \(limit) allows") }
    let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    TestSockets.setOption(listener, level: SOL_SOCKET, name: SO_REUSEADDR, 1)
    guard SocketAddress(.loopbackIPv4, port: targetPort).withSockaddr({ bind(listener, $0, $1) }) == 0, listen(listener, 4096) == 0
    else { fail("cannot listen on 127.0.0.1:\(targetPort): \(Errno.current)") }
    TestSockets.setTimeouts(listener, milliseconds: 10_000)
    // Ends 2k (client) and 2k+1 (target) are the two ends of connection k.
    var ends: [StreamEnd] = []
    ends.reserveCapacity(2 * count)
    for i in 0..<count {
        guard case .success(let client) = TestSockets.connect(port: port, timeoutMilliseconds: 5000, noDelay: true) else {
            fail("connect \(i + 1) of \(count): \(Errno.current)")
        }
        let target = accept(listener, nil, nil)
        guard target >= 0 else { fail("accept \(i + 1) of \(count): \(Errno.current)") }
        ends.append(StreamEnd(fd: client))
        ends.append(StreamEnd(fd: target))
    }
    close(listener)
    let ep = epoll_create1(Int32(EPOLL_CLOEXEC))
    for (k, e) in ends.enumerated() {
        _ = fcntl(e.fd, F_SETFL, fcntl(e.fd, F_GETFL) | O_NONBLOCK)
        var ev = epoll_event()
        ev.events = EPOLLIN.rawValue
        ev.data.u64 = UInt64(k)
        epoll_ctl(ep, EPOLL_CTL_ADD, e.fd, &ev)
    }
    var ev = epoll_event()
    ev.events = EPOLLIN.rawValue
    ev.data.u64 = UInt64.max
    epoll_ctl(ep, EPOLL_CTL_ADD, 0, &ev)
    say("ready \(count)")

    var out = [UInt8](repeating: 0, count: max(chunk, 1))
    var buffer = [UInt8](repeating: 0, count: 64 * 1024)
    var events = [epoll_event](repeating: epoll_event(), count: 256)

    /// Reads what end `k` has; false once it is at its end or failed.
    func drain(_ k: Int) {
        while ends[k].problem == nil && !ends[k].sawEnd {
            let r = buffer.withUnsafeMutableBytes { recv(ends[k].fd, $0.baseAddress!, $0.count, 0) }
            if r == 0 {
                ends[k].sawEnd = true
                return
            }
            if r < 0 {
                if errno != EAGAIN { ends[k].problem = "end \(k) read after \(ends[k].read): \(Errno.current)" }
                return
            }
            for j in 0..<r where buffer[j] != countingByte(ends[k].read + UInt64(j)) {
                ends[k].problem = "end \(k): byte \(ends[k].read + UInt64(j)) out of place"
                return
            }
            ends[k].read += UInt64(r)
        }
    }

    let end = monotonicSeconds() + hold
    var nextWrite = monotonicSeconds()
    var running = true
    while running && monotonicSeconds() < end {
        let n = epoll_wait(ep, &events, Int32(events.count), 10)
        if n > 0 {
            for i in 0..<Int(n) {
                let k = events[i].data.u64
                if k == UInt64.max {
                    var b: UInt8 = 0
                    if read(0, &b, 1) <= 0 { running = false }
                } else {
                    drain(Int(k))
                    if ends[Int(k)].sawEnd, ends[Int(k)].problem == nil {
                        ends[Int(k)].problem = "end \(k) reached end of file early, after \(ends[Int(k)].read) bytes"
                    }
                }
            }
        }
        guard monotonicSeconds() >= nextWrite else { continue }
        nextWrite += 0.01
        for k in ends.indices where ends[k].problem == nil {
            let offset = ends[k].written
            for j in 0..<chunk { out[j] = countingByte(offset + UInt64(j)) }
            let w = out.withUnsafeBytes { send(ends[k].fd, $0.baseAddress!, chunk, Int32(MSG_NOSIGNAL | MSG_DONTWAIT)) }
            if w > 0 {
                ends[k].written += UInt64(w)
            } else if w < 0 && errno != EAGAIN {
                ends[k].problem = "end \(k) write after \(offset): \(Errno.current)"
            }
        }
    }
    // Half-close every end, then read everything to the end.
    for e in ends where e.problem == nil { shutdown(e.fd, Int32(SHUT_WR)) }
    let deadline = monotonicSeconds() + 60
    while monotonicSeconds() < deadline && ends.contains(where: { $0.problem == nil && !$0.sawEnd }) {
        let n = epoll_wait(ep, &events, Int32(events.count), 100)
        for i in 0..<Int(max(n, 0)) where events[i].data.u64 != UInt64.max { drain(Int(events[i].data.u64)) }
    }
    var up: UInt64 = 0
    var down: UInt64 = 0
    var broken = 0
    var lost = 0
    var problems: [String] = []
    for c in 0..<count {
        let client = ends[2 * c]
        let target = ends[2 * c + 1]
        up += target.read
        down += client.read
        for e in [client, target] {
            if let p = e.problem { problems.append(p) }
            if e.problem != nil || !e.sawEnd { broken += 1 }
        }
        if target.read != client.written || client.read != target.written { lost += 1 }
    }
    say("streams \(count) up \(up) down \(down) broken \(broken) lost \(lost)")
    for p in problems.prefix(5) { say("  \(p)") }
    for e in ends { close(e.fd) }
    exit(broken == 0 && lost == 0 ? 0 : 1)
}

// SPDX-License-Identifier: GPL-2.0-or-later

// udpflows: many UDP flows at once, each keeping a window of 64-byte datagrams in flight.
//
// `flows` connected client sockets, one epoll thread. Every socket starts by sending `window`
// datagrams; every reply it gets is answered with one more, so each flow keeps `window`
// datagrams in flight. A flow that has heard nothing for 200 ms while datagrams are out counts
// them lost and sends a fresh window, so a lost datagram does not shrink the load for good.
// Prints "udpflows <replies/s> lost <n>".

import CPestoSys
import PestoModel
import PestoSystem
import PestoTestSupport

#if canImport(Glibc)
    import Glibc
#endif

/// Runs `flows` flows of `window` datagrams in flight against 127.0.0.1:`port` for `duration`
/// seconds and prints the replies per second.
func udpFlows(port: UInt16, duration: Double, flows: Int, window: Int) -> Never {
    let ep = epoll_create1(Int32(EPOLL_CLOEXEC))
    guard ep >= 0 else { fail("epoll_create1: \(Errno.current)") }
    var sockets: [Int32] = []
    var outstanding = [Int](repeating: 0, count: flows)
    var lastHeard = [Double](repeating: 0, count: flows)
    let request = [UInt8](repeating: 0x5A, count: 64)
    var reply = [UInt8](repeating: 0, count: 2048)
    for k in 0..<flows {
        let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
        guard fd >= 0 else { fail("socket: \(Errno.current)") }
        guard SocketAddress(.loopbackIPv4, port: port).withSockaddr({ connect(fd, $0, $1) }) == 0
        else { fail("connect UDP 127.0.0.1:\(port): \(Errno.current)") }
        var event = epoll_event(events: EPOLLIN.rawValue, data: epoll_data_t(u64: UInt64(k)))
        guard epoll_ctl(ep, EPOLL_CTL_ADD, fd, &event) == 0 else { fail("epoll_ctl: \(Errno.current)") }
        sockets.append(fd)
    }
    var count = 0
    var lost = 0
    /// Sends datagrams on flow `k` until `window` are out (or the socket refuses).
    func fill(_ k: Int) {
        while outstanding[k] < window {
            guard send(sockets[k], request, 64, 0) == 64 else { break }
            outstanding[k] += 1
        }
    }
    let start = monotonicSeconds()
    let end = start + duration
    for k in 0..<flows {
        lastHeard[k] = start
        fill(k)
    }
    var events = [epoll_event](repeating: epoll_event(), count: 128)
    var lastCheck = start
    while true {
        let now = monotonicSeconds()
        if now >= end { break }
        let n = epoll_wait(ep, &events, Int32(events.count), 50)
        for i in 0..<max(0, Int(n)) {
            let k = Int(events[i].data.u64)
            while true {
                let r = recv(sockets[k], &reply, reply.count, 0)
                if r < 0 { break }
                if r == 64 {
                    count += 1
                    if outstanding[k] > 0 { outstanding[k] -= 1 }
                }
            }
            lastHeard[k] = monotonicSeconds()
            fill(k)
        }
        let later = monotonicSeconds()
        if later - lastCheck >= 0.05 {
            lastCheck = later
            for k in 0..<flows where outstanding[k] > 0 && later - lastHeard[k] > 0.2 {
                lost += outstanding[k]
                outstanding[k] = 0
                lastHeard[k] = later
                fill(k)
            }
        }
    }
    let elapsed = monotonicSeconds() - start
    say("udpflows \(Int((Double(count) / elapsed).rounded())) lost \(lost)")
    exit(0)
}

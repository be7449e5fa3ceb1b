// SPDX-License-Identifier: GPL-2.0-or-later

// pesto-loadgen: the load side of the data-path benchmark (Benchmarks/run-datapath.sh).
//
//   pesto-loadgen serve-echo --tcp PORT [--udp PORT] [--lifetime SECONDS] [--proxy]
//       TCP echo server and UDP echo server on 127.0.0.1, one non-blocking epoll thread; holds
//       thousands of idle connections. Prints "ready" once bound; exits after --lifetime
//       seconds (default 3600) so that it can never outlive a benchmark for long. With
//       --proxy, every TCP connection starts with a PROXY protocol header (v1 or v2, as
//       pestod sends with proxy-protocol), which is read and not echoed.
//   pesto-loadgen connrate --port P --seconds S --clients C [--spread | --source-net A.B.C]
//       C threads, each looping for S seconds: connect, send 1 byte, read its echo, close.
//       Prints "connrate <connections/s> failures <n> [first <errno name>]". With --spread,
//       client k binds to source address 127.0.0.(10+k) (IP_BIND_ADDRESS_NO_PORT), giving
//       each client its own ephemeral-port space against TIME_WAIT exhaustion; with
//       --source-net, to A.B.C.(10+k) instead (an address range routed to lo by the caller,
//       for transparent source: addresses the target namespace does not have).
//   pesto-loadgen udprr --port P --seconds S [--source ADDRESS]
//       UDP ping-pong with 64-byte datagrams (sequence-numbered; a reply missing after 200 ms
//       is counted lost), from ADDRESS if given. Prints "udprr <round trips/s> lost <n>".
//   pesto-loadgen udpflows --port P --seconds S [--flows F] [--window W]
//       F concurrent UDP flows (default 64), each keeping W 64-byte datagrams in flight
//       (default 4) (UDPFlows.swift). Prints "udpflows <replies/s> lost <n>".
//   pesto-loadgen idle --port P --count N [--hold SECONDS]
//       Opens N TCP connections and checks each with a 1-byte echo, prints "ready N", then
//       holds them until stdin closes (or --hold seconds, default 600). On a failure prints
//       "failed <k> of <N>: <errno>" and exits 1. Needs N + a few descriptors.
//   pesto-loadgen streams --port P --target-port T --count N [--bytes B] [--hold SECONDS]
//       N long connections through pestod exchanging counting streams both ways, checked for
//       breaks and lost bytes (Streams.swift).
//
// Every loop is bounded by its duration or count, every blocking call has a timeout, and every
// address is 127.0.0.0/8 or one the caller gives.

import CPestoSys
import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

// MARK: - Small helpers

/// Writes a line to stdout, unbuffered (the script reads it through a pipe).
func say(_ text: String) { writeAll(1, Array((text + "\n").utf8)) }

/// Writes a line to stderr and exits with status 1.
func fail(_ text: String) -> Never {
    writeAll(2, Array(("pesto-loadgen: \(text)\n").utf8))
    exit(1)
}

/// 127.0.0.x.
func loopback(_ x: UInt32) -> IPAddress { .v4(0x7F00_0000 | (x & 0xFF)) }

/// One byte there and back on a connected socket; nil on success, else why not
/// (EAGAIN: timed out; ECONNRESET: the peer closed without answering).
func echoOne(_ fd: Int32) -> Errno? {
    var b: UInt8 = 0x2A
    let w = write(fd, &b, 1)
    if w != 1 { return w < 0 ? .current : Errno(rawValue: EIO) }
    let r = read(fd, &b, 1)
    if r == 1 { return nil }
    return r < 0 ? .current : Errno(rawValue: ECONNRESET)
}

// MARK: - Options

/// `--name value` and `--flag` arguments after the subcommand.
struct Options {
    var values: [String: String] = [:]
    var flags: Set<String> = []

    init(_ arguments: ArraySlice<String>, flags known: Set<String>) {
        var i = arguments.startIndex
        while i < arguments.endIndex {
            let a = arguments[i]
            guard a.hasPrefix("--") else { fail("unexpected argument \(a)") }
            let name = String(a.dropFirst(2))
            if known.contains(name) {
                flags.insert(name)
                i += 1
            } else {
                guard i + 1 < arguments.endIndex else { fail("\(a) needs a value") }
                values[name] = arguments[i + 1]
                i += 2
            }
        }
    }

    func port(_ name: String) -> UInt16? {
        guard let text = values[name] else { return nil }
        guard let p = UInt16(text), p > 0 else { fail("--\(name): bad port \(text)") }
        return p
    }

    func requiredPort(_ name: String) -> UInt16 {
        guard let p = port(name) else { fail("--\(name) PORT is required") }
        return p
    }

    func number(_ name: String, default value: Double? = nil, range: ClosedRange<Double>) -> Double {
        guard let text = values[name] else {
            guard let value else { fail("--\(name) is required") }
            return value
        }
        guard let v = Double(text), range.contains(v) else { fail("--\(name) must be a number in \(range)") }
        return v
    }
}

// MARK: - serve-echo

/// TCP and UDP echo on 127.0.0.1, one epoll thread, non-blocking sockets, bounded lifetime.
func serveEcho(tcpPort: UInt16?, udpPort: UInt16?, lifetime: Double, proxy: Bool) -> Never {
    let end = monotonicSeconds() + lifetime
    let ep = epoll_create1(Int32(EPOLL_CLOEXEC))
    guard ep >= 0 else { fail("epoll_create1: \(Errno.current)") }
    let nonblocking = Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue)

    func watch(_ fd: Int32, _ events: UInt32, op: Int32 = EPOLL_CTL_ADD) {
        var ev = epoll_event()
        ev.events = events
        ev.data.u64 = UInt64(UInt32(bitPattern: fd))
        epoll_ctl(ep, op, fd, &ev)
    }

    var tcp: Int32 = -1
    if let tcpPort {
        tcp = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | nonblocking, 0)
        TestSockets.setOption(tcp, level: SOL_SOCKET, name: SO_REUSEADDR, 1)
        guard SocketAddress(.loopbackIPv4, port: tcpPort).withSockaddr({ bind(tcp, $0, $1) }) == 0,
            listen(tcp, 4096) == 0
        else { fail("cannot listen on TCP 127.0.0.1:\(tcpPort): \(Errno.current)") }
        watch(tcp, EPOLLIN.rawValue)
    }
    var udp: Int32 = -1
    if let udpPort {
        udp = socket(AF_INET, Int32(SOCK_DGRAM.rawValue) | nonblocking, 0)
        guard SocketAddress(.loopbackIPv4, port: udpPort).withSockaddr({ bind(udp, $0, $1) }) == 0
        else { fail("cannot bind UDP 127.0.0.1:\(udpPort): \(Errno.current)") }
        watch(udp, EPOLLIN.rawValue)
    }
    say("ready")

    // Bytes a connection's peer has not taken yet; while any are pending we stop reading it.
    var pending: [Int32: [UInt8]] = [:]
    var listenerPausedUntil: Double? = nil
    var events = [epoll_event](repeating: epoll_event(), count: 512)
    var buffer = [UInt8](repeating: 0, count: 1 << 16)

    // Connections whose PROXY header (--proxy) has not been read yet.
    var awaitingHeader = Set<Int32>()

    func drop(_ fd: Int32) {
        pending[fd] = nil
        awaitingHeader.remove(fd)
        close(fd)  // also removes it from the epoll set
    }

    /// Writes `bytes` to `fd`; keeps what does not fit and waits for EPOLLOUT. False: closed.
    func send(_ fd: Int32, _ bytes: UnsafeRawBufferPointer) -> Bool {
        var offset = 0
        while offset < bytes.count {
            let w = write(fd, bytes.baseAddress! + offset, bytes.count - offset)
            if w > 0 {
                offset += w
                continue
            }
            if w < 0 && errno == EINTR { continue }
            if w < 0 && errno == EAGAIN {
                pending[fd] = Array(bytes[offset...])
                watch(fd, EPOLLOUT.rawValue, op: EPOLL_CTL_MOD)
                return true
            }
            drop(fd)
            return false
        }
        if pending[fd] != nil {
            pending[fd] = nil
            watch(fd, EPOLLIN.rawValue, op: EPOLL_CTL_MOD)
        }
        return true
    }

    while monotonicSeconds() < end {
        var timeout: Int32 = 1000
        if let until = listenerPausedUntil {
            if monotonicSeconds() >= until {
                watch(tcp, EPOLLIN.rawValue)
                listenerPausedUntil = nil
            } else {
                timeout = 50
            }
        }
        let n = epoll_wait(ep, &events, Int32(events.count), timeout)
        if n < 0 && errno != EINTR { fail("epoll_wait: \(Errno.current)") }
        for k in 0..<Int(max(n, 0)) {
            let fd = Int32(truncatingIfNeeded: events[k].data.u64)
            if fd == tcp {
                for _ in 0..<256 {
                    let c = pesto_accept4(tcp, nil, nil, nonblocking)
                    if c < 0 {
                        if errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM {
                            // Out of descriptors: leave the rest in the backlog for a moment.
                            epoll_ctl(ep, EPOLL_CTL_DEL, tcp, nil)
                            listenerPausedUntil = monotonicSeconds() + 0.1
                        }
                        break
                    }
                    TestSockets.setOption(c, level: Int32(IPPROTO_TCP), name: TCP_NODELAY, 1)
                    if proxy { awaitingHeader.insert(c) }
                    watch(c, EPOLLIN.rawValue)
                }
            } else if fd == udp {
                for _ in 0..<256 {
                    var peer = SocketAddress()
                    let r = peer.withMutableSockaddr { recvfrom(udp, &buffer, buffer.count, 0, $0, $1) }
                    if r < 0 { break }
                    _ = peer.withSockaddr { sendto(udp, buffer, r, 0, $0, $1) }
                }
            } else if let rest = pending[fd] {
                // Writable again (or an error, which write() reports).
                _ = rest.withUnsafeBytes { send(fd, $0) }
            } else {
                let r = read(fd, &buffer, buffer.count)
                if r > 0 {
                    // pestod sends the header in one write before any data: it comes whole.
                    let skip = awaitingHeader.remove(fd) != nil ? proxyHeaderLength(buffer[0..<r]) : 0
                    if skip > r {
                        drop(fd)
                        continue
                    }
                    if skip == r { continue }
                    _ = buffer.withUnsafeBytes { send(fd, UnsafeRawBufferPointer(rebasing: $0[skip..<r])) }
                } else if r == 0 || (errno != EAGAIN && errno != EINTR) {
                    drop(fd)
                }
            }
        }
    }
    exit(0)
}

/// The length of the PROXY protocol header `bytes` starts with: v1's line through its CRLF,
/// or v2's 16 bytes plus the length they give; `Int.max` when there is none or it is cut.
func proxyHeaderLength(_ bytes: ArraySlice<UInt8>) -> Int {
    let b = Array(bytes)
    if b.starts(with: ProxyProtocolHeader.v2Signature), b.count >= 16 {
        return 16 + Int(b[14]) << 8 + Int(b[15])
    }
    if b.starts(with: Array("PROXY ".utf8)), let cr = b.firstIndex(of: 0x0D), cr + 1 < b.count, b[cr + 1] == 0x0A {
        return cr + 2
    }
    return Int.max
}

// MARK: - connrate

final class ConnectionCounters: Sendable {
    let done = Atomic<Int>(0)
    let failures = Atomic<Int>(0)
    let finished = Atomic<Int>(0)
    let firstError = Atomic<Int32>(0)

    func failed(_ e: Errno) {
        failures.add(1, ordering: .relaxed)
        _ = firstError.compareExchange(expected: 0, desired: e.rawValue, ordering: .relaxed)
    }
}

/// `clients` threads of connect, 1-byte echo, close, for `duration` seconds.
func connectionRate(port: UInt16, duration: Double, clients: Int, spread: Bool, sourceNet: String?) -> Never {
    let counters = ConnectionCounters()
    let start = monotonicSeconds()
    let end = start + duration
    for k in 0..<clients {
        var chosen: IPAddress? = spread ? loopback(UInt32(10 + k)) : nil
        if let sourceNet {
            guard let a = IPAddress("\(sourceNet).\(10 + k)") else { fail("--source-net \(sourceNet): not A.B.C") }
            chosen = a
        }
        let source = chosen
        detachThread {
            while monotonicSeconds() < end {
                switch TestSockets.connect(port: port, from: source, timeoutMilliseconds: 2000, noDelay: true) {
                case .failure(let e):
                    counters.failed(e)
                    usleep(1000)  // e.g. refused: do not spin
                case .success(let fd):
                    if let e = echoOne(fd) {
                        counters.failed(e)
                    } else if monotonicSeconds() <= end {
                        counters.done.add(1, ordering: .relaxed)
                    }
                    close(fd)
                }
            }
            counters.finished.add(1, ordering: .relaxed)
        }
    }
    // Each operation times out after 2 s, so every thread ends by end + 4 s.
    while counters.finished.load(ordering: .relaxed) < clients && monotonicSeconds() < end + 10 { usleep(10_000) }
    let rate = Int((Double(counters.done.load(ordering: .relaxed)) / duration).rounded())
    var line = "connrate \(rate) failures \(counters.failures.load(ordering: .relaxed))"
    let first = counters.firstError.load(ordering: .relaxed)
    if first != 0 { line += " first \(Errno(rawValue: first).name)" }
    say(line)
    exit(0)
}

// MARK: - udprr

/// UDP ping-pong, 64-byte datagrams, sequence-numbered, for `duration` seconds.
func udpRoundTrips(port: UInt16, duration: Double, source: IPAddress?) -> Never {
    let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    TestSockets.setTimeouts(fd, milliseconds: 200)
    if let source, SocketAddress(source, port: 0).withSockaddr({ bind(fd, $0, $1) }) != 0 {
        fail("bind UDP to \(source): \(Errno.current)")
    }
    guard SocketAddress(.loopbackIPv4, port: port).withSockaddr({ connect(fd, $0, $1) }) == 0
    else { fail("connect UDP 127.0.0.1:\(port): \(Errno.current)") }
    var request = [UInt8](repeating: 0x5A, count: 64)
    var reply = [UInt8](repeating: 0, count: 2048)
    var count = 0
    var lost = 0
    var sequence: UInt64 = 0
    let start = monotonicSeconds()
    let end = start + duration
    while monotonicSeconds() < end {
        sequence += 1
        withUnsafeBytes(of: sequence) { request.replaceSubrange(0..<8, with: $0) }
        guard send(fd, request, 64, 0) == 64 else {
            lost += 1
            usleep(1000)  // ECONNREFUSED from an earlier ICMP error, and the like
            continue
        }
        while true {
            let r = recv(fd, &reply, reply.count, 0)
            if r < 0 {
                if errno == EINTR { continue }
                lost += 1  // timed out (EAGAIN) or refused
                if errno != EAGAIN { usleep(1000) }
                break
            }
            if r == 64 && reply[0..<8].elementsEqual(request[0..<8]) {
                count += 1
                break
            }
            // A late reply to an earlier request: keep waiting for this one.
        }
    }
    say("udprr \(Int((Double(count) / duration).rounded())) lost \(lost)")
    exit(0)
}

// MARK: - idle

/// Opens `count` connections, checks each with an echo, holds them until stdin closes.
func idleConnections(port: UInt16, count: Int, hold: Double) -> Never {
    let limit = DescriptorPlan.current.openFileLimit
    if count + 16 > limit {
        fail("--count \(count) needs more descriptors than RLIMIT_NOFILE \(limit) allows")
    }
    var fds: [Int32] = []
    fds.reserveCapacity(count)
    for i in 0..<count {
        let fd: Int32
        switch TestSockets.connect(port: port, timeoutMilliseconds: 5000, noDelay: true) {
        case .failure(let e):
            say("failed \(i + 1) of \(count): connect: \(e.name)")
            exit(1)
        case .success(let s): fd = s
        }
        if let e = echoOne(fd) {
            say("failed \(i + 1) of \(count): echo: \(e.name)")
            exit(1)
        }
        fds.append(fd)
    }
    say("ready \(fds.count)")
    let end = monotonicSeconds() + hold
    var b: UInt8 = 0
    while monotonicSeconds() < end {
        var p = pollfd(fd: 0, events: Int16(POLLIN), revents: 0)
        let n = poll(&p, 1, Int32(min(1000, max(1, (end - monotonicSeconds()) * 1000))))
        if n < 0 && errno != EINTR { break }
        if n > 0 && read(0, &b, 1) <= 0 { break }  // EOF (or error): done
    }
    for fd in fds { close(fd) }
    exit(0)
}

// MARK: - main

let usage = """
    usage: pesto-loadgen serve-echo --tcp PORT [--udp PORT] [--lifetime SECONDS] [--proxy]
           pesto-loadgen connrate --port PORT --seconds S --clients C [--spread | --source-net A.B.C]
           pesto-loadgen udprr --port PORT --seconds S [--source ADDRESS]
           pesto-loadgen udpflows --port PORT --seconds S [--flows F] [--window W]
           pesto-loadgen idle --port PORT --count N [--hold SECONDS]
           pesto-loadgen streams --port PORT --target-port PORT --count N [--bytes B] [--hold SECONDS]
    """

signal(SIGPIPE, SIG_IGN)
let arguments = CommandLine.arguments
let command = arguments.count > 1 ? arguments[1] : ""
let options = Options(arguments.dropFirst(2), flags: ["spread", "proxy"])
switch command {
case "serve-echo":
    let tcp = options.port("tcp")
    let udp = options.port("udp")
    if tcp == nil && udp == nil { fail("serve-echo needs --tcp PORT and/or --udp PORT") }
    serveEcho(
        tcpPort: tcp, udpPort: udp, lifetime: options.number("lifetime", default: 3600, range: 1...86_400),
        proxy: options.flags.contains("proxy"))
case "connrate":
    connectionRate(
        port: options.requiredPort("port"),
        duration: options.number("seconds", range: 0.01...3600),
        clients: Int(options.number("clients", default: 1, range: 1...200)),
        spread: options.flags.contains("spread"), sourceNet: options.values["source-net"])
case "udprr":
    let source = options.values["source"].map { text -> IPAddress in
        guard let a = IPAddress(text) else { fail("--source \(text): not an address") }
        return a
    }
    udpRoundTrips(port: options.requiredPort("port"), duration: options.number("seconds", range: 0.01...3600), source: source)
case "udpflows":
    udpFlows(
        port: options.requiredPort("port"), duration: options.number("seconds", range: 0.01...3600),
        flows: Int(options.number("flows", default: 64, range: 1...1024)), window: Int(options.number("window", default: 4, range: 1...256))
    )
case "idle":
    idleConnections(
        port: options.requiredPort("port"),
        count: Int(options.number("count", range: 1...1_000_000)),
        hold: options.number("hold", default: 600, range: 1...86_400))
case "streams":
    streams(
        port: options.requiredPort("port"), targetPort: options.requiredPort("target-port"),
        count: Int(options.number("count", range: 1...1_000_000)), chunk: Int(options.number("bytes", default: 256, range: 1...65_536)),
        hold: options.number("hold", default: 3600, range: 1...86_400))
default:
    say(usage)
    exit(2)
}

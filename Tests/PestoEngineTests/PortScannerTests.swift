// SPDX-License-Identifier: GPL-2.0-or-later

// PortScanner: parsing /proc/net/{tcp,udp}[6] texts (whole and in chunks), real sockets on
// loopback, a network namespace, and (on request) the time a scan takes with many sockets.

import CPestoSys
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoEngine
@testable import PestoModel

#if canImport(Glibc)
    import Glibc
#endif

// MARK: - Fixtures (copied from this machine's /proc/net files, ports and inodes edited)

/// /proc/net/tcp: LISTEN on 2024 and 21726, ESTABLISHED both ways, a TIME_WAIT (inode 0).
let tcpSample = """
      sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode                                                     
       0: 00000000:07E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 582 1 000000005f75b378 100 0 0 10 0                       
       1: 0100007F:54DE 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 374225 1 000000000f242167 100 0 0 10 0                    
       2: 0100007F:E501 0100007F:D62B 01 00000000:00000000 00:00000000 00000000     0        0 373019 2 0000000074cd68f8 20 4 30 10 -1                   
       3: 0100007F:D62B 0100007F:E501 01 00000000:00000000 00:00000000 00000000     0        0 373018 2 000000009ef9f731 20 4 1 10 -1                    
       4: 0100007F:1F90 0100007F:C350 06 00000000:00000000 03:00001770 00000000     0        0 0 3 0000000068f40ba8                                      

    """

/// /proc/net/tcp6: LISTEN on [::]:54987, its accepted connection (CLOSE_WAIT) and the
/// client's end (FIN_WAIT2, inode 0).
let tcp6Sample = """
      sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
       0: 00000000000000000000000000000000:D6CB 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 775552 1 00000000ccbde506 100 0 0 10 0
       1: 00000000000000000000000001000000:D6CB 00000000000000000000000001000000:C792 08 00000000:00000001 00:00000000 00000000     0        0 775556 2 00000000638970b2 20 0 1 10 -1
       2: 00000000000000000000000001000000:C792 00000000000000000000000001000000:D6CB 05 00000000:00000000 03:00001770 00000000     0        0 0 3 0000000068f40ba8

    """

/// /proc/net/udp: a connected socket (st 01, a DNS client) and an unconnected one on 5353.
let udpSample = """
       sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops            
     3190: 0100007F:A2C8 0100007F:0035 01 00000000:00000000 00:00000000 00000000     0        0 775554 2 0000000091206b01 0        
     3759: 00000000:14E9 00000000:0000 07 00000000:00000000 00:00000000 00000000   101        0 373019 2 0000000074cd68f8 0        

    """

/// /proc/net/udp6: unconnected on [::1]:33868, connected on [::1]:4000.
let udp6Sample = """
      sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
    11770: 00000000000000000000000001000000:844C 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 775553 2 00000000bad298ff 0
    11771: 00000000000000000000000001000000:0FA0 00000000000000000000000001000000:0035 01 00000000:00000000 00:00000000 00000000     0        0 775560 2 00000000bad29900 0

    """

/// Parses `text` as a whole with `PortScanner.parse`.
func parsed(_ text: String, _ proto: TransportProtocol, excluding: Set<UInt64> = []) -> PortSet {
    var result = PortSet()
    Array(text.utf8).withUnsafeBytes { PortScanner.parse($0, proto: proto, excludingInodes: excluding, into: &result) }
    return result
}

/// Parses `text` fed to one parser in chunks of `chunk` bytes.
func parsedInChunks(_ text: String, _ proto: TransportProtocol, chunk: Int, excluding: Set<UInt64> = []) -> PortSet {
    var result = PortSet()
    var parser = ProcNetParser(proto: proto)
    Array(text.utf8).withUnsafeBytes { all in
        var start = 0
        while start < all.count {
            let end = min(start + chunk, all.count)
            parser.feed(UnsafeRawBufferPointer(rebasing: all[start..<end]), excludingInodes: excluding, into: &result)
            start = end
        }
    }
    parser.finish()
    return result
}

// MARK: - PortSet

@Suite("Port set", .timeLimit(.minutes(10)))
struct PortSetTests {
    @Test("insert, remove, contains and count, at both ends of the port range")
    func basics() {
        var set = PortSet()
        #expect(set.isEmpty)
        for port: UInt16 in [0, 1, 63, 64, 8080, 65_535, 8080] { set.insert(port) }
        #expect(set.count == 6)
        #expect(set.contains(0) && set.contains(63) && set.contains(64) && set.contains(65_535))
        #expect(!set.contains(2) && !set.contains(65_534))
        set.remove(63)
        set.remove(63)
        #expect(set.count == 5 && !set.contains(63))
        #expect(Array(set) == [0, 1, 64, 8080, 65_535])
        set.removeAll()
        #expect(set.isEmpty && Array(set).isEmpty)
    }

    @Test("equality and hashing follow the members; description shows runs")
    func equality() {
        var a: PortSet = [22, 8000, 8001, 8002]
        let b: PortSet = [8002, 8001, 8000, 22]
        #expect(a == b)
        #expect(Set([a, b]).count == 1)
        #expect(a.description == "[22, 8000-8002]")
        a.insert(9)
        #expect(a != b)
        a.remove(9)
        #expect(a == b)
    }
}

// MARK: - Parsing

@Suite("PortScanner parsing", .timeLimit(.minutes(10)))
struct PortScannerParsingTests {
    @Test("TCP: only LISTEN counts (not ESTABLISHED, TIME_WAIT, CLOSE_WAIT, FIN_WAIT2), IPv4 and IPv6")
    func tcp() {
        #expect(parsed(tcpSample, .tcp) == [2024, 21_726])
        #expect(parsed(tcp6Sample, .tcp) == [54_987])
    }

    @Test("UDP: only bound unconnected sockets (st 07) count, IPv4 and IPv6")
    func udp() {
        #expect(parsed(udpSample, .udp) == [5353])
        #expect(parsed(udp6Sample, .udp) == [33_868])
    }

    @Test("the protocol picks the state: a TCP text read as UDP yields nothing, and back")
    func stateFollowsProtocol() {
        #expect(parsed(tcpSample, .udp).isEmpty)
        #expect(parsed(udpSample, .tcp).isEmpty)
    }

    @Test("sockets whose inode is excluded do not count; others on the same port still do")
    func excludedInodes() {
        #expect(parsed(tcpSample, .tcp, excluding: [374_225]) == [2024])
        #expect(parsed(tcpSample, .tcp, excluding: [582, 374_225]).isEmpty)
        #expect(parsed(udp6Sample, .udp, excluding: [775_553]).isEmpty)
        // An unrelated inode changes nothing, including ones on non-LISTEN lines.
        #expect(parsed(tcpSample, .tcp, excluding: [373_019, 0, 1]) == [2024, 21_726])
        let twoOnOnePort = """
               0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 100 1 0 100 0 0 10 0
               1: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 200 1 0 100 0 0 10 0

            """
        #expect(parsed(twoOnOnePort, .tcp, excluding: [100]) == [8080])
        #expect(parsed(twoOnOnePort, .tcp, excluding: [100, 200]).isEmpty)
    }

    @Test("several files parsed into one set add up")
    func accumulates() {
        var result = PortSet()
        for text in [tcpSample, tcp6Sample] {
            Array(text.utf8).withUnsafeBytes { PortScanner.parse($0, proto: .tcp, excludingInodes: [], into: &result) }
        }
        #expect(result == [2024, 21_726, 54_987])
    }

    @Test("malformed and truncated lines are skipped, good lines around them still count")
    func robustness() {
        let line = "   0: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0 100 0 0 10 0\n"
        #expect(parsed(line, .tcp) == [80])
        #expect(parsed("", .tcp).isEmpty)
        #expect(parsed("\n\n\n", .tcp).isEmpty)
        // The header alone.
        #expect(parsed("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n", .tcp).isEmpty)
        let bad = [
            "   0: 00000000:0051 00000000:0000 0A\n",  // cut before the inode
            "   0: 00000000:0052 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0\n",  // cut before the inode
            "   0: 00000000 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n",  // no port
            "   0: 00000000: 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n",  // empty port
            "   0: :0053 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n",  // no address
            "   0: 00000000:00054 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n",  // 5 port digits
            "   0: 00000000:0055:1 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n",  // two colons
            "   0: 0000000G:0056 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n",  // not hex
            "   0: 00000000:0057 00000000:0000 0AA 00000000:00000000 00:00000000 00000000     0        0 1 1\n",  // 3-digit state
            "   0: 00000000:0058 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12x 1\n",  // bad inode
            // inode > UInt64.max
            "   0: 00000000:0059 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 99999999999999999999 1\n",
            "   0: 00000000:0000 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n",  // port 0
        ]
        for b in bad {
            #expect(parsed(b, .tcp).isEmpty, "\(b)")
            #expect(parsed(line + b + line.replacingPort("0050", with: "0060"), .tcp) == [80, 96], "\(b)")
        }
        // A last line cut inside its inode may carry a shortened inode: it does not count.
        let cut = "   0: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 42"
        #expect(parsed(cut, .tcp).isEmpty)
        // A last line cut after its inode does.
        #expect(parsed(cut + " 1 0000", .tcp) == [80])
        // Lower-case hex, tabs, the largest port and a 20-digit inode.
        let odd = "0:\t0000000a:ffff\t00000000:0000\t0a 0 0 0 0 0 18446744073709551615\n"
        #expect(parsed(odd, .tcp) == [65_535])
        #expect(parsed(odd, .tcp, excluding: [UInt64.max]).isEmpty)
    }

    @Test("a text fed in chunks of every size from 1 to 400 bytes parses as when whole")
    func chunks() {
        let cases: [(String, TransportProtocol, Set<UInt64>)] = [
            (tcpSample, .tcp, []), (tcp6Sample, .tcp, []), (udpSample, .udp, []), (udp6Sample, .udp, []),
            (tcpSample, .tcp, [582]),
        ]
        for (text, proto, excluding) in cases {
            let whole = parsed(text, proto, excluding: excluding)
            #expect(!whole.isEmpty || !excluding.isEmpty)
            for chunk in 1...400 {
                let got = parsedInChunks(text, proto, chunk: chunk, excluding: excluding)
                #expect(got == whole, "chunk \(chunk): \(got) != \(whole)")
            }
        }
    }

    @Test("every split point of a two-chunk feed parses as the whole")
    func everySplit() {
        let text = tcpSample + tcp6Sample
        let whole = parsed(text, .tcp)
        #expect(whole == [2024, 21_726, 54_987])
        let bytes = Array(text.utf8)
        for split in 0...bytes.count {
            var result = PortSet()
            var parser = ProcNetParser(proto: .tcp)
            bytes.withUnsafeBytes { all in
                parser.feed(UnsafeRawBufferPointer(rebasing: all[..<split]), excludingInodes: [], into: &result)
                parser.feed(UnsafeRawBufferPointer(rebasing: all[split...]), excludingInodes: [], into: &result)
            }
            parser.finish()
            #expect(result == whole, "split at \(split)")
        }
    }
}

extension String {
    /// The same /proc/net line with its 4-digit hex local port replaced.
    fileprivate func replacingPort(_ old: String, with new: String) -> String {
        var s = Array(self)
        let o = Array(old)
        for i in 0...(s.count - o.count) where Array(s[i..<(i + o.count)]) == o {
            s.replaceSubrange(i..<(i + o.count), with: Array(new))
            return String(s)
        }
        return self
    }
}

// MARK: - The chunked file reader

/// A temporary directory holding fixture files named like those of /proc/net; removed at the end.
func withFixtureDirectory(_ files: [String: String], _ body: (String) -> Void) {
    do {
        let dir = try TemporaryDirectory(prefix: "pesto-scan-")
        for (name, text) in files { try writeFile(dir.file(name), text) }
        body(dir.path)
    } catch {
        Issue.record("\(error)")
    }
}

@Suite("PortScanner files", .timeLimit(.minutes(10)))
struct PortScannerFileTests {
    @Test("reading files in chunks of 1, 7, 150 and 65,536 bytes gives the same ports", arguments: [1, 7, 150, 65_536])
    func chunkedReader(chunkSize: Int) {
        // Make the files long, so that most lines straddle a chunk boundary somewhere.
        let filler = String(repeating: tcpSample.split(separator: "\n").dropFirst(3).joined(separator: "\n") + "\n", count: 500)
        let files = ["tcp": tcpSample + filler, "tcp6": tcp6Sample, "udp": udpSample, "udp6": udp6Sample]
        withFixtureDirectory(files) { dir in
            let scanner = PortScanner(chunkSize: chunkSize, directory: dir)
            var ports = PortSet()
            #expect(throws: Never.self) { try scanner.boundPorts(.tcp, into: &ports).get() }
            #expect(ports == [2024, 21_726, 54_987])
            #expect(throws: Never.self) { try scanner.boundPorts(.udp, into: &ports).get() }
            #expect(ports == [5353, 33_868])
            #expect(throws: Never.self) { try scanner.boundPorts(.tcp, excludingInodes: [582, 775_552], into: &ports).get() }
            #expect(ports == [21_726])
        }
    }

    @Test("a missing IPv6 file means no IPv6 sockets; a missing IPv4 file is an error and empties the result")
    func missingFiles() {
        withFixtureDirectory(["tcp": tcpSample, "udp6": udp6Sample]) { dir in
            let scanner = PortScanner(chunkSize: 64, directory: dir)
            var ports = PortSet()
            #expect(throws: Never.self) { try scanner.boundPorts(.tcp, into: &ports).get() }
            #expect(ports == [2024, 21_726])
            ports.insert(1)
            #expect(throws: Errno(rawValue: ENOENT)) { try scanner.boundPorts(.udp, into: &ports).get() }
            #expect(ports.isEmpty)
        }
    }
}

// MARK: - Real sockets

@Suite("PortScanner sockets", .timeLimit(.minutes(10)))
struct PortScannerSocketTests {
    /// Scans `proto` in the calling thread's namespace, recording a failure.
    static func scan(_ scanner: PortScanner, _ proto: TransportProtocol, excluding: Set<UInt64> = []) -> PortSet {
        var ports = PortSet()
        if case .failure(let e) = scanner.boundPorts(proto, excludingInodes: excluding, into: &ports) {
            Issue.record("scan of \(proto) failed: \(e)")
        }
        return ports
    }

    @Test("listeners and bound UDP sockets on loopback are found, connected ones are not; closed or excluded ones vanish")
    func loopback() throws {
        let ports = TestSockets.freePorts(5)
        let p = Array(ports)
        let stream = Int32(SOCK_STREAM.rawValue)
        let dgram = Int32(SOCK_DGRAM.rawValue)
        let tcp4 = try #require(TestSockets.bound(stream, address: .loopbackIPv4, port: p[0]))
        let udp4 = try #require(TestSockets.bound(dgram, address: .loopbackIPv4, port: p[1]))
        let tcp6 = try #require(TestSockets.bound(stream, address: .loopbackIPv6, port: p[2]))
        let udp6 = try #require(TestSockets.bound(dgram, address: .loopbackIPv6, port: p[3]))
        // A connected UDP socket on p[4]: not a "listening" one.
        let connectedUDP = try #require(TestSockets.bound(dgram, address: .loopbackIPv4, port: p[4]))
        defer { close(connectedUDP) }
        #expect(TestSockets.withSocketAddress(.loopbackIPv4, p[1]) { connect(connectedUDP, $0, $1) == 0 })
        // An established TCP connection: the client's ephemeral port must not show up.
        let client = try TestSockets.connect(.loopbackIPv4, port: p[0]).get()
        defer { close(client) }
        var clientAddress = sockaddr_in()
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &clientAddress) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(client, $0, &length) }
        }
        let clientPort = UInt16(bigEndian: clientAddress.sin_port)

        let scanner = PortScanner()
        var tcp = Self.scan(scanner, .tcp)
        var udp = Self.scan(scanner, .udp)
        #expect(tcp.contains(p[0]) && tcp.contains(p[2]))
        #expect(!tcp.contains(p[1]) && !tcp.contains(p[3]) && !tcp.contains(clientPort))
        #expect(udp.contains(p[1]) && udp.contains(p[3]))
        #expect(!udp.contains(p[0]) && !udp.contains(p[2]) && !udp.contains(p[4]))

        // Excluding their inodes hides exactly them.
        let inodes = Set([tcp4, tcp6, udp4].compactMap(TestSockets.inode))
        #expect(inodes.count == 3)
        tcp = Self.scan(scanner, .tcp, excluding: inodes)
        udp = Self.scan(scanner, .udp, excluding: inodes)
        #expect(!tcp.contains(p[0]) && !tcp.contains(p[2]) && !udp.contains(p[1]))
        #expect(udp.contains(p[3]))

        // Closed, they are gone (a closed listener leaves no TIME_WAIT entry in LISTEN).
        for fd in [tcp4, udp4, tcp6, udp6] { close(fd) }
        tcp = Self.scan(scanner, .tcp)
        udp = Self.scan(scanner, .udp)
        for port in p {
            #expect(!tcp.contains(port) && !udp.contains(port), "port \(port)")
        }
    }
}

@Suite("PortScanner namespace", .timeLimit(.minutes(10)))
struct PortScannerNamespaceTests {
    @Test(
        "a scan inside NetworkNamespace.perform sees the namespace's sockets, the host scan does not",
        .enabled(if: getuid() == 0, "needs root to create a network namespace (ip netns add)")
    )
    func namespace() throws {
        let testNamespace = try TestNamespace()
        let ns = testNamespace.namespace
        defer { withExtendedLifetime(testNamespace) {} }

        // Free on the host, so the host scan must not report them.
        let ports = TestSockets.freePorts(2)
        let (tcpPort, udpPort) = (ports.lowerBound, ports.upperBound)
        let (listener, udp) = ns.perform {
            (
                TestSockets.bound(Int32(SOCK_STREAM.rawValue), address: .loopbackIPv4, port: tcpPort),
                TestSockets.bound(Int32(SOCK_DGRAM.rawValue), address: .loopbackIPv4, port: udpPort)
            )
        }
        defer {
            if let listener { close(listener) }
            if let udp { close(udp) }
        }
        let tcpFD = try #require(listener)
        _ = try #require(udp)

        // This test runs on a pool thread, not the process's main thread: with /proc/self/net
        // (the thread-group leader's namespace) the scan below would see the host instead.
        let scanner = PortScanner()
        var insideTCP = PortSet()
        var insideUDP = PortSet()
        var excluded = PortSet()
        let inode = try #require(TestSockets.inode(tcpFD))
        let results = ns.perform {
            [
                scanner.boundPorts(.tcp, into: &insideTCP),
                scanner.boundPorts(.udp, into: &insideUDP),
                scanner.boundPorts(.tcp, excludingInodes: [inode], into: &excluded),
            ]
        }
        for r in results { #expect(throws: Never.self) { try r.get() } }
        // A new namespace holds nothing else.
        #expect(insideTCP == [tcpPort])
        #expect(insideUDP == [udpPort])
        #expect(excluded.isEmpty)

        let hostTCP = PortScannerSocketTests.scan(scanner, .tcp)
        let hostUDP = PortScannerSocketTests.scan(scanner, .udp)
        #expect(!hostTCP.contains(tcpPort))
        #expect(!hostUDP.contains(udpPort))
    }
}

// MARK: - Timing

/// Raises the soft descriptor limit to `wanted` (and the hard one when allowed); returns the limit now in force.
func raiseDescriptorLimit(to wanted: rlim_t) -> rlim_t {
    var limit = rlimit()
    getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
    if limit.rlim_max < wanted {
        var raised = rlimit(rlim_cur: wanted, rlim_max: wanted)
        if setrlimit(Int32(RLIMIT_NOFILE.rawValue), &raised) == 0 { return wanted }
    }
    limit.rlim_cur = min(wanted, limit.rlim_max)
    setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
    return limit.rlim_cur
}

@Suite("PortScanner timing", .timeLimit(.minutes(10)))
struct PortScannerTimingTests {
    @Test(
        "time of a TCP scan (tcp + tcp6) with up to 20,000 listeners, in a fresh namespace (printed, not asserted)",
        .enabled(if: getuid() == 0 && getenv("PESTO_SCAN_BENCH") != nil, "set PESTO_SCAN_BENCH=1 and run as root")
    )
    func timing() throws {
        // 20,000, or fewer when the descriptor limit cannot be raised that far.
        let limit = Int(raiseDescriptorLimit(to: 21_000))
        let count = min(20_000, (limit - 500) / 2 * 2)
        let testNamespace = try TestNamespace()
        let ns = testNamespace.namespace
        defer { withExtendedLifetime(testNamespace) {} }
        // Half IPv4, half IPv6, on ports 10000... of loopback.
        var fds: [Int32] = []
        defer { for fd in fds { close(fd) } }
        ns.perform {
            for i in 0..<count {
                let address: IPAddress = i % 2 == 0 ? .loopbackIPv4 : .loopbackIPv6
                if let fd = TestSockets.bound(Int32(SOCK_STREAM.rawValue), address: address, port: UInt16(10_000 + i / 2)) {
                    fds.append(fd)
                }
            }
        }
        try #require(fds.count == count, "opened \(fds.count) of \(count) listeners")
        let scanner = PortScanner()
        var ports = PortSet()
        var samples: [Double] = []
        for _ in 0..<20 {
            var start = timespec()
            var end = timespec()
            clock_gettime(CLOCK_MONOTONIC, &start)
            let r = ns.perform { scanner.boundPorts(.tcp, into: &ports) }
            clock_gettime(CLOCK_MONOTONIC, &end)
            #expect(throws: Never.self) { try r.get() }
            samples.append(Double(end.tv_sec - start.tv_sec) * 1e3 + Double(end.tv_nsec - start.tv_nsec) / 1e6)
        }
        #expect(ports.count == count / 2)
        samples.sort()
        print("PortScanner: \(count) listeners, tcp+tcp6 scan: min \(samples[0]) ms, median \(samples[samples.count / 2]) ms")
    }
}

// ForwardingEngine: the tables of one pestod and the periodic work that keeps them healthy.

#if canImport(Glibc)
import Glibc
#endif

/// How an engine is set up.
public struct EngineConfiguration: Sendable {
    /// Limits of each table.
    public var limits: TableLimits = .default
    /// How often failed binds are retried, in milliseconds (the contract says every second).
    public var retryIntervalMilliseconds: Int = 1000
    /// The capabilities of the HOST table; nil detects them from the kernel.
    public var capabilities: Capabilities? = nil

    /// The defaults.
    public init() {}
}

/// The forwarding engine: its tables, on one event loop.
///
/// Owns the HOST table (and, once a target namespace is configured, the SPLICE table) and
/// arms the timer that retries failed binds every second. Belongs to the loop's thread.
public final class ForwardingEngine {
    /// The loop everything runs on.
    public let loop: EventLoop
    /// The inbound table (pasta's HOST).
    public let host: ForwardingTable
    private var retryTimer: EventLoop.TimerID?

    /// Makes an engine with empty tables; call `start()` to arm its timers.
    public init(loop: EventLoop, configuration: EngineConfiguration = EngineConfiguration()) {
        self.loop = loop
        let caps = configuration.capabilities ?? HostCapabilities.detect()
        host = ForwardingTable(
            kind: .host, capabilities: caps, limits: configuration.limits,
            factory: KernelListenerFactory(families: caps))
        self.configuration = configuration
    }

    private let configuration: EngineConfiguration

    /// Every table, in the contract's order.
    public var tables: [ForwardingTable] { [host] }

    /// The table of `kind`, if this engine has one.
    public func table(_ kind: TableKind) -> ForwardingTable? { tables.first { $0.kind == kind } }

    /// Arms the retry timer.
    public func start() {
        guard retryTimer == nil else { return }
        retryTimer = loop.every(milliseconds: configuration.retryIntervalMilliseconds) { [unowned self] in
            for table in self.tables { table.retryFailedBinds() }
        }
    }

    /// Disarms the timers (the tables keep their sockets until they are released).
    public func stop() {
        if let retryTimer { loop.cancelTimer(retryTimer) }
        retryTimer = nil
    }
}

/// What the kernel of this host supports.
public enum HostCapabilities {
    /// IPv4 and IPv6 when sockets of each family can be made (IPv6 also needs it enabled in
    /// sysctl), TCP and UDP always, ifname always (SO_BINDTODEVICE; failures are counted per
    /// socket). `scan` arrives with the scanner.
    public static func detect() -> Capabilities {
        var caps: Capabilities = [.tcp, .udp, .ifname]
        if canMakeSocket(AF_INET) { caps.insert(.ipv4) }
        if canMakeSocket(AF_INET6) && !sysctlIsOne("/proc/sys/net/ipv6/conf/all/disable_ipv6") { caps.insert(.ipv6) }
        return caps
    }

    private static func canMakeSocket(_ domain: Int32) -> Bool {
        let fd = socket(domain, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        if fd < 0 { return false }
        close(fd)
        return true
    }

    private static func sysctlIsOne(_ path: String) -> Bool {
        guard let text = readSmallFile(path) else { return false }
        return text.hasPrefix("1")
    }
}

/// Reads a small text file such as a /proc or /sys entry; nil when it cannot be read.
public func readSmallFile(_ path: String, limit: Int = 4096) -> String? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var buffer = [UInt8](repeating: 0, count: limit)
    var total = 0
    while total < limit {
        let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress! + total, limit - total) }
        if n < 0 && errno == EINTR { continue }
        if n <= 0 { break }
        total += n
    }
    return String(decoding: buffer[..<total], as: UTF8.self)
}

// SPDX-License-Identifier: GPL-2.0-or-later

// ForwardingEngine: the tables of one pestod and the periodic work that keeps them healthy.

import PestoModel
import PestoSystem

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
    /// The target network namespace (`/run/netns/NAME`, `/proc/PID/ns/net`), or nil.
    public var namespacePath: String? = nil
    /// Limits of the TCP relay.
    public var tcp = TCPRelayLimits()
    /// Limits of the UDP relay.
    public var udp = UDPRelayLimits()
    /// How long listeners stay paused after running out of descriptors, in milliseconds.
    public var pauseMilliseconds = 100
    /// How often scan rules look at the target side, in milliseconds.
    public var scanIntervalMilliseconds = 1000
    /// The descriptor plan the engine's budget follows; nil reads this process's soft
    /// RLIMIT_NOFILE when the engine is made (see DescriptorBudget.swift).
    public var descriptors: DescriptorPlan? = nil
    /// How the tables treat overlapping active rules (`pestod --overlap`, doc/overlap.md).
    public var overlap: OverlapPolicy = .refuse

    /// The defaults.
    public init() {}
}

/// The forwarding engine: its tables, their listeners, and the TCP and UDP relays, on one event loop.
///
/// Theory of operation: the engine observes every listening socket its tables open
/// (`ListenerObserver`) and keeps, indexed by descriptor, where that listener's traffic
/// goes (`ForwardTarget`). It registers each listener with the loop (kinds `tcpListener`,
/// `udpListener`) and hands readiness to the TCP or UDP relay. Without a namespace there is
/// one table, HOST, whose targets are in pestod's own namespace. With `namespacePath`, HOST
/// connects inside that namespace and a SPLICE table listens inside it and connects out in
/// pestod's namespace — pasta's -t/-T model.
///
/// With `EngineConfiguration.overlap` first-match (doc/overlap.md) the tables share
/// listeners among overlapping rules; such a listener is marked `shared`, and the relays ask
/// its table (`RelayContext.firstMatchTarget`, `ForwardingTable.firstMatchTarget`) which rule
/// each new connection or flow goes to.
///
/// A destination that is one of pestod's own listeners on the same side would make a
/// connection loop forever through pestod; such connections are refused (`refusesLoop`).
/// Listeners pause when descriptors or relay slots run out and resume after
/// `pauseMilliseconds` or when a connection closes, whichever comes first.
///
/// Every descriptor the listeners and relays hold is counted in `budget` (see
/// DescriptorBudget.swift): a listener beyond it is a bind failure (EMFILE), a connection or
/// flow beyond it is refused, so pestod's own descriptors (D-Bus, control socket, state file)
/// never run out because of traffic. A listener that epoll cannot watch (ENOSPC at
/// `fs.epoll.max_user_watches`, ENOMEM) is that port's bind failure too, retried later.
public final class ForwardingEngine: ListenerObserver, RelayContext, EventHandler {
    /// The loop everything runs on.
    public let loop: EventLoop
    /// The inbound table (pasta's HOST).
    public let host: ForwardingTable
    /// The outbound table (pasta's SPLICE), present with a target namespace.
    public let splice: ForwardingTable?
    /// The target namespace, if configured.
    public let namespace: NetworkNamespace?
    /// Where HOST targets are reached (the namespace, if configured), with the policy
    /// routing of transparent source.
    public let hostSide: TargetSide
    /// The TCP relay.
    public private(set) var tcp: TCPRelay!
    /// The UDP relay.
    public private(set) var udp: UDPRelay!
    /// The descriptors listeners and relays hold, against the limits of the plan.
    public let budget: DescriptorBudget
    /// Forwarding loops, a full UDP flow table and a deleted namespace, reported once each.
    public let conditions = DataPathConditions()
    private var retryTimer: EventLoop.TimerID?
    /// While set, the retry and scan passes are skipped (a large change is carried out over
    /// several loop turns, and no rule may change under it; PestoService/SlicedUpdate.swift).
    public var periodicWorkHeld = false
    private var scanTimer: EventLoop.TimerID?
    private let configuration: EngineConfiguration
    private let scanner = PortScanner()
    /// Reused by every scan, so scanning allocates nothing.
    private var scannedPorts = PortSet()
    /// Inodes of pestod's own listening sockets: a scan must not count them.
    private var ownInodes = Set<UInt64>()

    /// What a listening descriptor is for.
    struct ListenerEntry {
        var target: ForwardTarget
        /// Where the listener lives: true inside the target namespace (SPLICE listeners).
        var inNamespace: Bool
        var address: IPAddress?
        var listenPort: UInt16
        var inode: UInt64
        var paused = false
        /// First match: the socket is shared and each connection or flow asks its table
        /// which rule it goes to (`target` is then only the opener's).
        var shared = false
    }

    /// Indexed by descriptor.
    private var listeners: [ListenerEntry?] = []
    /// How many of pestod's own listeners use each protocol, side and port (`ownPortKey`), for
    /// the loop check: one lookup per new connection or flow, and a look at the addresses only
    /// on a hit. Paged counters, not a dictionary of keys: opening or closing a listener costs
    /// an array increment and a page probe shared by 32 ports.
    private var ownPorts = PortCounts()
    private var pausedListeners: [Int32] = []
    /// What the listener `fd` is for, if it is one of the engine's.
    func listenerEntry(fd: Int32) -> ListenerEntry? { Int(fd) < listeners.count && fd >= 0 ? listeners[Int(fd)] : nil }
    /// The listeners paused now (tests).
    var pausedListenerDescriptors: [Int32] { pausedListeners }
    private var resumeTimer: EventLoop.TimerID?

    /// Makes an engine with empty tables; call `start()` to arm its timers. With `adoption`
    /// (a takeover, ListenerAdoption.swift), activating a rule installs its handed-over
    /// listeners instead of opening new ones.
    public init(
        loop: EventLoop, configuration: EngineConfiguration = EngineConfiguration(), adoption: ListenerAdoption? = nil
    ) throws(PestoError) {
        /// The factory of `table`: `base`, or `base` behind the adoption.
        func factory(_ base: any ListenerFactory, _ table: TableKind) -> any ListenerFactory {
            adoption.map { AdoptingListenerFactory(inner: base, table: table, adoption: $0) } ?? base
        }
        self.loop = loop
        self.configuration = configuration
        budget = DescriptorBudget(plan: configuration.descriptors ?? .current)
        let caps = configuration.capabilities ?? HostCapabilities.detect()
        if let path = configuration.namespacePath {
            let ns = try NetworkNamespace(path: path)
            namespace = ns
            // Scan rules need another side to look at: they exist only with a namespace.
            let hostCaps = configuration.capabilities ?? caps.union(.scan)
            host = ForwardingTable(
                kind: .host, capabilities: hostCaps, limits: configuration.limits, overlapPolicy: configuration.overlap,
                factory: factory(KernelListenerFactory(families: caps), .host), clientSource: true)
            let inside = configuration.capabilities ?? ns.perform { HostCapabilities.detect() }.union(.scan)
            splice = ForwardingTable(
                kind: .splice, capabilities: inside, limits: configuration.limits, overlapPolicy: configuration.overlap,
                factory: factory(NamespacedListenerFactory(namespace: ns, families: inside), .splice))
        } else {
            namespace = nil
            host = ForwardingTable(
                kind: .host, capabilities: caps, limits: configuration.limits, overlapPolicy: configuration.overlap,
                factory: factory(KernelListenerFactory(families: caps), .host))
            splice = nil
        }
        // HOST targets are on the namespace's side (if any), SPLICE targets on ours.
        hostSide = TargetSide(namespace: namespace)
        hostSide.conditions = conditions
        let sides = TargetSides(host: hostSide, splice: TargetSide(namespace: nil))
        // The relays hold the engine weakly: they close their connections in their deinit,
        // which runs inside this engine's (pestod stopping with connections open).
        tcp = TCPRelay(loop: loop, sides: sides, context: self, limits: configuration.tcp, budget: budget)
        udp = UDPRelay(loop: loop, sides: sides, context: self, limits: configuration.udp, budget: budget)
        udp.conditions = conditions
        tcp.conditions = conditions
        for table in tables { table.listenerObserver = self }
        loop.setHandler(self, for: EngineEventKind.tcpListener)
        loop.setHandler(self, for: EngineEventKind.udpListener)
    }

    /// The table that opened listener `fd`.
    private func listenerTable(_ fd: Int32) -> ForwardingTable? {
        guard Int(fd) < listeners.count, let entry = listeners[Int(fd)] else { return nil }
        return entry.inNamespace ? splice : host
    }

    /// Every table, in the contract's order.
    public var tables: [ForwardingTable] { [host] + (splice.map { [$0] } ?? []) }

    /// The table of `kind`, if this engine has one.
    public func table(_ kind: TableKind) -> ForwardingTable? { tables.first { $0.kind == kind } }

    /// Arms the retry and scan timers.
    public func start() {
        guard retryTimer == nil else { return }
        retryTimer = loop.every(milliseconds: configuration.retryIntervalMilliseconds) { [unowned self] in
            guard !self.periodicWorkHeld else { return }
            for table in self.tables { table.retryFailedBinds() }
        }
        if namespace != nil {
            scanTimer = loop.every(milliseconds: configuration.scanIntervalMilliseconds) { [unowned self] in
                guard !self.periodicWorkHeld else { return }
                self.scan()
            }
        }
    }

    /// Disarms the timers (the tables keep their sockets until they are released).
    public func stop() {
        for timer in [retryTimer, scanTimer].compactMap({ $0 }) { loop.cancelTimer(timer) }
        retryTimer = nil
        scanTimer = nil
        conditions.clearAll()  // report what was suppressed
    }

    /// One scan pass: makes every active scan rule listen on exactly the ports whose target
    /// port is bound on its table's target side (the namespace for HOST, here for SPLICE).
    /// pestod's own listeners are not counted, so the two tables never forward to each other.
    /// A failed read of /proc leaves the rules as they are.
    public func scan() {
        for table in tables {
            let rules = table.activeScanRules
            guard !rules.isEmpty else { continue }
            let side = table.kind == .host ? namespace : nil
            for proto in TransportProtocol.allCases where rules.contains(where: { $0.rule.proto == proto }) {
                let read: Result<Void, Errno>
                if let side {
                    read = side.perform { scanner.boundPorts(proto, excludingInodes: ownInodes, into: &scannedPorts) }
                } else {
                    read = scanner.boundPorts(proto, excludingInodes: ownInodes, into: &scannedPorts)
                }
                guard case .success = read else { continue }
                for (id, rule) in rules where rule.proto == proto {
                    table.updateScan(id: id) { port in scannedPorts.contains(rule.targetPort(for: port)) }
                }
            }
        }
    }

    // MARK: Listeners

    /// Charges the listener to the budget and watches it; a failure of either undoes both and
    /// is the port's bind failure (EMFILE for the budget, epoll_ctl's errno for the watch).
    public func listenerOpened(fd: Int32, table: TableKind, ruleID: UInt32, rule: Rule, port: UInt16) -> Result<Void, Errno> {
        guard budget.takeListener() else { return .failure(.tooManyOpenFiles) }
        // A `source` "client" listener keeps the namespace's policy routing installed; failing
        // to install it is this port's bind failure, retried like any other.
        let transparent = rule.source == .client && table == .host ? hostSide.transparent : nil
        if let transparent, case .failure(let e) = transparent.retain() {
            budget.releaseListener()
            return .failure(e)
        }
        let kind = rule.proto == .tcp ? EngineEventKind.tcpListener : EngineEventKind.udpListener
        do {
            try loop.add(fd: fd, events: EventLoop.Events.readable, kind: kind)
        } catch {
            budget.releaseListener()
            transparent?.release()
            return .failure(error.underlyingError ?? Errno(rawValue: ENOMEM))
        }
        let target = ForwardTarget(
            table: table, ruleID: ruleID, proto: rule.proto, address: rule.targetAddress, port: rule.targetPort(for: port),
            proxyProtocol: rule.proxyProtocol, source: rule.source)
        if Int(fd) >= listeners.count {
            // Grown geometrically: descriptors usually arrive in ascending order, one at a time.
            listeners.append(contentsOf: repeatElement(nil, count: max(Int(fd) + 1, 2 * listeners.count, 64) - listeners.count))
        }
        // Inodes only matter to scans, and scans exist only with a namespace.
        var inode: UInt64 = 0
        if namespace != nil {
            // fstat of a descriptor we hold cannot fail but for a bug (EBADF traps in the funnel).
            if case .success(let st) = Sys.fstat(fd) { inode = UInt64(st.st_ino) }
            ownInodes.insert(inode)
        }
        listeners[Int(fd)] = ListenerEntry(
            target: target, inNamespace: table == .splice, address: rule.address, listenPort: port, inode: inode,
            shared: configuration.overlap == .firstMatch)
        let key = Self.ownPortKey(rule.proto, inNamespace: table == .splice, port: port)
        ownPorts.increment(key...key)
        conditions.clear(.forwardingLoop)  // the listeners changed: a loop, if any, is reported anew
        return .success(())
    }

    public func listenerClosed(fd: Int32) {
        guard Int(fd) < listeners.count, let entry = listeners[Int(fd)] else { return }
        if entry.target.proto == .udp { udp.listenerClosing(fd: fd) }
        loop.remove(fd: fd)
        if entry.target.source == .client && entry.target.table == .host { hostSide.transparent?.release() }
        if entry.paused { pausedListeners.removeAll { $0 == fd } }
        budget.releaseListener()
        listeners[Int(fd)] = nil
        if namespace != nil { ownInodes.remove(entry.inode) }
        let key = Self.ownPortKey(entry.target.proto, inNamespace: entry.inNamespace, port: entry.listenPort)
        ownPorts.decrement(key...key)
        conditions.clear(.forwardingLoop)
    }

    /// The `ownPorts` key of a protocol, side and port.
    private static func ownPortKey(_ proto: TransportProtocol, inNamespace: Bool, port: UInt16) -> UInt32 {
        (inNamespace ? 0x2_0000 : 0) | (proto == .tcp ? 0 : 0x1_0000) | UInt32(port)
    }

    /// A listener is readable: accept (TCP) or relay datagrams (UDP).
    public func handleEvent(_ events: UInt32, index: UInt32, fd: Int32) {
        guard Int(fd) < listeners.count, let entry = listeners[Int(fd)], !entry.paused else { return }
        switch entry.target.proto {
        case .tcp:
            if tcp.listenerReadable(fd: fd, target: entry.target, shared: entry.shared) == .exhausted { pause(fd) }
        case .udp:
            udp.listenerReadable(fd: fd, target: entry.target, shared: entry.shared)
        }
    }

    /// Stops watching a listener until capacity returns. The listener stays in epoll with
    /// no events (a listening TCP socket never reports HUP or ERR), so resuming needs no new
    /// watch and cannot fail for want of one; if even that fails it leaves epoll.
    private func pause(_ fd: Int32) {
        guard var entry = listeners[Int(fd)], !entry.paused else { return }
        entry.paused = true
        listeners[Int(fd)] = entry
        do throws(PestoError) {
            try loop.modify(fd: fd, events: 0, kind: EngineEventKind.tcpListener)
        } catch {
            loop.remove(fd: fd)
        }
        pausedListeners.append(fd)
        armResumeTimer()
    }

    private func armResumeTimer() {
        guard resumeTimer == nil else { return }
        resumeTimer = loop.after(milliseconds: configuration.pauseMilliseconds) { [unowned self] in
            self.resumeTimer = nil
            self.resumeListeners()
        }
    }

    /// Watches the paused listeners again; one that cannot be watched stays paused until the
    /// next try, `pauseMilliseconds` later.
    private func resumeListeners() {
        guard !pausedListeners.isEmpty else { return }
        var i = 0
        while i < pausedListeners.count {
            let fd = pausedListeners[i]
            guard var entry = listeners[Int(fd)], entry.paused else {
                pausedListeners.remove(at: i)
                continue
            }
            let kind = entry.target.proto == .tcp ? EngineEventKind.tcpListener : EngineEventKind.udpListener
            do throws(PestoError) {
                do throws(PestoError) {
                    try loop.modify(fd: fd, events: EventLoop.Events.readable, kind: kind)
                } catch {
                    try loop.add(fd: fd, events: EventLoop.Events.readable, kind: kind)
                }
            } catch {
                i += 1
                armResumeTimer()
                continue
            }
            entry.paused = false
            listeners[Int(fd)] = entry
            pausedListeners.remove(at: i)
        }
    }

    // MARK: RelayContext

    /// First match: asks the table that opened the shared listener `listener`; nil on a
    /// listener that is not shared (never asked under `refuse`).
    public func firstMatchTarget(listener: Int32, localAddress: () -> IPAddress?) -> ForwardTarget? {
        guard configuration.overlap == .firstMatch else { return nil }
        return listenerTable(listener)?.firstMatchTarget(listener: listener, localAddress: localAddress)
    }

    /// A relayed connection closed: the paused listeners are watched again.
    public func relayCapacityAvailable() { resumeListeners() }

    /// `wouldLoop`, reporting a loop (once until the listeners change).
    public func refusesLoop(_ target: ForwardTarget, to destination: SocketAddress) -> Bool {
        guard wouldLoop(target, destination) else { return false }
        conditions.occurred(
            .forwardingLoop,
            detail:
                "\(target.table.name) rule \(target.ruleID) forwards \(target.proto) to \(destination.endpoint.map { "\($0.address) port \($0.port)" } ?? "?"), one of pestod's own "
                + "listeners: connections and datagrams to it are refused")
        return true
    }

    /// True when `destination` is one of pestod's own listeners on the target's side, so
    /// forwarding there would loop through pestod forever.
    func wouldLoop(_ target: ForwardTarget, _ destination: SocketAddress) -> Bool {
        guard let (address, port) = destination.endpoint else { return false }
        let targetInNamespace = target.table == .host && namespace != nil
        guard ownPorts.count(Self.ownPortKey(target.proto, inNamespace: targetInNamespace, port: port)) != 0 else { return false }
        // A listener of ours uses that port on that side: does its address cover the destination?
        return listeners.contains { entry in
            guard let entry, entry.target.proto == target.proto, entry.inNamespace == targetInNamespace,
                entry.listenPort == port
            else { return false }
            guard let listenAddress = entry.address else { return true }
            return listenAddress == address || (listenAddress.isUnspecified && listenAddress.family == address.family)
        }
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
        guard case .success(let fd) = Sys.socket(domain: domain, type: Int32(SOCK_STREAM.rawValue)) else { return false }
        Sys.close(fd)
        return true
    }

    private static func sysctlIsOne(_ path: String) -> Bool {
        readFile(path, limit: 4096)?.first == UInt8(ascii: "1")
    }
}

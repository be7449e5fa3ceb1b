// SPDX-License-Identifier: GPL-2.0-or-later

// DescriptorBudget: how many descriptors the engine's listeners and relays may hold, so that
// running out of them never takes D-Bus, the control socket or state saving down with it.
//
// Theory of operation
// -------------------
// With L = the soft RLIMIT_NOFILE (pestod raises it to the hard limit at start):
//
//   core reserve      C = 64             never used by the engine: stdio, the epoll fd and
//                                        eventfd, the D-Bus connection, the control socket and
//                                        its client, the state file and its directory while
//                                        saving, namespace switches, scans of /proc, polkit
//   engine limit      E = L − C          listeners + relay descriptors together
//   listener headroom H = min(E / 8, 1024)
//                                        relays never use it, so Activate, bind retries and
//                                        scans find descriptors while relays hold all theirs
//   relay limit       R = E − H          TCP connections and UDP flows together
//   share             S = min(R, E − listeners) / 2
//                                        the most each protocol's relays may hold: R / 2 while
//                                        the listeners fit in H; listeners beyond H take from
//                                        both shares alike
//
// Charges: a listener 1; a UDP flow 1 (its socket); a TCP connection 6 — its two sockets and
// a pipe (two descriptors) for each direction. A connection holds its pipes only while bytes
// are in flight, but it may need both at any moment, and refusing it one would reset a
// connection that was admitted; so they are charged with it. Empty pipes parked for reuse
// beyond two per connection are charged to TCP's share as spares while it has room, and
// closed to make room for a new connection, so what the TCP relay really holds never exceeds
// its charge. A new connection or flow is admitted while its protocol stays within S:
// the TCP client is reset, the UDP datagram dropped, and the observer hears of it once per
// episode. A flood of one protocol therefore never takes the other's share, and a new
// connection on any rule is relayed while TCP is within its share. A listener is refused (a
// bind failure with EMFILE, counted and retried like any other) when everything held would
// pass E. Connections and flows handed over by a takeover were admitted once already: they
// may use anything up to E.
//
// Default relay limits follow from S:
//   --max-connections = max(1, S / 6)
//   --max-udp-flows   = max(1, S)
//
// All of it runs on the loop thread; nothing here allocates.

import PestoModel
import PestoSystem

#if canImport(Glibc)
    import Glibc
#endif

/// The descriptor plan of one pestod, derived from its open-file limit.
public struct DescriptorPlan: Equatable, Sendable {
    /// Descriptors kept for pestod's own needs, never used by the engine.
    public static let coreReserve = 64
    /// Descriptors of one pipe: its two ends.
    public static let perPipe = 2
    /// Descriptors charged to one TCP connection: its two sockets and a pipe for each direction.
    public static let perConnection = 2 + 2 * perPipe
    /// The most descriptors kept for listeners.
    public static let maxListenerHeadroom = 1024
    /// Descriptors charged to one UDP flow: its socket.
    public static let perFlow = 1

    /// Descriptors charged to one connection or flow of `proto`.
    public static func charge(_ proto: TransportProtocol) -> Int { proto == .tcp ? perConnection : perFlow }

    /// The soft RLIMIT_NOFILE the plan is for (L).
    public var openFileLimit: Int
    /// Listeners and relays together (E = L − C, at least 0).
    public var engineLimit: Int { max(0, openFileLimit - Self.coreReserve) }
    /// Kept for listeners: new connections and flows never use it (H = min(E / 8, 1024)).
    public var listenerHeadroom: Int { min(engineLimit / 8, Self.maxListenerHeadroom) }
    /// What relays may hold together (R = E − H).
    public var relayLimit: Int { engineLimit - listenerHeadroom }
    /// What each protocol's relays may hold while the listeners fit in the headroom (S = R / 2).
    public var share: Int { relayLimit / 2 }
    /// The default `--max-connections`: the TCP share at six descriptors each.
    public var defaultMaxConnections: Int { min(1 << 24, max(1, share / Self.perConnection)) }
    /// The default `--max-udp-flows`: the UDP share at one descriptor each.
    public var defaultMaxFlows: Int { min(1 << 24, max(1, share / Self.perFlow)) }

    /// The plan for an open-file limit of `openFileLimit` descriptors.
    public init(openFileLimit: Int) {
        self.openFileLimit = max(0, openFileLimit)
    }

    /// The plan for this process's soft RLIMIT_NOFILE.
    public static var current: DescriptorPlan {
        guard case .success(let limit) = Sys.openFileLimit() else { return DescriptorPlan(openFileLimit: 1024) }
        return DescriptorPlan(openFileLimit: Int(min(UInt64(limit.rlim_cur), UInt64(Int32.max))))
    }

    /// Raises this process's soft RLIMIT_NOFILE to its hard limit.
    /// - Returns: the soft limit before and after (equal when it was already at the hard limit).
    public static func raiseOpenFileLimit() -> Result<(before: UInt64, after: UInt64), Errno> {
        Sys.openFileLimit().flatMap { limit in
            let before = UInt64(limit.rlim_cur)
            guard limit.rlim_cur < limit.rlim_max else { return .success((before, before)) }
            var raised = limit
            raised.rlim_cur = limit.rlim_max
            return Sys.setOpenFileLimit(raised).map { (before, UInt64(raised.rlim_cur)) }
        }
    }
}

/// Counts the descriptors the engine holds against its `DescriptorPlan`; loop thread only.
///
/// See the theory of operation at the top of DescriptorBudget.swift.
public final class DescriptorBudget {
    /// Most descriptors listeners and relays may hold together (E).
    public let engineLimit: Int
    /// Most descriptors relays may hold together (R).
    public let relayLimit: Int
    /// Descriptors held by listeners.
    public private(set) var listeners = 0
    /// Descriptors charged to TCP connections.
    public private(set) var tcp = 0
    /// Descriptors charged to UDP flows.
    public private(set) var udp = 0
    /// Connections and flows refused for want of descriptors.
    public private(set) var refused: UInt64 = 0
    /// Told of the first refusal of each episode of a protocol (an episode ends at that
    /// protocol's next admission), at most once per `reportIntervalNanoseconds` per protocol.
    public var onExhausted: ((TransportProtocol) -> Void)?
    /// Per protocol (TCP, UDP): refusals since the last admission were reported.
    private var reportedEpisode = (false, false)
    private var lastReport: (MonotonicInstant?, MonotonicInstant?) = (nil, nil)
    /// The least time between two reports of exhaustion.
    static let reportIntervalNanoseconds: UInt64 = 10_000_000_000

    /// A budget following `plan`.
    public convenience init(plan: DescriptorPlan) {
        self.init(engineLimit: plan.engineLimit, relayLimit: plan.relayLimit)
    }

    /// A budget with explicit limits (`relayLimit` ≤ `engineLimit`).
    public init(engineLimit: Int, relayLimit: Int) {
        precondition(relayLimit <= engineLimit, "relay limit \(relayLimit) above engine limit \(engineLimit)")
        self.engineLimit = engineLimit
        self.relayLimit = relayLimit
    }

    /// Descriptors held now, as charged: listeners and relays.
    public var held: Int { listeners + tcp + udp }

    /// What each protocol's relays may hold now (S): half of what the listeners leave of R.
    public var share: Int { min(relayLimit, engineLimit - listeners) / 2 }

    /// Descriptors charged to `proto`'s relays.
    public func held(by proto: TransportProtocol) -> Int { proto == .tcp ? tcp : udp }

    /// Charges a listener; false when the engine limit is reached.
    func takeListener() -> Bool {
        guard held < engineLimit else { return false }
        listeners += 1
        return true
    }

    /// Gives back a listener's descriptor.
    func releaseListener() {
        listeners -= 1
        precondition(listeners >= 0, "descriptor budget released more listeners than it charged")
    }

    /// True when a new connection or flow of `proto` would stay within its share.
    func fits(_ proto: TransportProtocol) -> Bool { held(by: proto) + DescriptorPlan.charge(proto) <= share }

    /// Charges a new connection or flow of `proto`; false (counted, reported once per
    /// episode) when that would take its protocol past its share.
    func admit(_ proto: TransportProtocol) -> Bool {
        let charge = DescriptorPlan.charge(proto)
        guard fits(proto) else {
            refused &+= 1
            noteRefusal(proto)
            return false
        }
        add(charge, to: proto)
        if proto == .tcp { reportedEpisode.0 = false } else { reportedEpisode.1 = false }
        return true
    }

    /// Reports the first refusal of an episode of `proto`, unless one was reported less than
    /// `reportIntervalNanoseconds` ago.
    private func noteRefusal(_ proto: TransportProtocol) {
        let reported = proto == .tcp ? reportedEpisode.0 : reportedEpisode.1
        guard !reported else { return }
        if proto == .tcp { reportedEpisode.0 = true } else { reportedEpisode.1 = true }
        let now = MonotonicInstant.now
        let last = proto == .tcp ? lastReport.0 : lastReport.1
        if last.map({ now.nanoseconds &- $0.nanoseconds >= Self.reportIntervalNanoseconds }) ?? true {
            if proto == .tcp { lastReport.0 = now } else { lastReport.1 = now }
            onExhausted?(proto)
        }
    }

    /// Charges a connection or flow of `proto` handed over by the pestod this one takes over
    /// from (RelayHandover.swift): admitted there already, it may use anything up to the
    /// engine limit; false when that would pass it.
    func adopt(_ proto: TransportProtocol) -> Bool {
        let charge = DescriptorPlan.charge(proto)
        guard held + charge <= engineLimit else { return false }
        add(charge, to: proto)
        return true
    }

    /// Charges a spare pipe (an empty one kept for reuse beyond two per connection) to TCP's
    /// share; false when it has no room.
    func takeSparePipe() -> Bool {
        guard tcp + DescriptorPlan.perPipe <= share else { return false }
        tcp += DescriptorPlan.perPipe
        return true
    }

    /// Gives back the charge of a spare pipe.
    func releaseSparePipe() {
        tcp -= DescriptorPlan.perPipe
        precondition(tcp >= 0, "descriptor budget released more spare pipes than it charged")
    }

    /// Gives back the charge of a connection or flow of `proto`.
    func release(_ proto: TransportProtocol) {
        add(-DescriptorPlan.charge(proto), to: proto)
        precondition(tcp >= 0 && udp >= 0, "descriptor budget released more \(proto) than it charged")
    }

    private func add(_ count: Int, to proto: TransportProtocol) {
        if proto == .tcp { tcp += count } else { udp += count }
    }
}

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
//                                        new connections and flows never use it, so Activate,
//                                        bind retries and scans find descriptors while relays
//                                        hold all theirs
//   relay limit       R = E − H          TCP connections and UDP flows (with the listeners
//                                        already open, which take from it first)
//
// Every descriptor the engine holds is counted here (`held`): one per listener, one per UDP
// flow, two per TCP connection (its sockets) and two per pipe, in use or parked in the TCP
// relay's pool. A listener is refused (a bind failure with EMFILE, counted and retried like
// any other) when `held` would pass E; a new connection or flow is refused when `held` would
// pass R: the TCP client is reset, the UDP datagram dropped, and the observer hears of it once
// per episode. A pipe for a connection already relayed may pass R up to E — it is held only
// while bytes are in flight, and refusing it would reset a connection that was admitted — and
// is closed rather than parked while `held` is above R, so at rest the headroom is free.
//
// Default relay limits follow from R, half of it for each protocol:
//   --max-connections = max(1, R / 4)    (R/2 descriptors at 2 per connection)
//   --max-udp-flows   = max(1, R / 2)    (R/2 descriptors at 1 per flow)
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
    /// Descriptors charged to one TCP connection: its two sockets (pipes are charged apart).
    public static let perConnection = 2
    /// Descriptors charged to one pipe: its two ends.
    public static let perPipe = 2
    /// The most descriptors kept for listeners.
    public static let maxListenerHeadroom = 1024
    /// Descriptors charged to one UDP flow: its socket.
    public static let perFlow = 1

    /// The soft RLIMIT_NOFILE the plan is for (L).
    public var openFileLimit: Int
    /// Listeners and relays together (E = L − C, at least 0).
    public var engineLimit: Int { max(0, openFileLimit - Self.coreReserve) }
    /// Kept for listeners: new connections and flows never use it (H = min(E / 8, 1024)).
    public var listenerHeadroom: Int { min(engineLimit / 8, Self.maxListenerHeadroom) }
    /// Listeners and relays, as far as relays may take (R = E − H).
    public var relayLimit: Int { engineLimit - listenerHeadroom }
    /// The default `--max-connections`: half of R at two descriptors each.
    public var defaultMaxConnections: Int { min(1 << 24, max(1, relayLimit / (2 * Self.perConnection))) }
    /// The default `--max-udp-flows`: half of R at one descriptor each.
    public var defaultMaxFlows: Int { min(1 << 24, max(1, relayLimit / (2 * Self.perFlow))) }

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
    /// Most descriptors held after admitting a connection or flow (R).
    public let relayLimit: Int
    /// Descriptors held now, as charged.
    public private(set) var held = 0
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

    /// Charges a listener; false when the engine limit is reached.
    func takeListener() -> Bool {
        guard held < engineLimit else { return false }
        held += 1
        return true
    }

    /// Charges `count` descriptors of a new connection or flow; false (counted, reported once
    /// per episode) when that would pass the relay limit.
    func admit(_ count: Int, for proto: TransportProtocol) -> Bool {
        guard held + count <= relayLimit else {
            refused &+= 1
            let reported = proto == .tcp ? reportedEpisode.0 : reportedEpisode.1
            if !reported {
                if proto == .tcp { reportedEpisode.0 = true } else { reportedEpisode.1 = true }
                let now = MonotonicInstant.now
                let last = proto == .tcp ? lastReport.0 : lastReport.1
                if last.map({ now.nanoseconds &- $0.nanoseconds >= Self.reportIntervalNanoseconds }) ?? true {
                    if proto == .tcp { lastReport.0 = now } else { lastReport.1 = now }
                    onExhausted?(proto)
                }
            }
            return false
        }
        held += count
        if proto == .tcp { reportedEpisode.0 = false } else { reportedEpisode.1 = false }
        return true
    }

    /// Charges a pipe for a connection already admitted; false when that would pass the
    /// engine limit (the connection then ends, as it would at EMFILE).
    func takePipe() -> Bool {
        guard held + DescriptorPlan.perPipe <= engineLimit else { return false }
        held += DescriptorPlan.perPipe
        return true
    }

    /// Charges `count` descriptors of a connection or flow handed over by the pestod this one
    /// takes over from (RelayHandover.swift): admitted there already, it may use the
    /// listeners' headroom, as a pipe may; false when that would pass the engine limit.
    func adopt(_ count: Int) -> Bool {
        guard held + count <= engineLimit else { return false }
        held += count
        return true
    }

    /// True while relays are within their limit: an idle pipe may then be kept for reuse.
    var mayKeepIdlePipe: Bool { held <= relayLimit }

    /// Gives back `count` descriptors.
    func release(_ count: Int) {
        held -= count
        precondition(held >= 0, "descriptor budget released more than it charged")
    }
}

// SPDX-License-Identifier: GPL-2.0-or-later

// DataPathConditions: conditions of the data path that recur once per connection or
// datagram, reported once.
//
// Theory of operation: a forwarding loop, a full UDP flow table or a deleted target
// namespace affects every connection or datagram that arrives while it lasts. Reporting
// each one would let any peer that can reach a relayed port flood the log. So each
// condition is reported to the observer once when it starts (`started`, with a detail
// built only then) and once when it clears (`cleared`, with how many occurrences were not
// reported in between). Recording an occurrence while a condition lasts is an increment:
// nothing is allocated on the data path.

import PestoModel
import PestoSystem

/// A recurring condition of the data path.
public enum DataPathCondition: Int, Sendable, CaseIterable, CustomStringConvertible {
    /// A connection or flow would go to one of pestod's own listeners; it is refused.
    case forwardingLoop
    /// A datagram from a new client found the UDP flow table full; it is dropped.
    case udpFlowTableFull
    /// The target network namespace's path is gone (`ip netns del`, the process exited);
    /// pestod's descriptor keeps the namespace itself alive, and connections still go there.
    case namespaceDeleted
    /// A `source` "client" connection or flow could not be made from its client's address
    /// (taken in the namespace: EADDRINUSE); it is reset or dropped.
    case transparentSourceFailed

    /// What an occurrence is, for the `cleared` report.
    public var description: String {
        switch self {
        case .forwardingLoop: return "forwarding loop"
        case .udpFlowTableFull: return "UDP flow table full"
        case .namespaceDeleted: return "target network namespace deleted"
        case .transparentSourceFailed: return "connection from the client's address failed"
        }
    }
}

/// A report about a recurring condition.
public enum DataPathNotice: Sendable, Equatable {
    /// The condition started; `detail` describes its first occurrence.
    case started(DataPathCondition, detail: String)
    /// The condition ended (or the engine stopped); `suppressed` occurrences came after the
    /// first and were not reported one by one.
    case cleared(DataPathCondition, suppressed: UInt64)
}

/// Tracks the recurring conditions of one engine; belongs to the loop thread.
public final class DataPathConditions {
    /// Receives each start and end of a condition.
    public var observer: ((DataPathNotice) -> Void)?
    private var active = [Bool](repeating: false, count: DataPathCondition.allCases.count)
    private var suppressed = [UInt64](repeating: 0, count: DataPathCondition.allCases.count)

    public init() {}

    /// Records one occurrence: reports the condition if it starts now, else counts it.
    public func occurred(_ condition: DataPathCondition, detail: @autoclosure () -> String) {
        let i = condition.rawValue
        if active[i] {
            suppressed[i] &+= 1
            return
        }
        active[i] = true
        suppressed[i] = 0
        observer?(.started(condition, detail: detail()))
    }

    /// Ends `condition` if it is going on, reporting how many occurrences were suppressed.
    public func clear(_ condition: DataPathCondition) {
        let i = condition.rawValue
        guard active[i] else { return }
        active[i] = false
        observer?(.cleared(condition, suppressed: suppressed[i]))
        suppressed[i] = 0
    }

    /// Ends every condition (the engine stops).
    public func clearAll() {
        for c in DataPathCondition.allCases { clear(c) }
    }
}

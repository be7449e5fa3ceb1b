// SPDX-License-Identifier: GPL-2.0-or-later

// Conflict: when two rules may not be active at the same time.
//
// Two rules conflict when they could claim the same packet: same protocol, overlapping
// listening port ranges, addresses that match, and interfaces that the kernel would let
// collide. Addresses match when either rule is dual stack (it listens everywhere), or both
// are of one family and either is that family's wildcard or both are equal. Interfaces
// collide unless both rules name an interface and the names differ: the kernel itself lets
// sockets bound to different devices share a port (inet_csk_bind_conflict), so such rules
// can both be served. Scan rules count with their whole range, since they may listen on
// any port of it.

extension Rule {
    /// True when this rule and `other` may not both be active.
    public func conflicts(with other: Rule) -> Bool {
        guard proto == other.proto else { return false }
        guard firstPort <= other.lastPort && other.firstPort <= lastPort else { return false }
        if !interface.isEmpty && !other.interface.isEmpty && interface != other.interface { return false }
        switch (address, other.address) {
        case (nil, _), (_, nil):
            return true
        case (let a?, let b?):
            guard a.family == b.family else { return false }
            return a.isUnspecified || b.isUnspecified || a == b
        }
    }
}

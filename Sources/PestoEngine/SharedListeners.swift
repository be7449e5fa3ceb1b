// SPDX-License-Identifier: GPL-2.0-or-later

// SharedListeners: the listening sockets of a first-match table (doc/overlap.md), each
// shared by every active rule it serves, and who wins what arrives on it.
//
// Theory of operation
// -------------------
// With `OverlapPolicy.firstMatch`, a listening socket belongs to no rule. It is keyed by a
// *group* (protocol, port, interface) and a *binding* within it (dual stack, a family's
// wildcard, or one address). A rule needs, for each port it serves, a socket of its group
// whose binding *covers* its own: the dual socket covers everything, a wildcard covers its
// family, an address only itself. Two sockets of one group never cover each other: the
// kernel would refuse the second bind (a wildcard and an address of its family on one
// port), so the table binds the wider one in place of the narrower ones (ForwardingTable).
// A socket's `users` are the active rules it serves on its port, in ascending ID order; it
// is closed when the last one leaves, and never before, so rules that come and go on a port
// another rule keeps never disturb its socket.
//
// Dispatch: a connection or flow arriving on a socket goes to the first user, in ID order,
// whose binding matches the local address it arrived at (`ListenBinding.matches`). A user
// *wins* the port when some local address reaches it: not every family of its binding is
// covered by lower users (`winners`). The table keeps each rule's count of won ports.
//
// Rules naming different interfaces never share a socket; a rule naming an interface and
// one naming none collide in the kernel (SO_BINDTODEVICE does not separate them from an
// unbound socket), and the later bind is that port's bind failure, retried like any other.

import PestoModel

/// What a listening socket is bound to within its group: the address part of its key.
enum ListenBinding: Hashable {
    /// No address: every address of both families (or of the one enabled).
    case dual
    /// One family's wildcard address.
    case wildcard(AddressFamily)
    /// One address.
    case exact(IPAddress)

    /// The binding of a rule with listening address `address`.
    init(_ address: IPAddress?) {
        switch address {
        case nil: self = .dual
        case let a? where a.isUnspecified: self = .wildcard(a.family)
        case let a?: self = .exact(a)
        }
    }

    /// True when a socket bound so receives everything one bound to `other` would.
    func covers(_ other: ListenBinding) -> Bool {
        switch (self, other) {
        case (.dual, _): return true
        case (.wildcard(let f), .wildcard(let g)): return f == g
        case (.wildcard(let f), .exact(let a)): return a.family == f
        case (.exact(let a), .exact(let b)): return a == b
        default: return false
        }
    }

    /// True when this binding covers the part of `other` in family `family` (one of
    /// `other`'s families).
    func covers(_ other: ListenBinding, in family: AddressFamily) -> Bool {
        switch self {
        case .dual: return true
        case .wildcard(let f): return f == family
        case .exact: return self == other
        }
    }

    /// The address families the binding receives.
    var families: [AddressFamily] {
        switch self {
        case .dual: return [.ipv4, .ipv6]
        case .wildcard(let f): return [f]
        case .exact(let a): return [a.family]
        }
    }

    /// True when a connection or datagram that arrived at `local` is this binding's; with no
    /// local address known, every binding matches.
    func matches(_ local: IPAddress?) -> Bool {
        guard let local else { return true }
        switch self {
        case .dual: return true
        case .wildcard(let f): return local.family == f
        case .exact(let a): return local == a
        }
    }
}

/// The sockets of one protocol, port and interface: bindings there may collide.
struct ListenGroup: Hashable {
    var proto: TransportProtocol
    var port: UInt16
    var interface: String

    /// The group of port `port` of `rule`.
    init(_ rule: Rule, port: UInt16) {
        (proto, self.port, interface) = (rule.proto, port, rule.interface)
    }
}

/// One shared listening socket.
struct SharedSocket {
    var fd: Int32
    var group: ListenGroup
    var binding: ListenBinding
    /// The rule it was opened for, and its ID: what it is opened with again, if it must be.
    var opener: Rule
    var openerID: UInt32
    /// The active rules it serves on its port, ascending.
    var users: [UInt32] = []
}

/// Every shared socket of a table, by descriptor and by group (see the theory above).
struct SharedListeners {
    /// The sockets, by descriptor.
    private(set) var sockets: [Int32: SharedSocket] = [:]
    /// The descriptors of each group with a socket (a group holds one or a few).
    private var groups: [ListenGroup: [Int32]] = [:]

    /// Number of open sockets.
    var count: Int { sockets.count }

    /// The socket of `group` that covers `binding`, if one is open.
    func covering(_ group: ListenGroup, _ binding: ListenBinding) -> Int32? {
        groups[group]?.first { sockets[$0]!.binding.covers(binding) }
    }

    /// The sockets of `group` that `binding` covers (none of them covers it).
    func covered(by binding: ListenBinding, in group: ListenGroup) -> [Int32] {
        groups[group]?.filter { binding.covers(sockets[$0]!.binding) } ?? []
    }

    /// Records a new socket.
    mutating func insert(_ socket: SharedSocket) {
        precondition(sockets[socket.fd] == nil, "shared socket \(socket.fd) recorded twice")
        sockets[socket.fd] = socket
        groups[socket.group, default: []].append(socket.fd)
    }

    /// Forgets socket `fd` (which the caller closes) and returns it.
    @discardableResult
    mutating func remove(_ fd: Int32) -> SharedSocket {
        let socket = sockets.removeValue(forKey: fd)!
        groups[socket.group]!.removeAll { $0 == fd }
        if groups[socket.group]!.isEmpty { groups[socket.group] = nil }
        return socket
    }

    /// Replaces the users of socket `fd`.
    mutating func setUsers(_ fd: Int32, _ users: [UInt32]) { sockets[fd]!.users = users }

    /// The users that win the socket's port, given each user's binding: those with a family
    /// no lower user covers. `users` is in ascending ID order.
    static func winners(_ users: [UInt32], binding: (UInt32) -> ListenBinding) -> [UInt32] {
        guard users.count > 1 else { return users }
        var won: [UInt32] = []
        var lower: [ListenBinding] = []
        for u in users {
            let b = binding(u)
            if b.families.contains(where: { f in !lower.contains { $0.covers(b, in: f) } }) { won.append(u) }
            lower.append(b)
        }
        return won
    }
}

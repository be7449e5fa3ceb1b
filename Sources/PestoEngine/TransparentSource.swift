// SPDX-License-Identifier: GPL-2.0-or-later

// TransparentSource: connecting into the target namespace from the client's own address
// (rule key `source` "client"), and the policy routing there that brings the replies back.
//
// Theory of operation
// -------------------
// pestod makes the target-side socket of a `source` "client" connection inside the
// namespace it was given, sets IP_TRANSPARENT (IPV6_TRANSPARENT), which lets it bind an
// address that is not the namespace's, binds it to the client's address and port, marks it
// with SO_MARK `mark`, and connects to the target. The target (a server of the namespace)
// sees the client's address. Its replies go to that address, which the namespace would route
// away (out of an interface, or nowhere); they must instead be delivered locally, to
// pestod's socket. pestod installs, in that namespace only:
//
//   ip rule add fwmark 0x7065 lookup 28773 pref 28773           (and ip -6 rule)
//   ip route add local 0.0.0.0/0 dev lo table 28773             (and local ::/0)
//   sysctl net.ipv4.tcp_fwmark_accept=1                          (covers IPv6 too)
//
// With tcp_fwmark_accept, a TCP socket the server accepts takes the mark of the SYN that
// opened it (the mark of pestod's socket: marks survive the loopback), and so do its SYN-ACK
// and everything it sends on that connection: exactly the replies to pestod's connections
// are routed by table 28773, whose one route delivers everything locally. Replies of the
// same server to clients that reach it by another path carry no mark and are routed as
// before (the caveat of a rule matching the server's port). pestod's own marked packets to
// its target match the `local` table first (priority 0), so the target must be an address of
// the namespace itself (its loopback or an interface's address), which the HOST table's
// default target is.
//
// The routing is installed (rtnetlink, RouteNetlink.swift, from a socket opened inside the
// namespace) when the first user appears — a listener of a `client` rule, or a relayed
// connection that still uses it — and removed when the last one goes, and when the engine
// is released at exit. Installing is idempotent: a rule is added exclusively (EEXIST, left by
// a killed pestod or installed by the pestod being taken over, is success: it is not
// duplicated) and a route replaced. A pestod that hands over to another (--replace) exits
// without releasing, so the routing stays for its successor. tcp_fwmark_accept is set to 1
// and back to 0 only if pestod found it 0.
//
// UDP has no such reflection: a server's replies from an unconnected socket carry its own
// mark (none). So UDP flows are routed by address: while a flow of client address C exists,
// table 28774 holds `local C dev lo` (one route per address, counted by flows), and
//
//   ip rule add iif lo ipproto udp lookup 28774 pref 28774      (and ip -6 rule)
//
// sends the namespace's own UDP (iif lo: locally generated) to those addresses, and only
// those (a lookup that finds no route in the table goes on to the next rule), back to
// pestod's flow sockets. pestod's flow socket is connected to the target, so a reply must
// come from the target's address: a server bound to it, or one that replies from the address
// a datagram came to (IP_PKTINFO), always does; for a server bound to no address the route
// names the target of the address's first flow as the preferred source (`src`), so it
// replies from there too (a client address with flows to two target addresses at once gets
// the right replies from such a server for the first only). The caveat: while C has a transparent flow, UDP sent from inside the
// namespace to C by another path (C reaching a server of the namespace directly as well) is
// delivered locally and lost. The routes are added and deleted as flows of new addresses
// come and the last flow of an address goes (one rtnetlink request each, on a socket kept
// open while the routing is installed); leftovers of a killed pestod are harmless until an
// address is used again, when the route is replaced.

import CPestoSys
import PestoModel
import PestoSystem

#if canImport(Glibc)
    import Glibc
#endif

/// The policy routing of transparent source in one namespace, installed while used.
public final class TransparentSource {
    /// The mark of pestod's transparent sockets (SO_MARK), and of the replies to them.
    public static let mark: UInt32 = 0x7065
    /// The routing table and rule priority of those replies.
    public static let table: UInt32 = 28773
    public static let priority: UInt32 = 28773
    /// The sysctl that gives an accepted TCP socket the mark of its SYN.
    static let fwmarkAcceptPath = "/proc/sys/net/ipv4/tcp_fwmark_accept"

    /// The rules pestod installs, IPv4 and IPv6.
    public static let rules: [RoutingRule] = [AF_INET, AF_INET6].map {
        RoutingRule(family: $0, priority: priority, table: table, mark: mark)
    }
    /// The routes pestod installs: everything local, in its table.
    public static let routes: [LocalRoute] = [LocalRoute.all(.ipv4, table: table), LocalRoute.all(.ipv6, table: table)]
    /// The table of UDP clients' addresses, and its rule's priority.
    public static let udpTable: UInt32 = 28774
    public static let udpPriority: UInt32 = 28774
    /// The rules that send the namespace's own UDP to the clients' addresses of `udpTable`.
    public static let udpRules: [RoutingRule] = [AF_INET, AF_INET6].map {
        RoutingRule(family: $0, priority: udpPriority, table: udpTable, inputInterface: "lo", ipProtocol: UInt8(IPPROTO_UDP))
    }

    private let namespace: NetworkNamespace
    /// Listeners and connections using the routing now.
    public private(set) var users = 0
    /// Whether the routing is installed.
    public private(set) var installed = false
    /// Whether pestod set tcp_fwmark_accept (it was 0), so removal sets it back.
    private var setFwmarkAccept = false
    /// The namespace's rtnetlink socket, open while the routing is installed.
    private var netlink: RouteNetlink?
    /// UDP flows per client address, each address with its route in `udpTable`.
    private var udpAddresses: [IPAddress: Int] = [:]

    public init(namespace: NetworkNamespace) { self.namespace = namespace }

    deinit { if installed { remove() } }

    /// One more user; installs the routing for the first. A failure (the namespace refuses,
    /// EPERM) counts no user.
    public func retain() -> Result<Void, Errno> {
        if users == 0, !installed, case .failure(let e) = install() {
            remove()  // what was installed before the failure
            return .failure(e)
        }
        users += 1
        return .success(())
    }

    /// One user less; removes the routing after the last.
    public func release() {
        precondition(users > 0, "transparent source released more often than retained")
        users -= 1
        if users == 0 && installed { remove() }
    }

    /// One more UDP flow from `client` to `target`: a use of the routing, and the address's
    /// route for the first flow of that address (with `target` as its preferred source).
    public func retainFlow(client: IPAddress, target: IPAddress) -> Result<Void, Errno> {
        if case .failure(let e) = retain() { return .failure(e) }
        if let n = udpAddresses[client] {
            udpAddresses[client] = n + 1
            return .success(())
        }
        guard let netlink else { preconditionFailure("transparent source in use without its netlink socket") }
        if case .failure(let e) = netlink.request(Self.udpRoute(client, source: target), add: true) {
            release()
            return .failure(e)
        }
        udpAddresses[client] = 1
        return .success(())
    }

    /// One UDP flow from `client` less; the address's route goes with its last flow.
    public func releaseFlow(client: IPAddress) {
        guard let n = udpAddresses[client] else { preconditionFailure("UDP flow of \(client) released but never retained") }
        if n > 1 {
            udpAddresses[client] = n - 1
        } else {
            udpAddresses[client] = nil
            _ = netlink?.request(Self.udpRoute(client), add: false)  // ENOENT: already gone; nothing else to do
        }
        release()
    }

    /// The route of one UDP client's address; `source`, the target of its first flow, is
    /// where a server bound to no address replies from (see the theory of operation).
    static func udpRoute(_ client: IPAddress, source: IPAddress? = nil) -> LocalRoute {
        LocalRoute(destination: client, prefixLength: client.family == .ipv4 ? 32 : 128, table: udpTable, preferredSource: source)
    }

    /// Installs the rules, the routes and the sysctl inside the namespace.
    private func install() -> Result<Void, Errno> {
        namespace.perform { () -> Result<Void, Errno> in
            let netlink: RouteNetlink
            do throws(PestoError) { netlink = try RouteNetlink() } catch {
                return .failure(error.underlyingError ?? Errno(rawValue: EPROTO))
            }
            self.netlink = netlink
            for route in Self.routes {
                if case .failure(let e) = netlink.request(route, add: true) { return .failure(e) }
            }
            for rule in Self.rules + Self.udpRules {
                switch netlink.request(rule, add: true) {
                case .success, .failure(Errno(rawValue: EEXIST)): break
                case .failure(let e): return .failure(e)
                }
            }
            if Self.readFlag(Self.fwmarkAcceptPath) == false {
                guard Self.writeFlag(Self.fwmarkAcceptPath, true) else { return .failure(Errno(rawValue: EACCES)) }
                setFwmarkAccept = true
            }
            installed = true
            return .success(())
        }
    }

    /// Removes what `install` made, or the part it made before failing (a part already gone
    /// is fine). Called outside `namespace.perform`.
    private func remove() {
        namespace.perform {
            if let netlink {
                // Identical copies someone else added are deleted too (at most a few).
                for rule in Self.rules + Self.udpRules {
                    for _ in 0..<8 { if case .failure = netlink.request(rule, add: false) { break } }
                }
                for route in Self.routes { _ = netlink.request(route, add: false) }  // ENOENT: already gone
                for client in udpAddresses.keys { _ = netlink.request(Self.udpRoute(client), add: false) }
            }
            if setFwmarkAccept { _ = Self.writeFlag(Self.fwmarkAcceptPath, false) }
        }
        netlink = nil
        udpAddresses.removeAll()
        setFwmarkAccept = false
        installed = false
    }

    /// Makes `fd` (a socket of the namespace, of `client`'s family) transparent, marked, and
    /// bound to `client`: IP_TRANSPARENT or IPV6_TRANSPARENT, SO_MARK, SO_REUSEADDR (a
    /// TIME_WAIT of the client's previous connection from that port does not block it).
    /// - Returns: bind's errno on failure: EADDRINUSE when a socket of the namespace holds the
    ///   client's address and port.
    public static func prepare(_ fd: Int32, client: SocketAddress) -> Result<Void, Errno> {
        let v6 = client.family == AF_INET6
        let level = v6 ? Int32(IPPROTO_IPV6) : Int32(IPPROTO_IP)
        let name = Int32(v6 ? PESTO_IPV6_TRANSPARENT : PESTO_IP_TRANSPARENT)
        if case .failure(let e) = Sys.setOption(fd, level: level, name: name, value: 1) { return .failure(e) }
        if case .failure(let e) = Sys.setOption(fd, level: SOL_SOCKET, name: Int32(PESTO_SO_MARK), value: Int32(bitPattern: mark)) {
            return .failure(e)
        }
        if case .failure(let e) = Sys.setOption(fd, level: SOL_SOCKET, name: SO_REUSEADDR, value: 1) { return .failure(e) }
        return Sys.bind(fd, to: client)
    }

    /// Whether `fd` is a transparent target-side socket (it carries pestod's mark): how a
    /// pestod that took over a connection or flow learns that it uses the routing, which its
    /// predecessor left installed.
    public static func isTransparent(_ fd: Int32) -> Bool {
        guard case .success(let value) = Sys.option(fd, level: SOL_SOCKET, name: Int32(PESTO_SO_MARK)) else { return false }
        return UInt32(bitPattern: value) == mark
    }

    /// A 0/1 file of /proc/sys: its value, or nil when it cannot be read.
    static func readFlag(_ path: String) -> Bool? {
        guard case .success(let fd) = Sys.open(path, O_RDONLY | O_CLOEXEC) else { return nil }
        defer { Sys.close(fd) }
        var byte: UInt8 = 0
        guard case .success(let n) = Sys.read(fd, &byte, 1), n == 1 else { return nil }
        return byte == UInt8(ascii: "1")
    }

    /// Writes 0 or 1 to a file of /proc/sys; false when it cannot.
    static func writeFlag(_ path: String, _ value: Bool) -> Bool {
        guard case .success(let fd) = Sys.open(path, O_WRONLY | O_CLOEXEC) else { return false }
        defer { Sys.close(fd) }
        var byte: UInt8 = value ? UInt8(ascii: "1") : UInt8(ascii: "0")
        guard case .success(let n) = Sys.write(fd, &byte, 1), n == 1 else { return false }
        return true
    }
}

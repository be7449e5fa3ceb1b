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
// UDP is not transparent yet: a `client` UDP rule is refused at validation
// (RuleValidation.swift); see doc/data-path.md.

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

    private let namespace: NetworkNamespace
    /// Listeners and connections using the routing now.
    public private(set) var users = 0
    /// Whether the routing is installed.
    public private(set) var installed = false
    /// Whether pestod set tcp_fwmark_accept (it was 0), so removal sets it back.
    private var setFwmarkAccept = false

    public init(namespace: NetworkNamespace) { self.namespace = namespace }

    deinit { if installed { remove() } }

    /// One more user; installs the routing for the first. A failure (the namespace refuses,
    /// EPERM) counts no user.
    public func retain() -> Result<Void, Errno> {
        if users == 0, !installed, case .failure(let e) = install() { return .failure(e) }
        users += 1
        return .success(())
    }

    /// One user less; removes the routing after the last.
    public func release() {
        precondition(users > 0, "transparent source released more often than retained")
        users -= 1
        if users == 0 && installed { remove() }
    }

    /// Installs the rules, the routes and the sysctl inside the namespace.
    private func install() -> Result<Void, Errno> {
        namespace.perform { () -> Result<Void, Errno> in
            let netlink: RouteNetlink
            do throws(PestoError) { netlink = try RouteNetlink() } catch {
                return .failure(error.underlyingError ?? Errno(rawValue: EPROTO))
            }
            for route in Self.routes {
                if case .failure(let e) = netlink.request(route, add: true) { return .failure(e) }
            }
            for rule in Self.rules {
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

    /// Removes what `install` made (a part already gone is fine).
    private func remove() {
        namespace.perform {
            if let netlink = try? RouteNetlink() {
                // One delete each; identical copies someone else added are deleted too.
                for rule in Self.rules {
                    for _ in 0..<8 { if case .failure = netlink.request(rule, add: false) { break } }
                }
                for route in Self.routes { _ = netlink.request(route, add: false) }  // ENOENT: already gone
            }
            if setFwmarkAccept { _ = Self.writeFlag(Self.fwmarkAcceptPath, false) }
        }
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

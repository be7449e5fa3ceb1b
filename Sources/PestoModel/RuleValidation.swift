// SPDX-License-Identifier: GPL-2.0-or-later

// RuleValidation: the one place that decides whether a rule is acceptable.
//
// Covers everything upstream's fwd_rule_add() and its server-side checks reject (port 0,
// reversed range, target range past 65535, family mismatch, multicast or broadcast target, dual-stack
// with a target address, interface name rules, missing capabilities), plus the contract's
// limit on `owner`. Each failure has its own message that names the field and the value.

extension Rule {
    /// The longest interface name the kernel accepts (IFNAMSIZ - 1).
    public static let maxInterfaceNameLength = 15
    /// The longest owner tag the contract accepts, in bytes.
    public static let maxOwnerLength = 255

    /// Checks the rule against the contract and a table's capabilities.
    ///
    /// `clientSource` says whether the table makes its target sockets inside the network
    /// namespace pestod was given (the HOST table of a pestod started with `--netns`), where
    /// `source` "client" can work; anywhere else (and by default) it is refused.
    /// - Throws: `PestoError` with code `.invalidRule` and a message naming the field.
    public func validate(capabilities: Capabilities, clientSource: Bool = false) throws(PestoError) {
        func invalid(_ message: String) -> PestoError { PestoError(.invalidRule, message) }

        // Ports.
        if firstPort == 0 { throw invalid("first-port must be between 1 and 65535, not 0.") }
        if lastPort == 0 { throw invalid("last-port must be between 1 and 65535, not 0.") }
        if lastPort < firstPort {
            throw invalid("last-port \(lastPort) is below first-port \(firstPort); give the range low to high.")
        }
        if targetPort == 0 { throw invalid("target-port must be between 1 and 65535, not 0.") }
        let targetLast = Int(targetPort) + Int(lastPort - firstPort)
        if targetLast > 65535 {
            throw invalid(
                "target ports \(targetPort)-\(targetLast) pass 65535: ports \(firstPort)-\(lastPort) "
                    + "cannot map to target-port \(targetPort).")
        }

        // The PROXY protocol header is TCP's: UDP has no stream to put it in front of.
        if proto == .udp && proxyProtocol != .none {
            throw invalid(
                "proxy-protocol \"\(proxyProtocol.rawValue)\" is for TCP rules only; pestod sends no PROXY protocol "
                    + "header over UDP: leave proxy-protocol empty for a udp rule.")
        }

        // Transparent source: only where pestod owns the target namespace's routing, and not
        // together with a PROXY header (the target already sees the client's address).
        if source == .client {
            if !clientSource {
                throw invalid(
                    "source \"client\" needs a target inside the network namespace pestod was given (--netns): "
                        + "only the host table of a pestod started with --netns connects from the client's address; "
                        + "use source \"pestod\" (the default) or, for TCP, proxy-protocol.")
            }
            if proxyProtocol != .none {
                throw invalid(
                    "source \"client\" and proxy-protocol \"\(proxyProtocol.rawValue)\" do not combine: with source "
                        + "\"client\" the target already sees the client's address; choose one of them.")
            }
        }

        // Addresses.
        if let address, address.isMulticast {
            throw invalid("address \(address) is a multicast address; give a unicast or wildcard address to listen on.")
        }
        if let target = targetAddress {
            guard let address else {
                throw invalid(
                    "target-address \(target) needs a listening address of the same family; "
                        + "a dual-stack rule (no address) always forwards to the table's default target.")
            }
            if target.family != address.family {
                throw invalid(
                    "target-address \(target) is \(target.family) but address \(address) is \(address.family); "
                        + "use the same family for both.")
            }
            if target.isMulticast { throw invalid("target-address \(target) is a multicast address.") }
            if target.isLimitedBroadcast {
                throw invalid("target-address \(target) is the broadcast address; a connection or flow needs one unicast target.")
            }
            if target.isUnspecified {
                throw invalid("target-address \(target) is a wildcard address; leave it out to use the table's default.")
            }
        }

        // Interface name: the kernel's dev_valid_name() rules.
        if let problem = Self.interfaceNameProblem(interface) { throw invalid(problem) }
        if owner.utf8.count > Self.maxOwnerLength {
            throw invalid("owner is \(owner.utf8.count) bytes long; at most \(Self.maxOwnerLength) are allowed.")
        }

        // Capabilities.
        func need(_ cap: Capabilities, _ what: String) throws(PestoError) {
            if !capabilities.contains(cap) {
                throw invalid("this table cannot \(what): it lacks the \(cap) capability.")
            }
        }
        try need(proto == .tcp ? .tcp : .udp, "forward \(proto.rawValue.uppercased())")
        if let address {
            try need(address.family == .ipv4 ? .ipv4 : .ipv6, "listen on \(address.family) address \(address)")
        } else if capabilities.isDisjoint(with: [.ipv4, .ipv6]) {
            throw invalid("this table cannot listen on any address: it has neither the ipv4 nor the ipv6 capability.")
        }
        if !interface.isEmpty { try need(.ifname, "bind to an interface") }
        if scan { try need(.scan, "scan the target side for bound ports") }
    }

    /// Checks an interface name against the kernel's dev_valid_name() rules, the one check
    /// that both rule validation and pasta's `%INTERFACE` spec syntax use.
    /// - Returns: nil for "" (no interface) and valid names, else a sentence saying what is
    ///   wrong with the name.
    public static func interfaceNameProblem(_ interface: String) -> String? {
        if interface.isEmpty { return nil }
        let bytes = interface.utf8
        if bytes.count > maxInterfaceNameLength {
            return "interface \(ClientText.quote(interface)) is \(bytes.count) bytes long; at most \(maxInterfaceNameLength) are allowed."
        }
        if interface == "." || interface == ".." {
            return "interface \(ClientText.quote(interface)) is not a valid interface name."
        }
        if let bad = bytes.first(where: { $0 == UInt8(ascii: "/") || $0 == UInt8(ascii: ":") || $0 <= 0x20 || $0 == 0x7F }) {
            return "interface \(ClientText.quote(interface)) contains \(describeByte(bad)), which interface names cannot contain."
        }
        return nil
    }

    private static func describeByte(_ byte: UInt8) -> String {
        switch byte {
        case UInt8(ascii: "/"): return "\"/\""
        case UInt8(ascii: ":"): return "\":\""
        case UInt8(ascii: " "): return "a space"
        default: return "the control character 0x\(String(byte, radix: 16))"
        }
    }
}

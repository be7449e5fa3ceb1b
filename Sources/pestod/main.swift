// SPDX-License-Identifier: GPL-2.0-or-later

// pestod: the pesto forwarding service. Publishes the forwarding tables on D-Bus
// (doc/dbus-api.md) and runs the forwarding engine on one event loop thread.

import ArgumentParser
import Logging
import PestoDBus
import PestoEngine
import PestoModel
import PestoService
import PestoSystem

#if canImport(Glibc)
    import Glibc
#endif
#if canImport(Glibc)
    import Glibc
#endif

/// The command line of pestod.
struct Pestod: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pestod",
        abstract: "Keep a live port-forwarding table and change it without disturbing peers.",
        discussion: """
            pestod owns the bus name top.passt.Pesto1 and publishes its forwarding tables at /top/passt/Pesto1 \
            (see doc/dbus-api.md). Rules are inserted inactive, activated (bind + listen) and deactivated \
            (close) one at a time, so changing one rule never touches the sockets of another. Failed binds \
            are retried every second.

            pestod stops cleanly on SIGTERM, SIGINT or SIGHUP, closing every listening socket. It reports \
            readiness with sd_notify READY=1 when $NOTIFY_SOCKET is set, and logs to stderr.

            Descriptors: at start pestod raises its soft RLIMIT_NOFILE to the hard limit (L). It keeps 64 \
            for itself (D-Bus, the control socket, the state file); listeners and relays share E = L - 64, \
            relays R = E - min(E/8, 1024), so rules can still be activated while relays hold all theirs. \
            Each protocol's relays hold at most half of R (less once listeners pass E - R): a TCP \
            connection is counted 6 descriptors (its two sockets and a pipe each way), a UDP flow 1, so a \
            flood of one protocol never takes the other's half. A connection beyond TCP's half is reset, a \
            datagram from a new UDP client beyond UDP's half dropped (logged once), a listener beyond E a \
            bind failure (EMFILE). The defaults: --max-connections R/12, --max-udp-flows R/2.
            """,
        version: PestoBusNames.version)

    @Flag(name: .long, help: "Connect to the system bus (the default).")
    var system = false

    @Flag(name: .long, help: "Connect to the session bus of the calling user.")
    var session = false

    @Option(
        name: .long, help: ArgumentHelp("Connect to the bus at this D-Bus address (e.g. unix:path=/run/pesto/bus).", valueName: "address"))
    var address: String?

    @Option(name: .long, help: ArgumentHelp("Retry failed binds every this many milliseconds.", valueName: "ms"))
    var retryInterval = 1000

    @Option(
        name: .long,
        help: ArgumentHelp(
            "Target network namespace (/run/netns/NAME or /proc/PID/ns/net): the HOST table connects inside it, and a SPLICE table listens inside it and connects out here.",
            valueName: "path"))
    var netns: String?

    @Option(
        name: .long,
        help: ArgumentHelp(
            "Also serve upstream's pesto clients (podman, rootlesskit) on this UNIX socket, speaking pesto protocol version 2 (like pasta -c PATH); uploads are applied as a difference.",
            valueName: "path"))
    var control: String?

    @Option(
        name: .long,
        help: ArgumentHelp(
            "Give a control socket client this long to finish its upload, and a complete upload this long to wait while a D-Bus client holds the lock; then it is refused with a warning.",
            valueName: "ms"))
    var controlTimeout = 5000

    @Option(
        name: .long,
        help: ArgumentHelp(
            "Keep the committed tables in this file: saved atomically before a commit is acknowledged (a commit that cannot be saved is undone and fails with SaveFailed), restored at start; saved rules that cannot be restored stay in the file, and a file that cannot be used is moved aside and pestod starts empty. Default with --session: $XDG_STATE_HOME/pesto/state (~/.local/state/pesto/state), so a bus-activated pestod keeps its rules; otherwise none (the system unit gives /var/lib/pesto/state).",
            valueName: "file"))
    var state: String?

    @Flag(name: .long, help: "Keep no state file, not even the --session default.")
    var noState = false

    @Option(
        name: .long,
        help: ArgumentHelp(
            "What to do with rules that overlap active ones (same protocol, a shared port, matching addresses): refuse (activating one fails with Conflict) or first-match (they may be active together; a new connection or flow goes to the active rule with the lowest ID that matches it, and rules share listening sockets, so carving ports out of a range and changing the carve-outs never closes the range's sockets). Shown as each table's OverlapPolicy property; see doc/overlap.md.",
            valueName: "refuse|first-match"))
    var overlap: OverlapPolicy = .refuse

    /// The state file: --state, else with --session $XDG_STATE_HOME/pesto/state, else none.
    /// A missing directory of an absolute path is made (mode 0700), so an activated pestod
    /// (dbus/session/, dbus/top.passt.Pesto1.service) can save on a fresh system. Relative
    /// XDG_STATE_HOME values are ignored, as the XDG base directory specification says.
    func stateFile() -> String? {
        if noState { return nil }
        var file: String
        if let state {
            file = state
        } else if session {
            if let xdg = getenv("XDG_STATE_HOME").map({ String(cString: $0) }), xdg.hasPrefix("/") {
                file = xdg + "/pesto/state"
            } else if let home = getenv("HOME").map({ String(cString: $0) }), home.hasPrefix("/") {
                file = home + "/.local/state/pesto/state"
            } else {
                return nil
            }
        } else {
            return nil
        }
        if file.hasPrefix("/") {
            var path = ""
            for part in file.split(separator: "/").dropLast() {
                path += "/" + part
                _ = mkdir(path, 0o700)  // EEXIST is fine; a real failure shows when the state is saved
            }
        }
        return file
    }

    @Option(name: .long, help: "Most TCP connections relayed at once (default: R/12, see above).")
    var maxConnections: Int?

    @Option(name: .long, help: "Most UDP flows (client address and port pairs) relayed at once (default: R/2, see above).")
    var maxUdpFlows: Int?

    @Option(name: .long, help: ArgumentHelp("Close a UDP flow after this many seconds without a datagram.", valueName: "seconds"))
    var udpIdleTimeout = UDPRelayLimits().idleTimeoutMilliseconds / 1000

    @Option(name: .long, help: "Most rules per table.")
    var maxRules = TableLimits.default.maxRules

    @Option(name: .long, help: "Most listening sockets the rules of one table may need together.")
    var maxSockets = TableLimits.default.maxSockets

    @Option(name: .long, help: ArgumentHelp("Log level: trace, debug, info, notice, warning, error, critical.", valueName: "level"))
    var logLevel = "info"

    @Option(
        name: .long,
        help: ArgumentHelp(
            "Who may change the tables: polkit (action top.passt.Pesto1.modify, only uid 0 when polkit does not answer; the default on the system bus and with --address), root (only uid 0), or none (everyone who can reach the bus; the default only on the session bus, and a warning elsewhere).",
            valueName: "mode"))
    var authorize: String?

    @Flag(
        name: .long,
        help: ArgumentHelp(
            "Take over from the pestod running with the same runtime directory: receive its tables, listening sockets, relayed TCP connections, UDP flows and control socket over the takeover socket, take the bus name, and let it exit; nothing is closed and reopened (see doc/takeover.md). Fails, leaving the running one in charge, if it cannot complete."
        ))
    var replace = false

    @Option(
        name: .long,
        help: ArgumentHelp(
            "Directory of the root-only takeover socket (takeover.sock) a later pestod --replace connects to (default: $RUNTIME_DIRECTORY, which systemd sets from RuntimeDirectory=; without either, no takeover socket).",
            valueName: "dir"))
    var runtimeDir: String?

    @Option(
        name: .long,
        help: ArgumentHelp(
            "How long a takeover may take, waiting for a D-Bus client's lock included, before it is given up and the running pestod stays in charge.",
            valueName: "ms"))
    var takeoverTimeout = 10_000

    @Option(
        name: .long,
        help: ArgumentHelp(
            "Ask the pestod running as process PID to upgrade itself (what the unit's ExecReload= runs): send it SIGUSR2, on which it starts the installed pestod with its own arguments plus --replace, and wait for it to exit once the new one has taken over (at most --takeover-timeout plus 5 s). Exits 0 when it did, 1 when it is still running (the upgrade failed; it stays in charge).",
            valueName: "pid"))
    var reloadRequest: Int32?

    @Option(
        name: .long,
        help: ArgumentHelp(
            "The most operations (and signals) one event loop turn spends on a large Apply or upload, which is carried out over several turns (default 4096, and at most 4 ms a turn); for tests.",
            valueName: "n", visibility: .hidden))
    var sliceOperations: Int?

    @Flag(name: .long, help: "Print the D-Bus interface XML of the contract (dbus/top.passt.Pesto1.xml) and exit.")
    var printIntrospection = false

    func validate() throws {
        if [system, session, address != nil].filter({ $0 }).count > 1 {
            throw ValidationError("Give at most one of --system, --session and --address.")
        }
        if retryInterval < 10 || retryInterval > 3_600_000 {
            throw ValidationError("--retry-interval must be between 10 and 3600000 milliseconds.")
        }
        if let maxConnections, maxConnections < 1 || maxConnections > 1 << 24 {
            throw ValidationError("--max-connections must be between 1 and \(1 << 24).")
        }
        if let maxUdpFlows, maxUdpFlows < 1 || maxUdpFlows > 1 << 24 {
            throw ValidationError("--max-udp-flows must be between 1 and \(1 << 24).")
        }
        if udpIdleTimeout < 1 || udpIdleTimeout > 86_400 {
            throw ValidationError("--udp-idle-timeout must be between 1 and 86400 seconds.")
        }
        if let sliceOperations, sliceOperations < 1 || sliceOperations > 1 << 24 {
            throw ValidationError("--slice-operations must be between 1 and \(1 << 24).")
        }
        if controlTimeout < 10 || controlTimeout > 600_000 {
            throw ValidationError("--control-timeout must be between 10 and 600000 milliseconds.")
        }
        if maxRules < 1 || maxRules > Int(UInt32.max) { throw ValidationError("--max-rules must be between 1 and \(UInt32.max).") }
        if maxSockets < 1 || maxSockets > Int(UInt32.max) { throw ValidationError("--max-sockets must be between 1 and \(UInt32.max).") }
        if let reloadRequest, reloadRequest < 2 { throw ValidationError("--reload-request needs the PID of a running pestod.") }
        if takeoverTimeout < 10 || takeoverTimeout > 600_000 {
            throw ValidationError("--takeover-timeout must be between 10 and 600000 milliseconds.")
        }
        if replace && takeoverDirectory == nil {
            throw ValidationError("--replace needs the running pestod's runtime directory: --runtime-dir or $RUNTIME_DIRECTORY.")
        }
        if Logger.Level(rawValue: logLevel) == nil { throw ValidationError("Unknown --log-level \(logLevel).") }
        if noState && state != nil { throw ValidationError("Give --state or --no-state, not both.") }
        if let authorize, AuthorizationMode(rawValue: authorize) == nil {
            throw ValidationError("--authorize must be one of: \(AuthorizationMode.allCases.map(\.rawValue).joined(separator: ", ")).")
        }
    }

    /// Where the takeover socket lives: --runtime-dir, else the first of systemd's
    /// $RUNTIME_DIRECTORY (a colon-separated list), else none.
    var takeoverDirectory: String? {
        if let runtimeDir { return runtimeDir }
        guard let env = getenv("RUNTIME_DIRECTORY") else { return nil }
        return String(cString: env).split(separator: ":").first.map(String.init)
    }

    func run() throws {
        if printIntrospection {
            print(PestoInterfaces.contractXML, terminator: "")
            return
        }
        let level = Logger.Level(rawValue: logLevel) ?? .info
        LoggingSystem.bootstrap { label in
            var handler = StderrLogHandler(label: label)  // StreamLogHandler's format, cheaper per line
            handler.logLevel = level
            return handler
        }
        let logger = Logger(label: "pestod")
        if let reloadRequest {
            do throws(PestoError) {
                try ReloadRequest.run(pid: reloadRequest, timeoutMilliseconds: takeoverTimeout + 5000)
                logger.notice("pestod \(reloadRequest) has handed over to its successor")
                return
            } catch {
                logger.critical("\(error.message)\(error.underlyingError.map { ": \($0)" } ?? "")")
                throw ExitCode(1)
            }
        }
        // `none` is the default only on the session bus, which is the user's own: any other
        // bus, a private one given with --address included, may have other users on it.
        var configuration = DaemonConfiguration()
        configuration.bus = address.map { .address($0) } ?? (session ? .session : .system)
        configuration.authorization = authorize.flatMap(AuthorizationMode.init(rawValue:)) ?? (session ? .none : .polkit)
        configuration.engine.retryIntervalMilliseconds = retryInterval
        configuration.engine.limits = TableLimits(maxRules: maxRules, maxSockets: maxSockets)
        configuration.engine.namespacePath = netns
        configuration.engine.overlap = overlap
        configuration.engine.udp.idleTimeoutMilliseconds = udpIdleTimeout * 1000
        configuration.maxConnections = maxConnections
        configuration.maxUDPFlows = maxUdpFlows
        configuration.controlPath = control
        configuration.controlTimeoutMilliseconds = controlTimeout
        configuration.takeoverDirectory = takeoverDirectory
        configuration.takeoverTimeoutMilliseconds = takeoverTimeout
        configuration.replace = replace
        // The installed binary, read now: an upgrade replaces the file, and SIGUSR2 starts
        // whatever is at this path then (UpgradeRequest.swift).
        configuration.upgradeExecutable = try? Sys.executablePath().get()
        configuration.upgradeArguments = Array(CommandLine.arguments.dropFirst())
        configuration.sliceOperations = sliceOperations
        let persistence = stateFile().map { StateFilePersistence(path: $0) }
        let stoppedCleanly: Bool
        do throws(DaemonFailure) {
            stoppedCleanly = try PestoDaemon(configuration: configuration, persistence: persistence, logger: logger).run()
        } catch {
            logger.critical("\(error.description)")
            throw ExitCode(1)
        }
        // A lost bus connection exits 1, so that systemd restarts pestod.
        if !stoppedCleanly { throw ExitCode(1) }
    }
}

Pestod.main()

extension OverlapPolicy: ExpressibleByArgument {
    public init?(argument: String) { self.init(rawValue: argument) }
}

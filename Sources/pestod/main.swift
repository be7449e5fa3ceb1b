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

/// The command line of pestod. The help is short: each option's details, the descriptor
/// arithmetic and the exit statuses are in pestod(8).
struct Pestod: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pestod",
        abstract: "Keep a live port-forwarding table and change it without disturbing peers.",
        discussion: """
            pestod owns top.passt.Pesto1 on D-Bus (pestoctl(1) is its client) and logs to stderr. \
            SIGTERM, SIGINT and SIGHUP stop it cleanly. Every option is explained in pestod(8).
            """,
        version: "pestod \(ProductVersion.current) (D-Bus interface \(PestoBusNames.busName) version \(PestoBusNames.version))")

    /// The levels --log-level accepts, from the most to the least verbose.
    static let logLevels = Logger.Level.allCases.map(\.rawValue)

    @Flag(name: .long, help: "Use the system bus (the default).")
    var system = false

    @Flag(name: .long, help: "Use the calling user's session bus.")
    var session = false

    @Option(name: .long, help: ArgumentHelp("Use the bus at this D-Bus address.", valueName: "address"))
    var address: String?

    @Option(name: .long, help: ArgumentHelp("Retry failed binds this often.", valueName: "ms"))
    var retryInterval = 1000

    @Option(
        name: .long,
        help: ArgumentHelp("Forward into this network namespace (/run/netns/NAME or /proc/PID/ns/net).", valueName: "path"),
        completion: .file())
    var netns: String?

    @Option(
        name: .long, help: ArgumentHelp("Serve upstream pesto clients on this UNIX socket (like pasta -c).", valueName: "path"),
        completion: .file())
    var control: String?

    @Option(name: .long, help: ArgumentHelp("Time a control socket client has to send its upload.", valueName: "ms"))
    var controlTimeout = 5000

    @Option(
        name: .long,
        help: ArgumentHelp(
            "Keep the tables in this file (default with --session: $XDG_STATE_HOME/pesto/state).", valueName: "file"),
        completion: .file())
    var state: String?

    @Flag(name: .long, help: "Keep no state file.")
    var noState = false

    @Option(
        name: .long,
        help: ArgumentHelp("Overlapping active rules: refuse them or let the first match win.", valueName: "policy"),
        completion: .list(OverlapPolicy.allCases.map(\.rawValue)))
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
                _ = Sys.mkdir(path, mode: 0o700)  // EEXIST is fine; a real failure shows when the state is saved
            }
        }
        return file
    }

    @Option(name: .long, help: ArgumentHelp("Most TCP connections relayed at once (default: pestod(8), DESCRIPTORS).", valueName: "n"))
    var maxConnections: Int?

    @Option(name: .long, help: ArgumentHelp("Most UDP flows relayed at once (default: pestod(8), DESCRIPTORS).", valueName: "n"))
    var maxUdpFlows: Int?

    @Option(name: .long, help: ArgumentHelp("Close an idle UDP flow after this long.", valueName: "seconds"))
    var udpIdleTimeout = UDPRelayLimits().idleTimeoutMilliseconds / 1000

    @Option(name: .long, help: ArgumentHelp("Most rules per table.", valueName: "n"))
    var maxRules = TableLimits.default.maxRules

    @Option(name: .long, help: ArgumentHelp("Most listening sockets of one table.", valueName: "n"))
    var maxSockets = TableLimits.default.maxSockets

    @Option(
        name: .long, help: ArgumentHelp("Log level: \(Pestod.logLevels.joined(separator: ", ")).", valueName: "level"),
        completion: .list(Pestod.logLevels))
    var logLevel = "info"

    @Option(
        name: .long,
        help: ArgumentHelp(
            "Who may change the tables: polkit (default), root, or none (default on --session).", valueName: "mode"),
        completion: .list(AuthorizationMode.allCases.map(\.rawValue)))
    var authorize: String?

    @Flag(name: .long, help: ArgumentHelp("Take over from the running pestod without closing anything (pestod(8), UPGRADES)."))
    var replace = false

    @Option(
        name: .long,
        help: ArgumentHelp(
            "Directory of the takeover socket (default: $RUNTIME_DIRECTORY, else /run/pesto, or $XDG_RUNTIME_DIR/pesto with --session).",
            valueName: "dir"),
        completion: .directory)
    var runtimeDir: String?

    @Option(name: .long, help: ArgumentHelp("Give up a takeover after this long.", valueName: "ms"))
    var takeoverTimeout = 10_000

    @Option(
        name: .long,
        help: ArgumentHelp("Ask the pestod running as PID to upgrade itself (the unit's ExecReload=).", valueName: "pid"))
    var reloadRequest: Int32?

    @Option(
        name: .long,
        help: ArgumentHelp(
            "The most operations (and signals) one event loop turn spends on a large Apply or upload, which is carried out over several turns (default 4096, and at most 4 ms a turn); for tests.",
            valueName: "n", visibility: .hidden))
    var sliceOperations: Int?

    @Option(
        name: .long,
        help: ArgumentHelp(
            "Each user's budget of work before authorisation, in argument bytes: how much at once and how much it regains per second (default 16777216:2097152); for tests.",
            valueName: "bytes:per-second", visibility: .hidden))
    var callerBudget: String?

    /// `--caller-budget` as numbers, nil when not given.
    var callerBudgetNumbers: (capacity: Int, refillPerSecond: Int)? {
        guard let parts = callerBudget?.split(separator: ":", omittingEmptySubsequences: false), parts.count == 2,
            let capacity = Int(parts[0]), let rate = Int(parts[1]), capacity >= 1, rate >= 0
        else { return nil }
        return (capacity, rate)
    }

    @Flag(name: .long, help: "Print the D-Bus interfaces' XML and exit.")
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
        if callerBudget != nil && callerBudgetNumbers == nil {
            throw ValidationError("--caller-budget must be BYTES:PER_SECOND (BYTES at least 1).")
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
        if let netns, case .failure(let e) = Sys.stat(netns) {
            throw ValidationError(
                "--netns \(netns): \(e); give a network namespace file: /run/netns/NAME (see ip netns list) or /proc/PID/ns/net.")
        }
        if replace && takeoverDirectory == nil {
            throw ValidationError(
                "--replace needs the running pestod's runtime directory: give --runtime-dir DIR (with --address there is no default).")
        }
        if Logger.Level(rawValue: logLevel) == nil {
            throw ValidationError("Unknown --log-level \(logLevel); the levels are \(Pestod.logLevels.joined(separator: ", ")).")
        }
        if noState && state != nil { throw ValidationError("Give --state or --no-state, not both.") }
        if let authorize, AuthorizationMode(rawValue: authorize) == nil {
            throw ValidationError("--authorize must be one of: \(AuthorizationMode.allCases.map(\.rawValue).joined(separator: ", ")).")
        }
    }

    /// Where the takeover socket lives (RuntimeDirectory: --runtime-dir, $RUNTIME_DIRECTORY,
    /// /run/pesto on the system bus, $XDG_RUNTIME_DIR/pesto with --session, none with --address).
    var takeoverDirectory: String? {
        RuntimeDirectory.resolve(
            option: runtimeDir, systemd: Self.environment("RUNTIME_DIRECTORY"), address: address != nil, session: session,
            xdgRuntimeDir: Self.environment("XDG_RUNTIME_DIR"))
    }

    /// An environment variable's value, if set.
    static func environment(_ name: String) -> String? { getenv(name).map { String(cString: $0) } }

    /// Makes the default runtime directory (mode 0700) when it is the one in use; an existing
    /// one is left as it is, and a failure shows when the takeover socket is made.
    func makeDefaultRuntimeDirectory() {
        let systemd = Self.environment("RUNTIME_DIRECTORY")?.split(separator: ":").first
        guard runtimeDir == nil, systemd == nil, let directory = takeoverDirectory else { return }
        _ = Sys.mkdir(directory, mode: 0o700)  // EEXIST is fine; another failure shows at the socket
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
                logger.critical("\(error.logText)")
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
        makeDefaultRuntimeDirectory()
        configuration.takeoverDirectory = takeoverDirectory
        configuration.takeoverTimeoutMilliseconds = takeoverTimeout
        configuration.replace = replace
        // The installed binary, read now: an upgrade replaces the file, and SIGUSR2 starts
        // whatever is at this path then (UpgradeRequest.swift).
        configuration.upgradeExecutable = try? Sys.executablePath().get()
        configuration.upgradeArguments = Array(CommandLine.arguments.dropFirst())
        configuration.sliceOperations = sliceOperations
        configuration.callerBudget = callerBudgetNumbers
        let persistence = stateFile().map { StateStorePersistence(path: $0) }
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

// SPDX-License-Identifier: GPL-2.0-or-later

// PestoDaemon: pestod assembled — the event loop, the engine, the bus connection, the
// server, its store and authoriser, the control and takeover sockets — run, and torn down
// in order. `Sources/pestod/main.swift` only turns flags into a `DaemonConfiguration`.
//
// Theory of operation
// -------------------
// `run()` goes through three phases:
//
//   assemble   the open-file limit is raised and the descriptor plan logged; the loop and
//              the engine are made. A takeover (`replace`) receives everything from the
//              running pestod before this one touches the bus or the state file, so any
//              failure here leaves the running one as it was. Then the bus name is taken
//              first (a second pestod that cannot own it must leave the state file alone),
//              the tables restored (from the handed-over entries, or the store), the server
//              made with its store and authoriser and attached to the loop, and the control
//              socket, the takeover socket and the SIGUSR2 upgrade set up. Calls queue in
//              libdbus until the loop runs, so no client sees the tables before they are
//              restored.
//   serve      READY=1, then the loop runs until a stop signal or the bus is lost.
//   tear down  STOPPING=1; a change in progress is rolled back and its caller told; the
//              engine stops; the upgrade handler, the takeover socket and the control
//              socket (whose deinit removes its file) go in that order, explicitly: an
//              optimised build may end a value's lifetime at its last use, and these hold
//              the loop unowned. Signals already queued go out, the bus leaves the loop, and
//              the loop's handlers are released.

import Logging
import PestoDBus
import PestoEngine
import PestoModel
import PestoSystem

#if canImport(Glibc)
    import Glibc
#endif

/// Everything pestod's flags decide, for `PestoDaemon`.
public struct DaemonConfiguration {
    /// The bus to serve on.
    public var bus: BusAddress = .system
    /// Who may change the tables.
    public var authorization: AuthorizationMode = .polkit
    /// The engine: tables, limits, namespace, relays.
    public var engine = EngineConfiguration()
    /// The most relayed TCP connections and UDP flows; nil: the descriptor plan's defaults
    /// (`--max-connections`, `--max-udp-flows`).
    public var maxConnections: Int?
    public var maxUDPFlows: Int?
    /// The upstream control socket's path (`--control`), if any.
    public var controlPath: String?
    /// How long a control socket client may take (`--control-timeout`).
    public var controlTimeoutMilliseconds = 5000
    /// The takeover socket's directory (`--runtime-dir`), if any.
    public var takeoverDirectory: String?
    /// How long a takeover may take (`--takeover-timeout`).
    public var takeoverTimeoutMilliseconds = 10_000
    /// Take over from the pestod running with the same runtime directory (`--replace`).
    public var replace = false
    /// The installed binary and the arguments SIGUSR2 restarts it with (plus `--replace`);
    /// no upgrade on SIGUSR2 without an executable.
    public var upgradeExecutable: String?
    public var upgradeArguments: [String] = []
    /// The operations one loop turn spends on a large change (`--slice-operations`).
    public var sliceOperations: Int?
    /// The caller work budget's size and refill rate in argument bytes (`--caller-budget`);
    /// nil: the default (CallerWorkBudget.swift).
    public var callerBudget: (capacity: Int, refillPerSecond: Int)?

    /// The takeover socket's path, when there is a runtime directory.
    var takeoverPath: String? { takeoverDirectory.map { $0 + "/takeover.sock" } }

    /// The default configuration: the system bus, polkit, default engine.
    public init() {}
}

/// Why pestod could not start: the message for its critical log line.
public struct DaemonFailure: Error, CustomStringConvertible {
    /// What went wrong, with the underlying error.
    public let description: String
}

/// pestod: assembles, runs and tears down the service (see the theory of operation above).
public final class PestoDaemon {
    let configuration: DaemonConfiguration
    let logger: Logger
    /// Keeps the committed tables; nil keeps none (`--no-state`).
    let persistence: (any TablesPersistence)?

    /// A daemon for `configuration`, keeping its tables with `persistence`.
    public init(configuration: DaemonConfiguration, persistence: (any TablesPersistence)?, logger: Logger) {
        self.configuration = configuration
        self.persistence = persistence
        self.logger = logger
    }

    /// Runs pestod until it is stopped: returns true on a clean stop, false when the bus
    /// connection was lost (pestod exits 1 then, and systemd restarts it).
    public func run() throws(DaemonFailure) -> Bool {
        do {
            return try assembleAndServe()
        } catch let e as DaemonFailure {
            throw e
        } catch let e as DBusErrorReply {
            throw DaemonFailure(description: e.message)
        } catch let e as PestoError {
            throw DaemonFailure(description: e.logText)
        } catch {
            throw DaemonFailure(description: "\(error)")
        }
    }

    /// Owns the bus name; when another process has it, says how to take over instead.
    private func ownBusName(_ connection: DBusConnection) throws(DaemonFailure) {
        do {
            try connection.requestName(PestoBusNames.busName, allowingReplacement: configuration.takeoverPath != nil)
        } catch {
            let hint =
                "Another pestod is running on this bus: stop it first, or take over from it without closing anything with "
                + "pestod --replace and the same options"
                + (configuration.takeoverDirectory.map { " (its runtime directory is \($0))" } ?? " and --runtime-dir DIR")
                + " (pestod(8), UPGRADES)"
            throw DaemonFailure(description: "\(error.message). \(hint)")
        }
    }

    /// Raises the open-file limit and logs the descriptor plan that follows from it.
    private func planDescriptors() -> DescriptorPlan {
        switch DescriptorPlan.raiseOpenFileLimit() {
        case .success(let (before, after)) where before != after:
            logger.info("raised the open-file limit (RLIMIT_NOFILE) from \(before) to the hard limit, \(after)")
        case .success(let (_, after)):
            logger.info("open-file limit (RLIMIT_NOFILE): \(after), already the hard limit")
        case .failure(let e):
            logger.warning("cannot raise the open-file limit (RLIMIT_NOFILE) to the hard limit: \(e)")
        }
        let plan = DescriptorPlan.current
        logger.info(
            "descriptors: \(plan.openFileLimit), \(DescriptorPlan.coreReserve) kept for pestod, \(plan.engineLimit) for listeners and relays, relays up to \(plan.relayLimit)"
        )
        return plan
    }

    /// The three phases of `run()`.
    private func assembleAndServe() throws -> Bool {
        let logger = logger
        let plan = planDescriptors()
        let loop = try EventLoop()
        try loop.stopOnSignals()
        var config = configuration.engine
        config.descriptors = plan
        config.tcp.maxConnections = configuration.maxConnections ?? plan.defaultMaxConnections
        config.udp.maxFlows = configuration.maxUDPFlows ?? plan.defaultMaxFlows
        let takeoverPath = configuration.takeoverPath
        // A takeover receives everything before this instance touches the bus or the state
        // file; any failure here exits and leaves the running pestod as it was.
        let received =
            try configuration.replace
            ? TakeoverClient.receive(path: takeoverPath!, timeoutMilliseconds: configuration.takeoverTimeoutMilliseconds, logger: logger)
            : nil
        let engine = try ForwardingEngine(loop: loop, configuration: config, adoption: received?.adoption)
        logger.info("relay limits: \(config.tcp.maxConnections) TCP connections, \(config.udp.maxFlows) UDP flows")
        engine.budget.onExhausted = { proto in
            switch proto {
            case .tcp:
                logger.warning(
                    "descriptor budget spent (\(plan.relayLimit) for relays): new TCP connections are reset until descriptors are free")
            case .udp:
                logger.warning(
                    "descriptor budget spent (\(plan.relayLimit) for relays): datagrams from new UDP clients are dropped until descriptors are free"
                )
            }
        }
        logger.info(
            "tables: \(engine.tables.map { "\($0.kind.name) [\($0.capabilities)]" }.joined(separator: ", ")), overlapping rules: \(config.overlap)"
        )
        let connection = try DBusConnection(configuration.bus)
        // The bus name first: a second pestod that cannot own it must leave the state
        // file alone (no restore, no move aside, no save). Calls queue in libdbus until
        // the loop runs, so no client sees the tables before they are restored.
        let carried: [StateFile.Entry]
        if var received {
            carried = try completeTakeover(&received, engine: engine, connection: connection)
        } else {
            try ownBusName(connection)
            carried = try persistence?.restore(into: engine, logger: logger) ?? []
        }
        let server = PestoServer(engine: engine, port: connection, logger: logger)
        if let persistence { server.persist(in: try persistence.start(loop: loop)) }
        authorize(server, on: connection)
        server.allowsReplacement = takeoverPath != nil
        if let sliceOperations = configuration.sliceOperations { server.sliceOperations = sliceOperations }
        if let callerBudget = configuration.callerBudget { server.callerBudget = callerBudget }  // caller budget hook
        try server.start(on: connection)
        var controlSocket = try openControlSocket(handed: received?.control, server: server, loop: loop)
        var takeoverSource = openTakeoverSocket(server: server, loop: loop, control: controlSocket, carried: carried)
        var upgrade = takeoverSource == nil ? nil : upgradeOnSignal(loop: loop)
        if upgrade == nil {
            // No takeover socket, so no upgrade in place: SIGUSR2 must not end pestod (its
            // default action). `pestod --reload-request` refuses such a pestod up front.
            _ = Sys.upgradeOnSignal(writingTo: -1)
            logger.info("no takeover socket (--runtime-dir): SIGUSR2 (systemctl reload) is ignored")
        }
        engine.start()
        // Under systemd (NotifyAccess=all), a pestod that took over becomes the main process.
        SystemdNotify.send("READY=1")
        loop.run()
        SystemdNotify.send("STOPPING=1")
        server.abandonChanges()  // a change in progress is rolled back, its caller told
        persistence?.close()  // every committed change saved; the writer thread stops
        engine.stop()
        // Torn down in this order, explicitly: an optimised build may end a value's
        // lifetime at its last use, and these hold the loop unowned. The control socket
        // is kept open until here; its deinit removes the socket file.
        _ = upgrade.take()
        _ = takeoverSource.take()
        _ = controlSocket.take()
        // Signals already queued go out, then the bus leaves the loop while both exist.
        connection.flush()
        connection.detach()
        loop.removeAllHandlers()  // break the loop ↔ handler cycles so everything is released
        logger.info("stopping: closing \(engine.tables.reduce(0) { $0 + $1.openSockets }) listening sockets")
        return !server.disconnected
    }

    /// Installs what a takeover received (tables, listeners, relays), takes the bus name from
    /// the running pestod and confirms; returns the handed-over rules that could not be restored.
    private func completeTakeover(
        _ received: inout TakeoverReceived, engine: ForwardingEngine, connection: DBusConnection
    ) throws -> [StateFile.Entry] {
        let result = StateFile.restore(received.entries, into: engine)
        StateStorePersistence.logCarried(result.carried, source: "takeover", logger: logger)
        engine.adoptScanListeners(received.adoption)
        let adopted = received.adoption.adopted
        received.adoption.closeUnclaimed()
        // Ready: the running pestod, which served on until now, pauses its relays and sends them.
        try TakeoverClient.receiveRelays(&received, timeoutMilliseconds: configuration.takeoverTimeoutMilliseconds)
        // The old pestod saved everything before sharing and checked nothing changed since;
        // the carried rules are this one's.
        try persistence?.adopt(engine, carried: result.carried)
        let relays = received.adoptRelays(into: engine)
        logger.notice(
            "takeover: restored \(result.restored) of \(received.entries.count) rules, installed \(adopted) handed-over listeners (\(received.adoption.refused) refused), \(relays.connections) relayed connections and \(relays.flows) UDP flows (\(relays.refused) refused)"
        )
        // The running pestod allowed replacement: the name moves here at once, and goes
        // back to it should this process die before the handover completes.
        try connection.requestName(PestoBusNames.busName, allowingReplacement: true, replacing: true)
        try TakeoverClient.confirm(received.channel)
        // Under systemd (NotifyAccess=all) this process becomes the service's main
        // process before the old one exits, which it does once the channel closes.
        SystemdNotify.send("MAINPID=\(getpid())")
        received.channel.finish()
        // The old pestod has let go of the relayed connections: they move bytes here now.
        engine.tcp.startAdopted()
        return result.carried.map(\.entry)
    }

    /// Gives `server` the authoriser of the configured mode.
    private func authorize(_ server: PestoServer, on connection: DBusConnection) {
        let mode = configuration.authorization
        if mode == .none && configuration.bus != .session {
            let bus: String
            if case .address(let a) = configuration.bus { bus = a } else { bus = "the system bus" }
            logger.warning(
                "--authorize none: every client that can connect to \(bus) may change the tables, take the lock and activate listeners"
            )
        }
        switch mode {
        case .none: break
        case .root: server.authorizer = RootOnlyAuthorizer(connection: connection)
        case .polkit: server.authorizer = PolkitAuthorizer(connection: connection)
        }
        logger.info("authorisation of changes: \(mode.rawValue)")
    }

    /// The upstream control socket: the one handed over by a takeover, else `--control`'s.
    private func openControlSocket(
        handed: (path: String, fd: Int32)?, server: PestoServer, loop: EventLoop
    ) throws(PestoError) -> ControlSocket? {
        let control = configuration.controlPath
        let timeout = configuration.controlTimeoutMilliseconds
        if let handed {
            if handed.path != control {
                logger.warning("took over the control socket at \(handed.path) (--control says \(control ?? "none"))")
            }
            return try ControlSocket(
                adopting: handed.fd, path: handed.path, server: server, loop: loop, logger: logger, timeoutMilliseconds: timeout)
        }
        guard let control else { return nil }
        return try ControlSocket(path: control, server: server, loop: loop, logger: logger, timeoutMilliseconds: timeout)
    }

    /// The takeover socket a later `pestod --replace` connects to (none without a runtime
    /// directory, or when it cannot be made: a warning, pestod runs on).
    private func openTakeoverSocket(
        server: PestoServer, loop: EventLoop, control: ControlSocket?, carried: [StateFile.Entry]
    ) -> TakeoverSource? {
        guard let takeoverPath = configuration.takeoverPath else { return nil }
        do throws(PestoError) {
            let source = try TakeoverSource(
                path: takeoverPath, server: server, loop: loop, logger: logger,
                timeoutMilliseconds: configuration.takeoverTimeoutMilliseconds)
            source.control = control
            source.carried = carried
            // Exits at once: the new pestod holds every socket, the bus name and the
            // state file now; nothing here may be closed, unlinked or saved.
            source.onHandedOver = { Glibc.exit(0) }
            return source
        } catch {
            logger.warning("no takeover socket: \(error.message)\(error.underlyingError.map { ": \($0)" } ?? "")")
            return nil
        }
    }

    /// SIGUSR2 (systemctl reload): start the installed pestod with `--replace`.
    private func upgradeOnSignal(loop: EventLoop) -> UpgradeOnSignal? {
        guard let executable = configuration.upgradeExecutable else { return nil }
        do throws(PestoError) {
            return try UpgradeOnSignal(loop: loop, logger: logger, executable: executable, arguments: configuration.upgradeArguments)
        } catch {
            logger.warning("no upgrade on SIGUSR2: \(error.message)\(error.underlyingError.map { ": \($0)" } ?? "")")
            return nil
        }
    }
}

// SPDX-License-Identifier: GPL-2.0-or-later

// The soak's world: a private dbus-daemon (PestoTestSupport's PrivateBus, its socket in a temp
// dir) and a release pestod on it with `--state` and `--control` in the same dir, which the
// chaos loop SIGKILLs and starts again with the same state file. pestod reports READY=1 to a
// NOTIFY_SOCKET datagram socket we bind, so every start is waited for without guessing.

import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport

#if canImport(Glibc)
    import Glibc
#endif

/// A soak failure with one sentence for the user.
struct SoakError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// The bus, pestod and their files. Only the main (chaos) thread starts or kills pestod;
/// workers use only the `let` paths.
final class World {
    private let temporary: TemporaryDirectory
    var directory: String { temporary.path }
    let busAddress: String
    let statePath: String
    let controlPath: String
    let logPath: String
    let pestodPath: String
    let peerPath: String
    private let bus: PrivateBus
    private var pestod: ChildProcess?
    private let extraArguments: [String]
    private var stopped = false

    /// Starts dbus-daemon in a fresh temp dir; pestod is started by `startPestod`.
    init(productDirectory: String, pestodArguments: [String]) throws {
        temporary = try TemporaryDirectory(prefix: "pesto-soak-")
        statePath = temporary.file("state")
        controlPath = temporary.file("control")
        logPath = temporary.file("pestod.log")
        pestodPath = productDirectory + "/pestod"
        peerPath = productDirectory + "/pesto-test-peer"
        extraArguments = pestodArguments
        bus = try PrivateBus(directory: temporary.path)
        busAddress = bus.address
    }

    /// Starts pestod with the state file and control socket and waits (bounded) for READY=1;
    /// its output is appended to the log across restarts.
    func startPestod() throws {
        do {
            pestod = try ChildProcess.startReady(
                pestodPath, ["--address", busAddress, "--state", statePath, "--control", controlPath] + extraArguments,
                notifyPath: temporary.file("notify.sock"), stdout: .file(logPath, append: true),
                stderr: .file(logPath, append: true), timeoutMilliseconds: 30_000)
        } catch {
            throw SoakError("\(error); see \(logPath)")
        }
    }

    /// SIGKILLs pestod and reaps it.
    func killPestod() {
        pestod?.kill()
        pestod = nil
    }

    /// The process ID of the pestod we started, while one was started and not killed.
    var pestodPID: pid_t? { pestod?.pid }

    /// True while the pestod we started runs.
    var pestodRunning: Bool { pestod?.isRunning ?? false }

    /// Kills pestod and the bus and removes the temp dir (unless `keep`).
    func stop(keep: Bool) {
        guard !stopped else { return }
        stopped = true
        killPestod()
        bus.stop()
        if keep { temporary.keep() }
    }
}

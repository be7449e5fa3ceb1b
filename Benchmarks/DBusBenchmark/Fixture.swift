// SPDX-License-Identifier: GPL-2.0-or-later

// The benchmark's world: a private dbus-daemon listening on a unix path socket in a temp dir,
// and a release pestod on it, ready once it has sent READY=1 to a NOTIFY_SOCKET we bind.

import PestoEngine
import PestoSystem
import PestoModel

#if canImport(Glibc)
import Glibc
#endif

/// A private bus and a pestod on it; `stop()` SIGKILLs both and removes the temp dir.
struct Fixture {
    /// The temp dir holding the bus config, the bus socket, the notify socket and pestod's log.
    let directory: String
    /// The bus address (`unix:path=…,guid=…`) dbus-daemon printed.
    let address: String
    let busPID: pid_t
    let pestodPID: pid_t
    /// pestod's stderr (its log).
    var logPath: String { directory + "/pestod.log" }
    /// Where pestod's control socket is when `controlPlaceholder` is among its arguments.
    var controlPath: String { directory + "/control.sock" }
    /// Stands for `controlPath` in `start`'s pestod arguments (the directory is made there).
    static let controlPlaceholder = "@CONTROL"

    /// Longest wait for the bus address or for READY=1.
    static let startTimeoutMilliseconds = 10_000

    /// Creates the temp dir, starts dbus-daemon, then pestod, and waits (bounded) until pestod
    /// owns its name. Everything started is on the clean-up list before anything can fail.
    static func start(pestod: String, pestodArguments: [String]) throws -> Fixture {
        let dir = try makeTempDirectory()
        cleanup.set(directory: dir)

        // 1. The bus: permissive session-type policy (doc/platform-notes.md), path socket only.
        let config = """
            <!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
             "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
            <busconfig>
              <type>session</type>
              <listen>unix:path=\(dir)/bus.sock</listen>
              <auth>EXTERNAL</auth>
              <policy context="default">
                <allow user="*"/>
                <allow send_destination="*" eavesdrop="true"/>
                <allow eavesdrop="true"/>
                <allow own="*"/>
              </policy>
            </busconfig>

            """
        try writeFile(dir + "/bus.conf", config)
        let out = try makePipe()
        let busPID: pid_t
        do {
            busPID = try spawn(
                "dbus-daemon", ["--config-file=\(dir)/bus.conf", "--nofork", "--print-address=1"],
                stdout: .descriptor(out.write), stderr: .file(dir + "/bus.log"))
        } catch {
            close(out.read)
            close(out.write)
            throw error
        }
        cleanup.add(child: busPID)
        close(out.write)
        let deadline = MonotonicInstant.now.adding(milliseconds: startTimeoutMilliseconds)
        let line = readLine(from: out.read, until: deadline)
        close(out.read)  // dbus-daemon prints nothing else on stdout
        guard let address = line?.trimmingSpaces, address.hasPrefix("unix:") else {
            throw BenchError("dbus-daemon printed no address (\(readFile(dir + "/bus.log")))")
        }

        // 2. The notify socket pestod reports READY=1 to.
        let notifyPath = dir + "/notify.sock"
        let notify = try bindDatagramSocket(notifyPath)
        defer { close(notify) }

        // 3. pestod.
        let pestodPID = try spawn(
            pestod, ["--address", address, "--authorize", "none"] + pestodArguments.map { $0 == controlPlaceholder ? dir + "/control.sock" : $0 },
            environment: ["NOTIFY_SOCKET=\(notifyPath)"],
            stdout: .file(dir + "/pestod.out"), stderr: .file(dir + "/pestod.log"))
        cleanup.add(child: pestodPID)
        let fixture = Fixture(directory: dir, address: address, busPID: busPID, pestodPID: pestodPID)
        try fixture.waitReady(notify: notify, until: MonotonicInstant.now.adding(milliseconds: startTimeoutMilliseconds))
        return fixture
    }

    /// Waits for "READY=1" on `notify`: poll with short slices, and between them check that
    /// pestod is still alive, so a crash is reported at once instead of after the deadline.
    private func waitReady(notify: Int32, until deadline: MonotonicInstant) throws {
        var buffer = [UInt8](repeating: 0, count: 512)
        while true {
            if let code = exitedYet(pestodPID) {
                cleanup.remove(child: pestodPID)
                throw BenchError("pestod exited with status \(code) before READY=1:\n\(readFile(logPath))")
            }
            let left = millisecondsLeft(deadline)
            if left == 0 { throw BenchError("pestod sent no READY=1 within \(Self.startTimeoutMilliseconds) ms:\n\(readFile(logPath))") }
            var pfd = pollfd(fd: notify, events: Int16(POLLIN), revents: 0)
            let ready = poll(&pfd, 1, min(left, 100))
            if ready <= 0 { continue }
            let n = recv(notify, &buffer, buffer.count, 0)
            guard n > 0 else { continue }
            let message = String(decoding: buffer[0..<n], as: UTF8.self)
            if message.split(separator: "\n").contains("READY=1") { return }
        }
    }

    /// Peak and current RSS of pestod and of the bus daemon, in KiB, read before they stop.
    func memory() -> (pestodPeak: Int?, pestodNow: Int?, busPeak: Int?) {
        (procStatusKiB(pestodPID, "VmHWM"), procStatusKiB(pestodPID, "VmRSS"), procStatusKiB(busPID, "VmHWM"))
    }

    /// Lines pestod has logged so far.
    func logLineCount() -> Int {
        let fd = open(logPath, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return 0 }
        defer { close(fd) }
        var lines = 0
        var buffer = [UInt8](repeating: 0, count: 65_536)
        while true {
            let n = read(fd, &buffer, buffer.count)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return lines }
            for b in buffer[0..<n] where b == UInt8(ascii: "\n") { lines += 1 }
        }
    }

    /// The last line of pestod's log containing `text`, without its timestamp prefix ("" if none).
    func lastLogLine(containing text: String) -> String {
        let line = readFile(logPath).split(separator: "\n").last { $0.contains(text) } ?? ""
        guard let at = line.indices.first(where: { line[$0...].hasPrefix(text) }) else { return String(line) }
        return String(line[at...])
    }

    /// SIGKILLs pestod and dbus-daemon and removes the temp dir.
    func stop() { cleanup.run() }
}

/// Binds a unix datagram socket at `path` (close-on-exec: pestod must not inherit it).
func bindDatagramSocket(_ path: String) throws -> Int32 {
    let bytes = Array(path.utf8)
    guard bytes.count < 108 else { throw BenchError("socket path too long: \(path)") }
    let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard fd >= 0 else { throw BenchError("socket failed: errno \(errno)") }
    var addr = sockaddr_un()
    addr.sun_family = sa_family_t(AF_UNIX)
    withUnsafeMutableBytes(of: &addr.sun_path) { raw in
        for (i, b) in bytes.enumerated() { raw[i] = b }
    }
    let len = socklen_t(MemoryLayout<sa_family_t>.size + bytes.count + 1)
    let rc = withUnsafePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) }
    }
    guard rc == 0 else {
        let e = errno
        close(fd)
        throw BenchError("cannot bind \(path): errno \(e)")
    }
    return fd
}

/// Creates (or truncates) `path` with `text`.
func writeFile(_ path: String, _ text: String) throws {
    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
    guard fd >= 0 else { throw BenchError("cannot create \(path): errno \(errno)") }
    defer { close(fd) }
    let bytes = Array(text.utf8)
    var off = 0
    while off < bytes.count {
        let n = bytes[off...].withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        if n < 0 && errno == EINTR { continue }
        guard n > 0 else { throw BenchError("cannot write \(path): errno \(errno)") }
        off += n
    }
}

extension String {
    /// The string without leading and trailing spaces, tabs and newlines.
    var trimmingSpaces: String {
        let isSpace: (Character) -> Bool = { $0 == " " || $0 == "\t" || $0 == "\n" || $0 == "\r" }
        guard let first = firstIndex(where: { !isSpace($0) }), let last = lastIndex(where: { !isSpace($0) }) else { return "" }
        return String(self[first...last])
    }
}

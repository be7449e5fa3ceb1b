// SPDX-License-Identifier: GPL-2.0-or-later

// Child processes and clean-up for pesto-dbus-bench: posix_spawn with a clean signal state,
// bounded waits on pipes and sockets (poll with a deadline, never sleep), exit statuses,
// /proc figures, and one clean-up list that both the normal exit path and a signal-watching
// thread drain, so children are SIGKILLed and the temp dir removed whichever way we leave.

import PestoEngine
import PestoSystem
import PestoModel
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// A benchmark failure with one sentence for the user.
struct BenchError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// Writes `text` and a newline to stderr (no Foundation, no C `stderr` global).
func printError(_ text: String) {
    fflush(nil)  // what we printed to stdout so far comes first
    let bytes = Array((text + "\n").utf8)
    var off = 0
    while off < bytes.count {
        let n = bytes[off...].withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
        if n <= 0 { return }
        off += n
    }
}

/// Milliseconds left until `deadline` (0 when past), for poll(2).
func millisecondsLeft(_ deadline: MonotonicInstant) -> Int32 {
    let now = MonotonicInstant.now
    guard now < deadline else { return 0 }
    return Int32(min((deadline.nanoseconds - now.nanoseconds) / 1_000_000 + 1, 60_000))
}

/// What one of the child's standard descriptors is connected to.
enum Redirect {
    /// Our own descriptor, unchanged.
    case inherit
    /// /dev/null.
    case devNull
    /// A descriptor of ours (e.g. a pipe's write end), dup2'ed into place.
    case descriptor(Int32)
    /// A file, created or truncated.
    case file(String)
}

/// Every resource that must not outlive the benchmark; safe to use from any thread.
final class CleanupList: Sendable {
    private struct State {
        var children: [pid_t] = []
        var directory: String?
        var done = false
    }
    private let state = Mutex(State())

    /// Remembers a child to SIGKILL at the end (or kills it at once if the end has come).
    func add(child: pid_t) {
        let late = state.withLock { s -> Bool in
            if !s.done { s.children.append(child) }
            return s.done
        }
        if late { kill(child, SIGKILL) }
    }

    /// Forgets a child that has been reaped already.
    func remove(child: pid_t) { state.withLock { $0.children.removeAll { $0 == child } } }

    /// Remembers the temp dir to empty and remove at the end.
    func set(directory: String) { state.withLock { $0.directory = directory } }

    /// SIGKILLs and reaps every remembered child, then removes the temp dir. Runs once; the
    /// lock is held throughout, so a second caller (the main thread racing the signal thread)
    /// returns only when the first has finished, and never exits under its feet.
    func run() {
        state.withLock { s in
            if s.done { return }
            s.done = true
            for pid in s.children {
                kill(pid, SIGKILL)  // SIGTERM may be blocked in the child; SIGKILL cannot be.
                var status: Int32 = 0
                while waitpid(pid, &status, 0) < 0 && errno == EINTR {}  // ECHILD: reaped elsewhere
            }
            s.children.removeAll()
            if let directory = s.directory { removeDirectory(directory) }
        }
    }
}

/// The process-wide clean-up list (a `let` of a Sendable type: fine in Swift 6).
let cleanup = CleanupList()

/// Blocks SIGINT, SIGTERM and SIGHUP in this (the main) thread and starts a thread that waits
/// for them with sigwait(3), runs the clean-up list and exits 128+signal. Call before any other
/// thread exists so every thread inherits the mask. Children get an empty mask (see `spawn`).
func installSignalCleanup() {
    var set = sigset_t()
    sigemptyset(&set)
    for s in [SIGINT, SIGTERM, SIGHUP] { sigaddset(&set, s) }
    pthread_sigmask(SIG_BLOCK, &set, nil)
    var tid = pthread_t()
    let rc = pthread_create(&tid, nil, { _ in
        var set = sigset_t()
        sigemptyset(&set)
        for s in [SIGINT, SIGTERM, SIGHUP] { sigaddset(&set, s) }
        var sig: Int32 = 0
        if sigwait(&set, &sig) == 0 {
            printError("pesto-dbus-bench: signal \(sig), stopping children and removing the temp dir")
            cleanup.run()
            _exit(128 + sig)
        }
        return nil
    }, nil)
    if rc == 0 { pthread_detach(tid) }
}

/// Removes the regular files and sockets directly inside `path`, then `path` itself.
func removeDirectory(_ path: String) {
    if let dir = opendir(path) {
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
            }
            if name != "." && name != ".." { names.append(name) }
        }
        closedir(dir)
        for name in names { unlink(path + "/" + name) }
    }
    rmdir(path)
}

/// Makes a fresh private directory under /tmp.
func makeTempDirectory() throws -> String {
    var template = Array("/tmp/pesto-dbus-bench.XXXXXX".utf8CString)
    guard let p = mkdtemp(&template) else { throw BenchError("cannot create a temp dir: errno \(errno)") }
    return String(cString: p)
}

/// A pipe whose two ends are close-on-exec (a child gets only what `spawn` dup2's for it).
func makePipe() throws -> (read: Int32, write: Int32) {
    var fds: [Int32] = [-1, -1]
    guard pipe(&fds) == 0 else { throw BenchError("pipe failed: errno \(errno)") }
    for fd in fds { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
    return (fds[0], fds[1])
}

/// Starts `program` with posix_spawn (posix_spawnp when `program` has no slash) and returns its
/// PID. The child gets an empty signal mask and default dispositions for the signals we handle
/// (a child must never inherit our blocked SIGTERM), our environment plus `environment`, and
/// stdout/stderr as asked; stdin is `stdin` (a descriptor of ours) or /dev/null.
func spawn(
    _ program: String, _ arguments: [String], environment: [String] = [],
    stdin: Int32? = nil, stdout: Redirect = .inherit, stderr: Redirect = .inherit
) throws -> pid_t {
    var argv: [UnsafeMutablePointer<CChar>?] = ([program] + arguments).map { strdup($0) } + [nil]
    defer { for p in argv { free(p) } }
    let overridden = Set(environment.compactMap { $0.split(separator: "=", maxSplits: 1).first.map(String.init) })
    var envStrings = environment
    var e: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>? = environ
    while let entry = e?.pointee {
        let text = String(cString: entry)
        let key = text.split(separator: "=", maxSplits: 1).first.map(String.init) ?? text
        if !overridden.contains(key) { envStrings.append(text) }
        e = e?.advanced(by: 1)
    }
    var envp: [UnsafeMutablePointer<CChar>?] = envStrings.map { strdup($0) } + [nil]
    defer { for p in envp { free(p) } }

    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    if let stdin {
        posix_spawn_file_actions_adddup2(&actions, stdin, 0)
    } else {
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
    }
    for (fd, redirect) in [(Int32(1), stdout), (Int32(2), stderr)] {
        switch redirect {
        case .inherit: break
        case .devNull: posix_spawn_file_actions_addopen(&actions, fd, "/dev/null", O_WRONLY, 0)
        case .descriptor(let from): posix_spawn_file_actions_adddup2(&actions, from, fd)
        case .file(let path): posix_spawn_file_actions_addopen(&actions, fd, path, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        }
    }

    var attr = posix_spawnattr_t()
    posix_spawnattr_init(&attr)
    defer { posix_spawnattr_destroy(&attr) }
    var empty = sigset_t()
    sigemptyset(&empty)
    posix_spawnattr_setsigmask(&attr, &empty)
    var defaults = sigset_t()
    sigemptyset(&defaults)
    for s in [SIGINT, SIGTERM, SIGHUP, SIGPIPE] { sigaddset(&defaults, s) }
    posix_spawnattr_setsigdefault(&attr, &defaults)
    posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))

    var pid: pid_t = 0
    let rc = program.contains("/")
        ? posix_spawn(&pid, program, &actions, &attr, &argv, &envp)
        : posix_spawnp(&pid, program, &actions, &attr, &argv, &envp)
    guard rc == 0 else { throw BenchError("cannot start \(program): errno \(rc)") }
    return pid
}

/// Waits for `pid` to end and returns its exit code, or 128+signal when a signal killed it.
func waitExit(_ pid: pid_t) -> Int32 {
    var status: Int32 = 0
    while waitpid(pid, &status, 0) < 0 {
        if errno != EINTR { return -1 }
    }
    return exitCode(status)
}

/// Decodes a waitpid status (the W* macros do not import into Swift).
func exitCode(_ status: Int32) -> Int32 {
    let signal = status & 0x7f
    return signal == 0 ? (status >> 8) & 0xff : 128 + signal
}

/// The exit code of `pid` if it has already ended (reaping it), nil while it runs.
func exitedYet(_ pid: pid_t) -> Int32? {
    var status: Int32 = 0
    return waitpid(pid, &status, WNOHANG) == pid ? exitCode(status) : nil
}

/// Reads from `fd` until a newline, EOF or `deadline`; returns the line without its newline.
func readLine(from fd: Int32, until deadline: MonotonicInstant) -> String? {
    var bytes: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 256)
    while bytes.count < 4096 {
        var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        let ready = poll(&pfd, 1, millisecondsLeft(deadline))
        if ready < 0 && errno == EINTR { continue }
        if ready <= 0 { return nil }  // timeout or error
        let n = read(fd, &buffer, buffer.count)
        if n < 0 && errno == EINTR { continue }
        if n <= 0 { return nil }  // EOF: the child closed it (or died) before a full line
        bytes += buffer[0..<n]
        if let nl = bytes.firstIndex(of: UInt8(ascii: "\n")) { return String(decoding: bytes[..<nl], as: UTF8.self) }
    }
    return nil
}

/// Everything readable from `fd` until EOF or `deadline` (at most 64 KiB).
func readAll(from fd: Int32, until deadline: MonotonicInstant) -> String {
    var bytes: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 4096)
    while bytes.count < 65_536 {
        var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        let ready = poll(&pfd, 1, millisecondsLeft(deadline))
        if ready < 0 && errno == EINTR { continue }
        if ready <= 0 { break }
        let n = read(fd, &buffer, buffer.count)
        if n < 0 && errno == EINTR { continue }
        if n <= 0 { break }
        bytes += buffer[0..<n]
    }
    return String(decoding: bytes, as: UTF8.self)
}

/// The whole text of a small file (a /proc file or a log), or "" when unreadable.
func readFile(_ path: String) -> String {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return "" }
    defer { close(fd) }
    var bytes: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 4096)
    while bytes.count < 1 << 20 {
        let n = read(fd, &buffer, buffer.count)
        if n < 0 && errno == EINTR { continue }
        if n <= 0 { break }
        bytes += buffer[0..<n]
    }
    return String(decoding: bytes, as: UTF8.self)
}

/// A `kB` field of /proc/PID/status (e.g. "VmHWM", the peak RSS) in KiB; nil when absent.
func procStatusKiB(_ pid: pid_t, _ field: String) -> Int? {
    for line in readFile("/proc/\(pid)/status").split(separator: "\n") where line.hasPrefix(field + ":") {
        return line.dropFirst(field.count + 1).split(whereSeparator: { $0 == " " || $0 == "\t" }).first.flatMap { Int($0) }
    }
    return nil
}

/// The directory of the running executable (dirname of /proc/self/exe).
func executableDirectory() throws -> String {
    var buffer = [CChar](repeating: 0, count: 4096)
    let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
    guard n > 0 else { throw BenchError("cannot read /proc/self/exe: errno \(errno)") }
    let path = String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    guard let slash = path.lastIndex(of: "/") else { return "." }
    return String(path[..<slash])
}

/// A TCP port on 127.0.0.1 that is free right now: bind port 0, read the port, close.
/// (No connection was ever made, so nothing lingers in TIME_WAIT.)
func freeLoopbackPort() throws -> UInt16 {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard fd >= 0 else { throw BenchError("socket failed: errno \(errno)") }
    defer { close(fd) }
    var sa = sockaddr_in()
    sa.sin_family = sa_family_t(AF_INET)
    sa.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
    var len = socklen_t(MemoryLayout<sockaddr_in>.size)
    let ok = withUnsafeMutablePointer(to: &sa) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) == 0 && getsockname(fd, $0, &len) == 0 }
    }
    guard ok else { throw BenchError("cannot find a free loopback port: errno \(errno)") }
    return UInt16(bigEndian: sa.sin_port)
}

// MARK: - CPU affinity

/// `sched_getaffinity`/`sched_setaffinity` have the signature below; Swift's Glibc module is
/// built without _GNU_SOURCE and does not declare them (doc/platform-notes.md), and this target
/// has no C shim of its own, so they are looked up in the already-loaded C library with dlsym.
private typealias AffinityCall = @convention(c) (pid_t, Int, UnsafeMutableRawPointer?) -> Int32

/// The C library's `name` (one of the two affinity calls), or nil if it cannot be found.
private func affinityCall(_ name: String) -> AffinityCall? {
    guard let symbol = dlsym(nil, name) else { return nil }  // nil handle = RTLD_DEFAULT
    return unsafeBitCast(symbol, to: AffinityCall.self)
}

/// The CPUs this process may run on, lowest first (empty when unknown).
func allowedCPUs() -> [Int] {
    guard let get = affinityCall("sched_getaffinity") else { return [] }
    var set = cpu_set_t()
    let size = MemoryLayout<cpu_set_t>.size
    guard withUnsafeMutableBytes(of: &set, { get(0, size, $0.baseAddress) }) == 0 else { return [] }
    return withUnsafeBytes(of: &set) { raw in
        (0..<(size * 8)).filter { raw[$0 / 8] & (1 << UInt8($0 % 8)) != 0 }
    }
}

/// Pins this process (and so every child it spawns later, which inherits the mask) to `cpu`.
func pin(toCPU cpu: Int) throws {
    guard let set = affinityCall("sched_setaffinity") else { throw BenchError("sched_setaffinity not found in the C library") }
    var mask = cpu_set_t()
    let size = MemoryLayout<cpu_set_t>.size
    guard cpu >= 0, cpu < size * 8 else { throw BenchError("no CPU \(cpu)") }
    withUnsafeMutableBytes(of: &mask) { $0[cpu / 8] = 1 << UInt8(cpu % 8) }
    guard withUnsafeMutableBytes(of: &mask, { set(0, size, $0.baseAddress) }) == 0 else {
        throw BenchError("cannot pin to CPU \(cpu): errno \(errno)")
    }
}

// SPDX-License-Identifier: GPL-2.0-or-later

// Syscalls: the one funnel through which pesto calls the kernel.
//
// Theory of operation
// -------------------
// Every system call of the engine, the service and the command-line tool goes through a
// wrapper here, and every wrapper goes through `Sys.call`, the only place that reads `errno`.
// A wrapper returns `Result<T, Errno>` (or, on the relays' hot paths, an enum of the outcomes
// the caller decides on, such as `SpliceResult`); neither allocates nor throws an existential.
// `Sys.call`:
//   - retries EINTR where the call is restartable (everything but close(2));
//   - traps on errnos that can only mean a bug in this program (EBADF, EFAULT): those are
//     programmer errors, not conditions of the environment. A wrapper whose EBADF is a
//     condition of the environment (EPOLL_CTL_DEL of a descriptor libdbus already closed)
//     says so with `badDescriptorIsBug: false`;
//   - in DEBUG builds only, first asks the calling thread's `SyscallScript` (SyscallScript.swift)
//     whether the call is to fail, and with which errno: the test seam. In release builds the
//     check is compiled out, so the funnel costs nothing.
// Results that a caller may ignore without consequence (TCP_NODELAY, the pipe size) are
// ignored explicitly, with the reason, at the call site.

import CPestoSys
import PestoModel

#if canImport(Glibc)
    import Glibc
#endif

/// Raw system calls, each returning the kernel's errno as a value.
package enum Sys {
    /// Which call a wrapper makes, for the debug-only `SyscallScript`.
    package enum Name: String, Sendable, Hashable, CaseIterable {
        case socket, setsockopt, getsockopt, getsockname, getpeername, bind, listen, accept, connect, shutdown
        case send, recv, sendto, recvfrom, sendmsg, recvmsg
        case splice, pipe, fcntl, close
        case open, read, write, fsync, stat, fstat, lstat, unlink, rename, link, access
        case mkdir
        case setns, getrlimit, setrlimit, signals, spawn, waitpid, kill, readlink
        case epollCreate, epollCtl, epollWait, eventfd
        case clockGettime
        case setpriority
    }

    /// Runs `body` until it returns something other than -1/EINTR; -1 becomes `.failure(errno)`.
    ///
    /// `fd` and `detail` describe the call to a `SyscallScript` (debug builds); `detail` is the
    /// epoll data for epoll_ctl, so a script can pick a kind of source.
    @inline(__always)
    package static func call<T: FixedWidthInteger>(
        _ name: Name, fd: Int32 = -1, detail: UInt64 = 0, retryOnInterrupt: Bool = true, badDescriptorIsBug: Bool = true,
        mockable: Bool = true, _ body: () -> T
    ) -> Result<T, Errno> {
        while true {
            let e: Errno
            #if DEBUG
                if mockable, let injected = SyscallScript.failure(name, fd: fd, detail: detail) {
                    e = injected
                } else {
                    let r = body()
                    if r != -1 { return .success(r) }
                    e = Errno.current
                }
            #else
                let r = body()
                if r != -1 { return .success(r) }
                e = Errno.current
            #endif
            if e == .interrupted && retryOnInterrupt { continue }
            precondition(!badDescriptorIsBug || e != .badFileDescriptor, "programmer error: \(name) on descriptor \(fd) gave EBADF")
            precondition(e != .badAddress, "programmer error: \(name) gave EFAULT")
            return .failure(e)
        }
    }

    /// Records a new descriptor with the thread's script (debug builds), for leak checks.
    @inline(__always)
    static func opened(_ fd: Int32) -> Int32 {
        #if DEBUG
            SyscallScript.opened(fd)
        #endif
        return fd
    }

    // MARK: Sockets

    /// `socket(2)` with close-on-exec (and, unless `blocking`, non-blocking) set atomically.
    package static func socket(domain: Int32, type: Int32, blocking: Bool = false) -> Result<Int32, Errno> {
        let flags = Int32(SOCK_CLOEXEC.rawValue) | (blocking ? 0 : Int32(SOCK_NONBLOCK.rawValue))
        return call(.socket) { Glibc.socket(domain, type | flags, 0) }.map(opened)
    }

    /// `setsockopt(2)` for an `Int32` option value.
    package static func setOption(_ fd: Int32, level: Int32, name: Int32, value: Int32) -> Result<Void, Errno> {
        var v = value
        return call(.setsockopt, fd: fd) { Glibc.setsockopt(fd, level, name, &v, socklen_t(MemoryLayout<Int32>.size)) }
            .map { _ in () }
    }

    /// `setsockopt(SO_BINDTODEVICE)`.
    package static func bindToDevice(_ fd: Int32, interface: String) -> Result<Void, Errno> {
        var bytes = Array(interface.utf8)
        bytes.append(0)
        return call(.setsockopt, fd: fd) { Glibc.setsockopt(fd, SOL_SOCKET, SO_BINDTODEVICE, &bytes, socklen_t(bytes.count)) }
            .map { _ in () }
    }

    /// `setsockopt(SO_LINGER)` with a zero timeout: close(2) then sends a RST, not a FIN.
    package static func setResetOnClose(_ fd: Int32) -> Result<Void, Errno> {
        var linger = Glibc.linger(l_onoff: 1, l_linger: 0)
        return call(.setsockopt, fd: fd) {
            Glibc.setsockopt(fd, SOL_SOCKET, SO_LINGER, &linger, socklen_t(MemoryLayout<Glibc.linger>.size))
        }.map { _ in () }
    }

    /// `getsockopt(SO_ERROR)`: the socket's pending error (which reading clears); nil for none.
    /// A failure of getsockopt itself is returned as `.failure`.
    package static func pendingError(_ fd: Int32) -> Result<Errno?, Errno> {
        var err: Int32 = 0
        var len = socklen_t(MemoryLayout<Int32>.size)
        return call(.getsockopt, fd: fd) { Glibc.getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) }
            .map { _ in err == 0 ? nil : Errno(rawValue: err) }
    }

    /// `bind(2)` to an address and port; IPv4 addresses on an IPv6 socket are given IPv4-mapped.
    package static func bind(_ fd: Int32, domain: Int32, address: IPAddress, port: UInt16) -> Result<Void, Errno> {
        bind(fd, to: SocketAddress(address, port: port, mappedIPv6: domain == AF_INET6))
    }

    /// `bind(2)` to a socket address.
    package static func bind(_ fd: Int32, to address: SocketAddress) -> Result<Void, Errno> {
        address.withSockaddr { sa, len in call(.bind, fd: fd) { Glibc.bind(fd, sa, len) } }.map { _ in () }
    }

    /// `getsockname(2)`: the address a socket is bound to (for an accepted connection, the
    /// address and port the client connected to).
    package static func localAddress(_ fd: Int32) -> Result<SocketAddress, Errno> {
        var address = SocketAddress()
        return address.withMutableSockaddr { sa, len in call(.getsockname, fd: fd) { Glibc.getsockname(fd, sa, len) } }
            .map { _ in address }
    }

    /// `getpeername(2)`: the address a connected socket is connected to.
    package static func peerAddress(_ fd: Int32) -> Result<SocketAddress, Errno> {
        var address = SocketAddress()
        return address.withMutableSockaddr { sa, len in call(.getpeername, fd: fd) { Glibc.getpeername(fd, sa, len) } }
            .map { _ in address }
    }

    /// `listen(2)`.
    package static func listen(_ fd: Int32, backlog: Int32) -> Result<Void, Errno> {
        call(.listen, fd: fd) { Glibc.listen(fd, backlog) }.map { _ in () }
    }

    /// `accept4(2)`, non-blocking and close-on-exec; the peer's address goes to `peer` if given.
    package static func accept(_ fd: Int32, peer: UnsafeMutablePointer<SocketAddress>? = nil) -> Result<Int32, Errno> {
        let flags = Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue)
        if let peer {
            return peer.pointee.withMutableSockaddr { sa, len in call(.accept, fd: fd) { pesto_accept4(fd, sa, len, flags) } }
                .map(opened)
        }
        return call(.accept, fd: fd) { pesto_accept4(fd, nil, nil, flags) }.map(opened)
    }

    /// What a non-blocking `connect(2)` did.
    package enum ConnectResult: Equatable, Sendable {
        /// The connection is established.
        case connected
        /// The handshake goes on (EINPROGRESS, or EALREADY when asked again): wait for EPOLLOUT.
        case inProgress
        /// The connection failed.
        case failed(Errno)
    }

    /// `connect(2)` on a non-blocking socket. Asking again while the first attempt is in
    /// progress says whether it has completed meanwhile (0, or the failure) or not (EALREADY).
    package static func connect(_ fd: Int32, to address: SocketAddress) -> ConnectResult {
        // EINTR is not retried: the connection goes on in the background, as after EINPROGRESS.
        let r = address.withSockaddr { sa, len in call(.connect, fd: fd, retryOnInterrupt: false) { Glibc.connect(fd, sa, len) } }
        switch r {
        case .success: return .connected
        case .failure(let e) where e == .inProgress || e == .alreadyInProgress || e == .interrupted: return .inProgress
        case .failure(let e) where e == .alreadyConnected: return .connected
        case .failure(let e): return .failed(e)
        }
    }

    /// `shutdown(2)`.
    package static func shutdown(_ fd: Int32, _ how: Int32) -> Result<Void, Errno> {
        call(.shutdown, fd: fd) { Glibc.shutdown(fd, how) }.map { _ in () }
    }

    /// `send(2)`.
    package static func send(_ fd: Int32, _ bytes: UnsafeRawPointer?, _ count: Int, flags: Int32) -> Result<Int, Errno> {
        call(.send, fd: fd) { Glibc.send(fd, bytes, count, flags) }
    }

    /// `recv(2)`.
    package static func recv(_ fd: Int32, _ bytes: UnsafeMutableRawPointer?, _ count: Int, flags: Int32) -> Result<Int, Errno> {
        call(.recv, fd: fd) { Glibc.recv(fd, bytes, count, flags) }
    }

    /// `sendto(2)`.
    package static func sendTo(
        _ fd: Int32, _ bytes: UnsafeRawPointer?, _ count: Int, flags: Int32, to address: SocketAddress
    ) -> Result<Int, Errno> {
        address.withSockaddr { sa, len in call(.sendto, fd: fd) { Glibc.sendto(fd, bytes, count, flags, sa, len) } }
    }

    /// `recvfrom(2)`; the sender's address goes to `from`.
    package static func receiveFrom(
        _ fd: Int32, _ bytes: UnsafeMutableRawPointer?, _ count: Int, flags: Int32, from: inout SocketAddress
    ) -> Result<Int, Errno> {
        from.withMutableSockaddr { sa, len in call(.recvfrom, fd: fd) { Glibc.recvfrom(fd, bytes, count, flags, sa, len) } }
    }

    /// `sendmsg(2)` of `bytes` with `descriptors` (at most `maxDescriptorsPerMessage`) as one
    /// SCM_RIGHTS message, MSG_NOSIGNAL; returns the bytes sent. The descriptors stay open here.
    package static func sendDescriptors(_ fd: Int32, _ bytes: UnsafeRawBufferPointer, _ descriptors: [Int32]) -> Result<Int, Errno> {
        precondition(descriptors.count <= maxDescriptorsPerMessage, "programmer error: too many descriptors for one message")
        return descriptors.withUnsafeBufferPointer { fds in
            call(.sendmsg, fd: fd) { pesto_send_fds(fd, bytes.baseAddress!, bytes.count, fds.baseAddress, Int32(fds.count)) }
        }
    }

    /// The most descriptors `sendDescriptors` takes at once.
    package static let maxDescriptorsPerMessage = Int(PESTO_MAX_FDS_PER_MESSAGE)

    /// `recvmsg(2)` into `buffer` with up to `maxDescriptorsPerMessage` descriptors
    /// (close-on-exec); returns the bytes read (0 at end of file) and the descriptors received,
    /// which the caller now owns. More descriptors than that, or a truncated control message,
    /// fail with EMSGSIZE and leave none open.
    package static func receiveDescriptors(_ fd: Int32, into buffer: UnsafeMutableRawBufferPointer) -> Result<
        (count: Int, descriptors: [Int32]), Errno
    > {
        var fds = [Int32](repeating: -1, count: maxDescriptorsPerMessage)
        var received: Int32 = 0
        let r = fds.withUnsafeMutableBufferPointer { p in
            call(.recvmsg, fd: fd) { pesto_recv_fds(fd, buffer.baseAddress!, buffer.count, p.baseAddress!, Int32(p.count), &received) }
        }
        return r.map { n in (n, fds.prefix(Int(received)).map(opened)) }
    }

    /// `getsockopt(2)` of an `Int32` option (SO_TYPE, SO_ACCEPTCONN, SO_DOMAIN).
    package static func option(_ fd: Int32, level: Int32, name: Int32) -> Result<Int32, Errno> {
        var value: Int32 = 0
        var len = socklen_t(MemoryLayout<Int32>.size)
        return call(.getsockopt, fd: fd) { Glibc.getsockopt(fd, level, name, &value, &len) }.map { _ in value }
    }

    /// `setsockopt(SO_RCVTIMEO and SO_SNDTIMEO)`: blocking reads and writes on `fd` fail with
    /// EAGAIN after `milliseconds`.
    package static func setTimeouts(_ fd: Int32, milliseconds: Int) -> Result<Void, Errno> {
        var tv = timeval(tv_sec: milliseconds / 1000, tv_usec: (milliseconds % 1000) * 1000)
        let size = socklen_t(MemoryLayout<timeval>.size)
        return call(.setsockopt, fd: fd) { Glibc.setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, size) }
            .flatMap { _ in call(.setsockopt, fd: fd) { Glibc.setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, size) } }
            .map { _ in () }
    }

    /// `fcntl(F_SETFL)`: makes `fd` blocking (reads and writes wait, up to `setTimeouts`).
    package static func setBlocking(_ fd: Int32) -> Result<Void, Errno> {
        call(.fcntl, fd: fd) { fcntl(fd, F_GETFL) }
            .flatMap { flags in call(.fcntl, fd: fd) { fcntl(fd, F_SETFL, flags & ~Int32(PESTO_O_NONBLOCK)) } }
            .map { _ in () }
    }

    // MARK: Pipes and splice

    /// What one `splice(2)` did, for the relay's state machine.
    package enum SpliceResult: Equatable, Sendable {
        /// This many bytes moved (more than 0).
        case moved(Int)
        /// The source is at end of file (splice returned 0).
        case endOfFile
        /// Nothing can move now (EAGAIN): wait for readiness.
        case wouldBlock
        /// Any other error: the connection cannot go on.
        case failed(Errno)
    }

    /// `splice(2)` of at most `count` bytes from `source` to `destination`, moving pages and
    /// never blocking.
    @inline(__always)
    package static func splice(from source: Int32, to destination: Int32, count: Int) -> SpliceResult {
        let flags = UInt32(PESTO_SPLICE_F_MOVE | PESTO_SPLICE_F_NONBLOCK)
        switch call(
            .splice, fd: source, detail: UInt64(UInt32(bitPattern: destination)), { pesto_splice(source, destination, count, flags) })
        {
        case .success(0): return .endOfFile
        case .success(let n): return .moved(n)
        case .failure(let e) where e == .wouldBlock: return .wouldBlock
        case .failure(let e): return .failed(e)
        }
    }

    /// `pipe2(2)`, non-blocking and close-on-exec: (read end, write end).
    package static func pipe() -> Result<(read: Int32, write: Int32), Errno> {
        var fds: (Int32, Int32) = (-1, -1)
        let r = withUnsafeMutableBytes(of: &fds) { raw in
            call(.pipe) {
                pesto_pipe2(raw.baseAddress!.assumingMemoryBound(to: Int32.self), Int32(PESTO_O_NONBLOCK) | Int32(PESTO_O_CLOEXEC))
            }
        }
        return r.map { _ in (opened(fds.0), opened(fds.1)) }
    }

    /// `fcntl(F_SETPIPE_SZ)`: asks for a pipe capacity; returns the capacity granted.
    package static func setPipeSize(_ fd: Int32, _ size: Int32) -> Result<Int32, Errno> {
        call(.fcntl, fd: fd) { fcntl(fd, Int32(PESTO_F_SETPIPE_SZ), size) }
    }

    // MARK: Descriptors and files

    /// `close(2)`. EINTR is not retried: on Linux the descriptor is gone either way; any other
    /// error (EIO on a file) has no one to be reported to, as the descriptor is gone too. A
    /// script cannot make it fail (the descriptor would stay open behind the test's back).
    package static func close(_ fd: Int32) {
        #if DEBUG
            SyscallScript.closed(fd)
        #endif
        _ = call(.close, fd: fd, retryOnInterrupt: false, mockable: false) { Glibc.close(fd) }
    }

    /// `open(2)` with close-on-exec; `mode` for files it creates.
    package static func open(_ path: String, _ flags: Int32, mode: mode_t = 0) -> Result<Int32, Errno> {
        call(.open) { Glibc.open(path, flags | O_CLOEXEC, mode) }.map(opened)
    }

    /// `read(2)`.
    package static func read(_ fd: Int32, _ bytes: UnsafeMutableRawPointer?, _ count: Int) -> Result<Int, Errno> {
        call(.read, fd: fd) { Glibc.read(fd, bytes, count) }
    }

    /// `write(2)`. With `mayBeClosed` (stderr, which the caller's parent may have closed),
    /// EBADF is returned instead of trapping.
    package static func write(_ fd: Int32, _ bytes: UnsafeRawPointer?, _ count: Int, mayBeClosed: Bool = false) -> Result<Int, Errno> {
        call(.write, fd: fd, badDescriptorIsBug: !mayBeClosed) { Glibc.write(fd, bytes, count) }
    }

    /// `fsync(2)`.
    package static func fsync(_ fd: Int32) -> Result<Void, Errno> {
        call(.fsync, fd: fd) { Glibc.fsync(fd) }.map { _ in () }
    }

    /// `fstat(2)`.
    package static func fstat(_ fd: Int32) -> Result<stat, Errno> {
        var st = Glibc.stat()
        return call(.fstat, fd: fd) { Glibc.fstat(fd, &st) }.map { _ in st }
    }

    /// `stat(2)` (follows symbolic links).
    package static func stat(_ path: String) -> Result<stat, Errno> {
        var st = Glibc.stat()
        return call(.stat) { statPath(path, &st) }.map { _ in st }
    }

    /// `mkdir(2)`.
    package static func mkdir(_ path: String, mode: mode_t) -> Result<Void, Errno> {
        call(.mkdir) { Glibc.mkdir(path, mode) }.map { _ in () }
    }

    /// `lstat(2)` (does not follow symbolic links).
    package static func lstat(_ path: String) -> Result<stat, Errno> {
        var st = Glibc.stat()
        return call(.lstat) { Glibc.lstat(path, &st) }.map { _ in st }
    }

    /// `unlink(2)`.
    package static func unlink(_ path: String) -> Result<Void, Errno> {
        call(.unlink) { Glibc.unlink(path) }.map { _ in () }
    }

    /// `rename(2)`.
    package static func rename(_ from: String, to: String) -> Result<Void, Errno> {
        call(.rename) { Glibc.rename(from, to) }.map { _ in () }
    }

    /// `link(2)`.
    package static func link(_ from: String, to: String) -> Result<Void, Errno> {
        call(.link) { Glibc.link(from, to) }.map { _ in () }
    }

    /// `access(2)` with F_OK: whether something exists at `path` (nil error: it does).
    package static func exists(_ path: String) -> Result<Void, Errno> {
        call(.access) { Glibc.access(path, F_OK) }.map { _ in () }
    }

    // MARK: Process

    /// `setns(2)` into the network namespace behind `fd`.
    package static func enterNetworkNamespace(_ fd: Int32) -> Result<Void, Errno> {
        call(.setns, fd: fd) { pesto_setns(fd, Int32(PESTO_CLONE_NEWNET)) }.map { _ in () }
    }

    /// `getrlimit(RLIMIT_NOFILE)`.
    package static func openFileLimit() -> Result<rlimit, Errno> {
        var limit = rlimit()
        return call(.getrlimit) { getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) }.map { _ in limit }
    }

    /// `setrlimit(RLIMIT_NOFILE)`.
    package static func setOpenFileLimit(_ limit: rlimit) -> Result<Void, Errno> {
        var limit = limit
        return call(.setrlimit) { setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) }.map { _ in () }
    }

    /// `clock_gettime(CLOCK_MONOTONIC)` in nanoseconds. It cannot fail for that clock and a
    /// valid buffer (EINVAL, EFAULT would be bugs), so it traps instead, and a script cannot
    /// fail it: every timer and timeout reads it.
    package static func monotonicNanoseconds() -> UInt64 {
        var ts = timespec()
        guard case .success = call(.clockGettime, mockable: false, { clock_gettime(CLOCK_MONOTONIC, &ts) }) else {
            preconditionFailure("clock_gettime(CLOCK_MONOTONIC) failed")
        }
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    /// Makes SIGTERM, SIGINT and SIGHUP write to the eventfd `fd` and ignores SIGPIPE
    /// (`pesto_stop_on_signals`: sigaction and pthread_sigmask).
    package static func stopOnSignals(writingTo fd: Int32) -> Result<Void, Errno> {
        call(.signals, fd: fd) { pesto_stop_on_signals(fd) }.map { _ in () }
    }

    /// Makes SIGUSR2 write to the eventfd `fd` (`pesto_upgrade_on_signal`): the upgrade request.
    /// With `fd` -1, SIGUSR2 is caught and does nothing (its default action would end pestod).
    package static func upgradeOnSignal(writingTo fd: Int32) -> Result<Void, Errno> {
        call(.signals, fd: fd) { pesto_upgrade_on_signal(fd) }.map { _ in () }
    }

    // MARK: Processes (the upgrade, UpgradeRequest.swift)

    /// The path of this process's executable (readlink of /proc/self/exe). Read at start, it
    /// names the installed binary: an upgrade that replaces the file (rename) leaves the path
    /// naming the new one.
    package static func executablePath() -> Result<String, Errno> {
        readLink("/proc/self/exe").map { path in
            path.hasSuffix(" (deleted)") ? String(path.dropLast(" (deleted)".count)) : path
        }
    }

    /// The target of the symbolic link `path` (readlink(2)).
    package static func readLink(_ path: String) -> Result<String, Errno> {
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        return call(.readlink) { readlink(path, &buffer, buffer.count - 1) }.map { n in
            String(decoding: buffer[..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        }
    }

    /// The names in directory `path` (open(2) with O_DIRECTORY, then readdir(3)), without
    /// "." and "..": `pestod --reload-request` lists a process's /proc/PID/fd with it.
    package static func directoryEntries(_ path: String) -> Result<[String], Errno> {
        let fd: Int32
        switch open(path, O_RDONLY | O_DIRECTORY) {
        case .success(let opened): fd = opened
        case .failure(let e): return .failure(e)
        }
        guard let directory = fdopendir(fd) else {
            let e = Errno.current
            close(fd)
            return .failure(e)
        }
        defer {
            #if DEBUG
                SyscallScript.closed(fd)
            #endif
            closedir(directory)  // closes fd
        }
        var names: [String] = []
        while let entry = readdir(directory) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
            }
            if name != "." && name != ".." { names.append(name) }
        }
        return .success(names)
    }

    /// Starts `path` with `arguments` (argv[0] is `path`), this process's environment and
    /// standard descriptors, no other descriptor (closefrom 3), an empty signal mask and
    /// default dispositions; returns its PID.
    package static func spawn(_ path: String, _ arguments: [String]) -> Result<pid_t, Errno> {
        var argv: [UnsafeMutablePointer<CChar>?] = ([path] + arguments).map { strdup($0) } + [nil]
        defer { for p in argv { free(p) } }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        pesto_spawn_closefrom(&actions, 3)
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        var empty = sigset_t()
        sigemptyset(&empty)
        posix_spawnattr_setsigmask(&attr, &empty)
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for s in [SIGINT, SIGTERM, SIGHUP, SIGPIPE, SIGUSR2] { sigaddset(&defaults, s) }
        posix_spawnattr_setsigdefault(&attr, &defaults)
        posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, path, &actions, &attr, &argv, environ)
        return rc == 0 ? .success(pid) : .failure(Errno(rawValue: rc))
    }

    /// waitpid(WNOHANG): nil while `pid` runs, else its exit status (128 + signal when killed).
    package static func reap(_ pid: pid_t) -> Result<Int32?, Errno> {
        var status: Int32 = 0
        return call(.waitpid) { waitpid(pid, &status, WNOHANG) }.map { r in
            guard r == pid else { return nil }
            let signal = status & 0x7F
            return signal == 0 ? (status >> 8) & 0xFF : 128 + signal
        }
    }

    /// kill(2).
    package static func kill(_ pid: pid_t, _ signal: Int32) -> Result<Void, Errno> {
        call(.kill) { Glibc.kill(pid, signal) }.map { _ in () }
    }

    // MARK: epoll

    /// `epoll_create1(EPOLL_CLOEXEC)`.
    package static func epollCreate() -> Result<Int32, Errno> {
        call(.epollCreate) { epoll_create1(Int32(EPOLL_CLOEXEC)) }.map(opened)
    }

    /// `setpriority(2)` of the calling thread alone (Linux: PRIO_PROCESS with who 0 is the
    /// calling task): its nice value becomes `nice` (a helper thread yields the CPU to the loop).
    package static func setThreadNice(_ nice: Int32) -> Result<Void, Errno> {
        call(.setpriority) { Glibc.setpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0, nice) }.map { _ in () }
    }

    /// `eventfd(2)`, non-blocking and close-on-exec.
    package static func eventFD() -> Result<Int32, Errno> {
        call(.eventfd) { eventfd(0, Int32(EFD_CLOEXEC) | Int32(EFD_NONBLOCK)) }.map(opened)
    }

    /// `epoll_ctl(2)` ADD or MOD with `events` and the 64-bit `data`. ENOSPC (at
    /// `fs.epoll.max_user_watches`) and ENOMEM are the environment's; ENOENT on MOD tells a
    /// caller that keeps no record of it that the descriptor is not watched (the engine's
    /// resume of a paused listener); EBADF traps.
    package static func epollWatch(_ epfd: Int32, _ op: Int32, fd: Int32, events: UInt32, data: UInt64) -> Result<Void, Errno> {
        var ev = epoll_event()
        ev.events = events
        ev.data.u64 = data
        return call(.epollCtl, fd: fd, detail: data) { epoll_ctl(epfd, op, fd, &ev) }.map { _ in () }
    }

    /// `epoll_ctl(EPOLL_CTL_DEL)`. EBADF and ENOENT are not bugs here: the descriptor may
    /// already be closed (libdbus closes before it removes its watch), which removed it.
    package static func epollUnwatch(_ epfd: Int32, fd: Int32) -> Result<Void, Errno> {
        var ev = epoll_event()
        return call(.epollCtl, fd: fd, badDescriptorIsBug: false) { epoll_ctl(epfd, EPOLL_CTL_DEL, fd, &ev) }.map { _ in () }
    }

    /// `epoll_wait(2)` into `events`; EINTR is returned (as `.failure`), not retried, so the
    /// loop recomputes its timeout.
    package static func epollWait(_ epfd: Int32, _ events: UnsafeMutableBufferPointer<epoll_event>, timeout: Int32) -> Result<Int, Errno> {
        call(.epollWait, fd: epfd, retryOnInterrupt: false) { epoll_wait(epfd, events.baseAddress, Int32(events.count), timeout) }
            .map { Int($0) }
    }
}

/// stat(2) by path; outside `Sys`, where `stat` names the wrapper, not the C function.
private func statPath(_ path: String, _ st: inout stat) -> Int32 { stat(path, &st) }

// SPDX-License-Identifier: GPL-2.0-or-later

// NetworkNamespace: making sockets inside another network namespace from the loop thread.
//
// A socket keeps the network namespace it was created in, whatever thread uses it later.
// So the loop thread creates a socket for a namespace by entering it with setns(2),
// calling socket() (and, for listeners, bind/listen), and returning to its own namespace
// at once. Only CLONE_NEWNET is entered, which is allowed in a multi-threaded process;
// the loop thread is a dedicated thread (never a pooled one), as setns requires.

import CPestoSys
import PestoModel
import PestoSystem

#if canImport(Glibc)
    import Glibc
#endif

/// A network namespace the engine can create sockets in (and the one it came from).
public final class NetworkNamespace {
    /// The path it was opened from (`/run/netns/NAME`, `/proc/PID/ns/net`).
    public let path: String
    private let targetFD: Int32
    private let homeFD: Int32

    /// Opens the namespace at `path` and remembers the calling thread's own.
    public init(path: String) throws(PestoError) {
        self.path = path
        let target: Int32
        switch Sys.open(path, O_RDONLY) {
        case .success(let fd): target = fd
        case .failure(let e): throw PestoError(.system, "Cannot open the network namespace \(path).", underlyingError: e)
        }
        let home: Int32
        switch Sys.open("/proc/thread-self/ns/net", O_RDONLY) {
        case .success(let fd): home = fd
        case .failure(let e):
            Sys.close(target)
            throw PestoError(.system, "Cannot open this thread's network namespace.", underlyingError: e)
        }
        targetFD = target
        homeFD = home
        // Prove now, not on the first connection, that we may enter it.
        if case .failure(let e) = Sys.enterNetworkNamespace(targetFD) {
            // Every stored property is set, so throwing runs deinit, which closes both
            // descriptors: closing them here too trapped on the second close (EBADF).
            throw PestoError(.system, "Cannot enter the network namespace \(path) (is it one, and are we allowed?).", underlyingError: e)
        }
        enterHome()
    }

    deinit {
        Sys.close(targetFD)
        Sys.close(homeFD)
    }

    private func enterHome() {
        // Returning to the namespace we came from cannot fail unless the process is broken.
        if case .failure(let e) = Sys.enterNetworkNamespace(homeFD) {
            preconditionFailure("cannot return to the home network namespace: \(e)")
        }
    }

    /// Whether `path` still names the namespace pestod holds (false once `ip netns del`
    /// removed it or the process of /proc/PID/ns/net exited). One stat(2); allocates nothing.
    public func isStillAtPath() -> Bool {
        guard case .success(let atPath) = Sys.stat(path), case .success(let held) = Sys.fstat(targetFD) else { return false }
        return atPath.st_dev == held.st_dev && atPath.st_ino == held.st_ino
    }

    /// Runs `body` inside the namespace, on this thread, and comes back.
    public func perform<T>(_ body: () -> T) -> T {
        if case .failure(let e) = Sys.enterNetworkNamespace(targetFD) {
            // The namespace fd is held open, so the namespace cannot vanish; EPERM after a
            // successful first entry would mean our capabilities were taken away.
            preconditionFailure("cannot enter the network namespace \(path): \(e)")
        }
        defer { enterHome() }
        return body()
    }
}

/// A listener factory that opens its sockets inside a network namespace.
public struct NamespacedListenerFactory: ListenerFactory {
    let namespace: NetworkNamespace
    let inner: KernelListenerFactory

    public init(namespace: NetworkNamespace, families: Capabilities) {
        self.namespace = namespace
        inner = KernelListenerFactory(families: families)
    }

    public func openListener(for rule: Rule, port: UInt16) -> Result<Int32, Errno> {
        namespace.perform { inner.openListener(for: rule, port: port) }
    }

    public func closeListener(_ fd: Int32) { inner.closeListener(fd) }
}

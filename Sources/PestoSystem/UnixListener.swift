// SPDX-License-Identifier: GPL-2.0-or-later

// UnixListener: a listening UNIX socket at a path only root may connect to, as pestod's
// control socket (upstream pesto clients) and takeover socket both need.

import CPestoSys
import PestoModel

#if canImport(Glibc)
    import Glibc
#endif

/// Opens listening UNIX sockets in the file system.
package enum UnixListener {
    /// Listens on `path` with a socket of `type` (SOCK_STREAM, SOCK_SEQPACKET): a stale socket
    /// file there is replaced (anything else at the path makes bind() fail), and the socket
    /// is created mode 0600, so only root may connect. `name` ("control socket") goes into
    /// the error messages.
    /// - Returns: the listening descriptor (close-on-exec, non-blocking).
    package static func open(path: String, type: Int32, backlog: Int32, name: String) throws(PestoError) -> Int32 {
        guard let address = SocketAddress(unixPath: path), !path.hasPrefix("@") else {
            throw PestoError(.system, "The \(name) path \(path) is not a usable path (at most 107 bytes).")
        }
        let fd: Int32
        switch Sys.socket(domain: AF_UNIX, type: type) {
        case .success(let s): fd = s
        case .failure(let e): throw PestoError(.system, "Cannot create the \(name).", underlyingError: e)
        }
        // A stale socket is replaced; should the unlink fail, bind() says so.
        if case .success(let st) = Sys.lstat(path), (st.st_mode & S_IFMT) == S_IFSOCK { _ = Sys.unlink(path) }
        let old = umask(0o077)
        let bound = Sys.bind(fd, to: address)
        umask(old)
        if case .failure(let e) = bound.flatMap({ Sys.listen(fd, backlog: backlog) }) {
            Sys.close(fd)
            throw PestoError(.system, "Cannot listen on the \(name) \(path).", underlyingError: e)
        }
        return fd
    }
}

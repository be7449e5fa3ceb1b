// SPDX-License-Identifier: GPL-2.0-or-later

// SystemdNotify: sd_notify(3)'s READY=1, without libsystemd.

import CPestoSys
import PestoDBus
import PestoEngine
import PestoModel

#if canImport(Glibc)
import Glibc
#endif

/// Tells the supervisor (systemd, or a test harness) that the service is ready.
public enum SystemdNotify {
    /// Sends `state` (e.g. "READY=1") to `$NOTIFY_SOCKET`, if set. Returns false when unset or unsent.
    @discardableResult
    public static func send(_ state: String) -> Bool {
        guard let pathC = getenv("NOTIFY_SOCKET"), let address = SocketAddress(unixPath: String(cString: pathC)) else {
            return false
        }
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        let bytes = Array(state.utf8)
        let sent = address.withSockaddr { sendto(fd, bytes, bytes.count, Int32(MSG_NOSIGNAL), $0, $1) }
        return sent == bytes.count
    }
}

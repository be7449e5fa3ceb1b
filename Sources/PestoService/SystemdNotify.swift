// SPDX-License-Identifier: GPL-2.0-or-later

// SystemdNotify: sd_notify(3)'s READY=1, without libsystemd.

import CPestoSys
import PestoDBus
import PestoEngine
import PestoModel
import PestoSystem

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
        guard case .success(let fd) = Sys.socket(domain: AF_UNIX, type: Int32(SOCK_DGRAM.rawValue), blocking: true) else { return false }
        defer { Sys.close(fd) }
        let bytes = Array(state.utf8)
        let sent = bytes.withUnsafeBytes { Sys.sendTo(fd, $0.baseAddress, bytes.count, flags: Int32(MSG_NOSIGNAL), to: address) }
        return (try? sent.get()) == bytes.count
    }
}

// SystemdNotify: sd_notify(3)'s READY=1, without libsystemd.

import CPestoSys

#if canImport(Glibc)
import Glibc
#endif

/// Tells the supervisor (systemd, or a test harness) that the service is ready.
public enum SystemdNotify {
    /// Sends `state` (e.g. "READY=1") to `$NOTIFY_SOCKET`, if set. Returns false when unset or unsent.
    @discardableResult
    public static func send(_ state: String) -> Bool {
        guard let pathC = getenv("NOTIFY_SOCKET") else { return false }
        var path = Array(String(cString: pathC).utf8)
        guard !path.isEmpty, path.count < 108 else { return false }
        if path[0] == UInt8(ascii: "@") { path[0] = 0 }  // abstract namespace
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in path.enumerated() { raw[i] = b }
        }
        let len = socklen_t(MemoryLayout<sa_family_t>.size + path.count)
        let bytes = Array(state.utf8)
        let sent = withUnsafePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
                sendto(fd, bytes, bytes.count, Int32(MSG_NOSIGNAL), sa, len)
            }
        }
        return sent == bytes.count
    }
}

// SPDX-License-Identifier: GPL-2.0-or-later

// FileReading: the one way the model, the engine and the service read a whole file.
//
// The model's only contact with the host: pasta's port-spec grammar leaves out the kernel's
// ephemeral port range (/proc/sys/net/ipv4/ip_local_port_range), which pestoctl and pestod
// both read through `EphemeralPortRange.current()`. Everything else here is pure.

#if canImport(Glibc)
import Glibc
#endif

/// Reads a whole file, /proc and /sys entries included (their size is not known in
/// advance, so the file is read until end of file rather than by its stat size).
/// - Returns: the bytes, or nil when the file cannot be opened or read, or is longer than
///   `limit` bytes (never a silently truncated prefix).
public func readFile(_ path: String, limit: Int) -> [UInt8]? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var buffer = [UInt8](repeating: 0, count: min(limit + 1, 4096))
    var used = 0
    while true {
        if used == buffer.count {
            guard buffer.count <= limit else { return nil }  // limit + 1 bytes read: too long
            buffer.append(contentsOf: repeatElement(0, count: min(buffer.count, limit + 1 - buffer.count)))
        }
        let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress! + used, $0.count - used) }
        if n < 0 {
            if errno == EINTR { continue }
            return nil
        }
        if n == 0 { break }
        used += n
    }
    guard used <= limit else { return nil }
    return Array(buffer[..<used])
}

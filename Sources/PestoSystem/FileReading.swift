// SPDX-License-Identifier: GPL-2.0-or-later

// FileReading: the one way the engine, the service and pestoctl read a whole file, and the
// host fact pasta's port-spec grammar needs: the kernel's ephemeral port range.

import PestoModel

#if canImport(Glibc)
    import Glibc
#endif

/// Reads a whole file, /proc and /sys entries included (their size is not known in
/// advance, so the file is read until end of file rather than by its stat size).
/// - Returns: the bytes, or nil when the file cannot be opened or read, or is longer than
///   `limit` bytes (never a silently truncated prefix).
public func readFile(_ path: String, limit: Int) -> [UInt8]? {
    try? readWholeFile(path, limit: limit).get()
}

/// `readFile`, with the reason of a failure: the errno of open(2) or read(2), or EFBIG when
/// the file is longer than `limit` bytes.
public func readWholeFile(_ path: String, limit: Int) -> Result<[UInt8], Errno> {
    let fd: Int32
    switch Sys.open(path, O_RDONLY) {
    case .success(let opened): fd = opened
    case .failure(let e): return .failure(e)
    }
    defer { Sys.close(fd) }
    let tooLong = Errno(rawValue: EFBIG)
    var buffer = [UInt8](repeating: 0, count: min(limit + 1, 4096))
    var used = 0
    while true {
        if used == buffer.count {
            guard buffer.count <= limit else { return .failure(tooLong) }  // limit + 1 bytes read
            buffer.append(contentsOf: repeatElement(0, count: min(buffer.count, limit + 1 - buffer.count)))
        }
        let n: Int
        switch buffer.withUnsafeMutableBytes({ Sys.read(fd, $0.baseAddress! + used, $0.count - used) }) {
        case .success(let count): n = count
        case .failure(let e): return .failure(e)
        }
        if n == 0 { break }
        used += n
    }
    guard used <= limit else { return .failure(tooLong) }
    return .success(Array(buffer[..<used]))
}

extension EphemeralPortRange {
    /// Reads /proc/sys/net/ipv4/ip_local_port_range ("32768\t60999"); falls back to
    /// `fallback` when the file is unreadable or garbled.
    public static func current(path: String = "/proc/sys/net/ipv4/ip_local_port_range") -> ClosedRange<UInt16> {
        guard let bytes = readFile(path, limit: 128), let range = parse(bytes) else { return fallback }
        return range
    }
}

// SPDX-License-Identifier: GPL-2.0-or-later

// Files for tests and benchmarks without Foundation: a temporary directory removed with
// everything in it, whole files read as text and written, where the running executable is.

import PestoEngine
import PestoModel
import PestoSystem

#if canImport(Glibc)
    import Glibc
#endif

/// A fresh directory under /tmp, removed with its contents when the value goes away.
public final class TemporaryDirectory {
    public let path: String
    private var kept = false

    /// Creates /tmp/`prefix`XXXXXX, readable by all (tests run clients as an unprivileged user
    /// against a bus socket in it).
    public init(prefix: String = "pesto-test-") throws {
        var template = Array("/tmp/\(prefix)XXXXXX".utf8CString)
        guard let p = mkdtemp(&template) else { throw HarnessError("cannot create a temp dir: \(Errno.current)") }
        path = String(cString: p)
        chmod(path, 0o755)
    }

    deinit { if !kept { Self.remove(path) } }

    /// Leaves the directory in place when the value goes away (for a look at its logs).
    public func keep() { kept = true }

    /// `path` + "/" + `name`.
    public func file(_ name: String) -> String { path + "/" + name }

    /// Removes `path` and, when it is a directory, everything below it (links are not followed).
    public static func remove(_ path: String) {
        var st = stat()
        guard lstat(path, &st) == 0 else { return }
        guard st.st_mode & S_IFMT == S_IFDIR else {
            unlink(path)
            return
        }
        if let dir = opendir(path) {
            var names: [String] = []
            while let entry = readdir(dir) {
                let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
                if name != "." && name != ".." { names.append(name) }
            }
            closedir(dir)
            for name in names { remove(path + "/" + name) }
        }
        rmdir(path)
    }
}

/// The whole text of a file of at most 64 MiB (a /proc file or a log; PestoModel's
/// `readFile`), or nil when it cannot be read.
public func readTextFile(_ path: String) -> String? {
    readFile(path, limit: 64 << 20).map { String(decoding: $0, as: UTF8.self) }
}

/// Creates (or truncates) `path` with `text`.
public func writeFile(_ path: String, _ text: String, mode: mode_t = 0o644) throws {
    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode)
    guard fd >= 0 else { throw HarnessError("cannot create \(path): \(Errno.current)") }
    defer { close(fd) }
    let bytes = Array(text.utf8)
    var off = 0
    while off < bytes.count {
        let n = bytes[off...].withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        if n < 0 && errno == EINTR { continue }
        guard n > 0 else { throw HarnessError("cannot write \(path): \(Errno.current)") }
        off += n
    }
}

/// The directory of the running executable (dirname of /proc/self/exe): where the other
/// products of the same build are.
public func executableDirectory() -> String {
    var buffer = [CChar](repeating: 0, count: 4096)
    let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
    guard n > 0 else { return "." }
    let path = String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    guard let slash = path.lastIndex(of: "/") else { return "." }
    return String(path[..<slash])
}

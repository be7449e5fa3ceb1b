// SPDX-License-Identifier: GPL-2.0-or-later

// Errno: a C errno value as a Swift type, with its symbolic name.

import CPestoSys

#if canImport(Glibc)
    import Glibc
#endif

/// An error number reported by the kernel or the C library.
///
/// Wraps the raw `errno` so that it can be thrown, compared and printed. `name` is the
/// symbolic C name (`EADDRINUSE`), which is what the D-Bus contract reports as a rule's
/// `last_error`; `description` is the C library's sentence for it.
public struct Errno: Error, Hashable, Sendable, RawRepresentable, CustomStringConvertible {
    /// The raw C value.
    public let rawValue: Int32

    /// Wraps a raw C errno value.
    public init(rawValue: Int32) { self.rawValue = rawValue }

    /// The calling thread's current `errno`. Only `Sys.call` reads it in pesto's sources:
    /// every system call goes through that funnel (Syscalls.swift).
    public static var current: Errno { Errno(rawValue: errno) }

    /// The symbolic name, such as `EADDRINUSE`; `E<number>` for values the C library does not name.
    public var name: String {
        if let cName = pesto_errno_name(rawValue) { return String(cString: cName) }
        return "E\(rawValue)"
    }

    /// `strerror(3)`'s text for this value.
    public var message: String { String(cString: strerror(rawValue)) }

    public var description: String { "\(name) (\(message))" }

    // The values the engine decides on; spelled once here.
    public static let interrupted = Errno(rawValue: EINTR)
    public static let wouldBlock = Errno(rawValue: EAGAIN)
    public static let addressInUse = Errno(rawValue: EADDRINUSE)
    public static let tooManyOpenFiles = Errno(rawValue: EMFILE)
    public static let tooManyOpenFilesInSystem = Errno(rawValue: ENFILE)
    public static let badFileDescriptor = Errno(rawValue: EBADF)
    public static let badAddress = Errno(rawValue: EFAULT)
    public static let noSuchDevice = Errno(rawValue: ENODEV)
    public static let inProgress = Errno(rawValue: EINPROGRESS)
    public static let alreadyInProgress = Errno(rawValue: EALREADY)
    public static let alreadyConnected = Errno(rawValue: EISCONN)
    public static let noBufferSpace = Errno(rawValue: ENOBUFS)
    public static let noMemory = Errno(rawValue: ENOMEM)
    public static let noSpace = Errno(rawValue: ENOSPC)
    public static let noSuchFile = Errno(rawValue: ENOENT)
    public static let fileExists = Errno(rawValue: EEXIST)
    public static let inputOutput = Errno(rawValue: EIO)

    /// True for the errnos that mean "out of file descriptors": retrying more sockets in the
    /// same pass is pointless until some are closed.
    public var isDescriptorExhaustion: Bool {
        self == .tooManyOpenFiles || self == .tooManyOpenFilesInSystem
    }
}

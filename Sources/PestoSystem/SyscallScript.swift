// SPDX-License-Identifier: GPL-2.0-or-later

// SyscallScript: the test seam of the system call funnel, compiled only in DEBUG builds.
//
// Theory of operation
// -------------------
// Modelled on swift-system's `MockingDriver`: a test makes a script, says which calls are to
// fail with which errno (`fail(.accept, with: .tooManyOpenFiles)`), and runs the code under
// test inside `script.run { ... }`. While it runs, the script is the calling thread's (a
// pthread key), and `Sys.call` asks it before each call; a call it fails is not made at all,
// exactly as if the kernel had returned -1 with that errno. EINTR is retried by the funnel as
// a real one would be, so a script of one EINTR tests the retry. Other threads, and so the
// tests running in parallel, are not affected; the loop under test must run on the thread
// that runs the script (the engine tests turn their loop on the test's thread).
//
// The script also keeps the set of descriptors the funnel opened on its thread and has not
// closed (`openDescriptors`), so a test can assert that nothing leaked without counting the
// whole process's descriptors, which other tests change concurrently.
//
// In release builds none of this exists and `Sys.call` has no check at all. In debug builds
// with no script installed, each call costs one pthread_getspecific and allocates nothing.

#if DEBUG

    import PestoModel

    #if canImport(Glibc)
        import Glibc
    #endif

    /// A scripted set of system call failures for the calling thread (debug builds only).
    package final class SyscallScript {
        /// One call as the funnel sees it.
        package struct Call: Sendable, Equatable, CustomStringConvertible {
            /// Which call.
            package let name: Sys.Name
            /// Its descriptor, where it has one (-1 otherwise); for splice, the source.
            package let fd: Int32
            /// epoll_ctl ADD/MOD: the 64-bit epoll data; splice: the destination descriptor.
            package let detail: UInt64

            /// For epoll_ctl ADD/MOD: the kind of source (the top byte of its epoll data).
            package var epollKind: UInt8 { UInt8(truncatingIfNeeded: detail >> 56) }

            package var description: String { "\(name)(\(fd))" }
        }

        /// A failure to inject.
        private struct Rule {
            let name: Sys.Name
            let errno: Errno
            /// Calls still to fail; nil: every matching call.
            var remaining: Int?
            let matches: ((Call) -> Bool)?
        }

        private var rules: [Rule] = []
        /// Failures injected so far, per call.
        package private(set) var injected: [Sys.Name: Int] = [:]
        /// Every call made through the funnel while the script ran (when `recording`).
        package private(set) var calls: [Call] = []
        /// Whether `calls` is kept.
        package var recording = false
        /// Descriptors the funnel opened on this thread while the script ran and has not closed.
        package private(set) var openDescriptors: Set<Int32> = []

        /// An empty script: every call goes to the kernel.
        package init() {}

        /// Makes the next `times` calls named `name` (nil: all of them) for which `matches` holds
        /// fail with `errno`. Rules are consulted in the order they were added.
        package func fail(_ name: Sys.Name, with errno: Errno, times: Int? = 1, where matches: ((Call) -> Bool)? = nil) {
            precondition(name != .close, "close(2) cannot be scripted to fail: the descriptor would stay open")
            rules.append(Rule(name: name, errno: errno, remaining: times, matches: matches))
        }

        /// Drops every rule still pending for `name` (all rules when nil).
        package func stopFailing(_ name: Sys.Name? = nil) {
            rules.removeAll { name == nil || $0.name == name }
        }

        /// How many failures of `name` were injected.
        package func injectedCount(_ name: Sys.Name) -> Int { injected[name, default: 0] }

        /// Runs `body` with this script as the calling thread's, then restores the previous one.
        package func run<T>(_ body: () throws -> T) rethrows -> T {
            let previous = pthread_getspecific(Self.key)
            pthread_setspecific(Self.key, Unmanaged.passUnretained(self).toOpaque())
            defer { pthread_setspecific(Self.key, previous) }
            return try withExtendedLifetime(self) { try body() }
        }

        // MARK: The funnel's side

        /// The key of the per-thread script.
        private static let key: pthread_key_t = {
            var key = pthread_key_t()
            precondition(pthread_key_create(&key, nil) == 0, "pthread_key_create failed")
            return key
        }()

        /// The calling thread's script, if one runs.
        @inline(__always)
        private static var current: SyscallScript? {
            guard let raw = pthread_getspecific(key) else { return nil }
            return Unmanaged<SyscallScript>.fromOpaque(raw).takeUnretainedValue()
        }

        /// The errno the call is to fail with, or nil to make it.
        static func failure(_ name: Sys.Name, fd: Int32, detail: UInt64) -> Errno? {
            guard let script = current else { return nil }
            let call = Call(name: name, fd: fd, detail: detail)
            if script.recording { script.calls.append(call) }
            for i in script.rules.indices where script.rules[i].name == name {
                let rule = script.rules[i]
                if let matches = rule.matches, !matches(call) { continue }
                if let remaining = rule.remaining {
                    if remaining <= 1 {
                        script.rules.remove(at: i)
                    } else {
                        script.rules[i].remaining = remaining - 1
                    }
                }
                script.injected[name, default: 0] += 1
                return rule.errno
            }
            return nil
        }

        /// Notes a descriptor the funnel opened.
        static func opened(_ fd: Int32) {
            current?.openDescriptors.insert(fd)
        }

        /// Notes a descriptor the funnel closed.
        static func closed(_ fd: Int32) {
            current?.openDescriptors.remove(fd)
        }
    }

#endif

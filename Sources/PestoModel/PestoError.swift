// SPDX-License-Identifier: GPL-2.0-or-later

// PestoError: every failure the engine reports to its callers.

/// A failure of a forwarding-table operation.
///
/// `code` names the kind of failure; its `name` is the last component of the D-Bus error
/// name (`top.passt.Pesto1.Error.<name>`), so the service maps codes to bus errors without
/// a table. `message` is one sentence a person can act on. Failures caused by the
/// environment carry the kernel's `Errno` in `underlyingError`.
///
/// Every operation that throws a `PestoError` has left the table and all sockets exactly as
/// they were before the call.
public struct PestoError: Error, Hashable, Sendable, CustomStringConvertible {
    /// The kind of failure. Extensible: the service adds its own codes (`Locked`, ...).
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        /// The error's name in the D-Bus contract, without the `top.passt.Pesto1.Error.` prefix.
        public let name: String

        /// Declares a code; `name` must be a valid D-Bus error name component.
        public init(_ name: String) { self.name = name }

        public var description: String { name }

        /// The rule description is malformed or not supported by the table.
        public static let invalidRule = Code("InvalidRule")
        /// No rule has the given ID (or index).
        public static let noSuchRule = Code("NoSuchRule")
        /// Insert with an ID that is already taken.
        public static let ruleExists = Code("RuleExists")
        /// The rule must be inactive for this operation.
        public static let ruleActive = Code("RuleActive")
        /// The rule must be active for this operation.
        public static let ruleInactive = Code("RuleInactive")
        /// Activation would overlap another active rule.
        public static let conflict = Code("Conflict")
        /// The rule or socket limit of the table would be exceeded.
        public static let noSpace = Code("NoSpace")
        /// Sockets could not be bound where the caller did not tolerate it.
        public static let bindFailed = Code("BindFailed")
        /// The environment refused something (see `underlyingError`).
        public static let system = Code("Failed")
        /// Another client holds the tables' lock (the service's single-client exclusivity).
        public static let locked = Code("Locked")
        /// Unlock or Commit by a client that does not hold the lock.
        public static let notLocked = Code("NotLocked")
        /// A committed change could not be written to the state file; it was undone.
        public static let saveFailed = Code("SaveFailed")
    }

    /// What kind of failure this is.
    public let code: Code
    /// One sentence a person can act on.
    public let message: String
    /// The kernel's error, for failures caused by the environment.
    public let underlyingError: Errno?

    /// Makes an error of the given kind.
    public init(_ code: Code, _ message: String, underlyingError: Errno? = nil) {
        self.code = code
        self.message = message
        self.underlyingError = underlyingError
    }

    public var description: String { "\(code): \(message)" }

    /// The message with its cause, for a log line or a terminal: `Cannot open the network
    /// namespace /run/netns/x: ENOENT (No such file or directory).` (the message's own final
    /// period moves after the cause).
    public var logText: String {
        guard let underlyingError else { return message }
        let sentence = message.hasSuffix(".") ? String(message.dropLast()) : message
        return "\(sentence): \(underlyingError)."
    }
}

// SPDX-License-Identifier: GPL-2.0-or-later

// RuntimeDirectory: where a pestod keeps its takeover socket, decided in one place for pestod
// itself and for `pestod --reload-request`, which must find a running pestod's socket the
// same way (UpgradeRequest.swift).
//
// The directory is, in this order: --runtime-dir; the first entry of systemd's
// $RUNTIME_DIRECTORY (a colon-separated list, from the unit's RuntimeDirectory=); /run/pesto
// on the system bus; $XDG_RUNTIME_DIR/pesto with --session (when $XDG_RUNTIME_DIR is an
// absolute path). A pestod on a private bus (--address) has no default: two pestods on two
// private buses must not share a takeover socket, so it needs --runtime-dir.

/// The rule that gives a pestod its runtime directory.
public enum RuntimeDirectory {
    /// The default on the system bus (the unit's RuntimeDirectory=pesto gives the same).
    public static let system = "/run/pesto"

    /// The runtime directory of a pestod started with these options and environment; nil
    /// when it has none (no takeover socket, no upgrade in place).
    public static func resolve(
        option: String?, systemd: String?, address: Bool, session: Bool, xdgRuntimeDir: String?
    ) -> String? {
        if let option { return option }
        if let first = systemd?.split(separator: ":").first { return String(first) }
        if address { return nil }
        if !session { return system }
        guard let xdgRuntimeDir, xdgRuntimeDir.hasPrefix("/") else { return nil }
        return xdgRuntimeDir + "/pesto"
    }
}

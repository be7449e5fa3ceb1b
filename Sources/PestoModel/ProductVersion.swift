// SPDX-License-Identifier: GPL-2.0-or-later

// ProductVersion: the one version number of the pesto product. pestod and pestoctl print it
// with --version, and pestod publishes it as the Manager's ProductVersion property, where
// the Cockpit page reads it. The D-Bus contract has a version of its own (the Manager's
// Version, `PestoBusNames.version`), which changes only when the interfaces do.

/// The product's release version, shared by pestod, pestoctl and the Cockpit page.
public enum ProductVersion {
    /// The release, as `MAJOR.MINOR.PATCH`. Change it here only.
    public static let current = "1.2.0"
}

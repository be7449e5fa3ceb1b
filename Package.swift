// swift-tools-version:6.0
// SPDX-License-Identifier: GPL-2.0-or-later
// pesto: a Linux service that keeps a live port-forwarding table and changes it without
// disturbing peers. The targets are layered (doc/architecture.md draws them):
//
//   PestoModel    rules, addresses, validation, conflicts, pasta's port specs, the pesto v2
//                 wire codec, the one list of a rule's fields; no syscalls
//   PestoSystem   the one funnel for system calls (Sys, its DEBUG-only test script), socket
//                 addresses, file reading                                      (on PestoModel)
//   PestoEngine   the event loop, tables with their sockets, relays, scanner   (on PestoSystem)
//   PestoDBus     the libdbus wrapper, bus names, the contract as data, the rule <-> a{sv}
//                 codec: what pestod, pestoctl and the tests share             (on PestoModel)
//   PestoService  the D-Bus server, transactions, lock, polkit, control socket, state store
//                 (on PestoEngine, PestoDBus and the system's libsqlite3)
//   pestod        the service's executable; pestoctl the client (PestoModel, PestoSystem and
//                 PestoDBus only)
import PackageDescription

let package = Package(
    name: "pesto",
    products: [
        .executable(name: "pestod", targets: ["pestod"]),
        .executable(name: "pestoctl", targets: ["pestoctl"]),
        .library(name: "PestoEngine", targets: ["PestoEngine"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
    ],
    targets: [
        // libdbus-1 as a system library; only PestoDBus and PestoService import it.
        .systemLibrary(name: "CDBus", pkgConfig: "dbus-1", providers: [.apt(["libdbus-1-dev"])]),
        // libsqlite3 as a system library: the state store (PestoService's SQLiteStore.swift).
        .systemLibrary(name: "CSQLite", pkgConfig: "sqlite3", providers: [.apt(["libsqlite3-dev"])]),
        // GNU-only calls that Swift's Glibc module does not import (built with _GNU_SOURCE in its .c file).
        .target(name: "CPestoSys"),
        // The model: pure values and codecs. CPestoSys only for errno names.
        .target(name: "PestoModel", dependencies: ["CPestoSys"]),
        // Every system call, through one funnel with a DEBUG-only mocking hook.
        .target(name: "PestoSystem", dependencies: ["PestoModel", "CPestoSys"]),
        // The forwarding engine: tables, sockets, relays. Never imports D-Bus.
        .target(name: "PestoEngine", dependencies: ["PestoModel", "PestoSystem", "CPestoSys"]),
        // The D-Bus layer shared by the service, the client and the tests. Never imports the engine.
        .target(name: "PestoDBus", dependencies: ["PestoModel", "CDBus"]),
        // The D-Bus face of the engine.
        .target(
            name: "PestoService",
            dependencies: [
                "PestoModel", "PestoSystem", "PestoEngine", "PestoDBus", "CDBus", "CPestoSys", "CSQLite",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(
            name: "pestod",
            dependencies: [
                "PestoModel", "PestoSystem", "PestoEngine", "PestoDBus", "PestoService",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // pestoctl reads its command line itself: pasta's options apply in the order given
        // (-A/-D/-C change the meaning of the specs after them), which ArgumentParser loses.
        // It links the model, the system funnel and the D-Bus layer, never the engine or the server.
        .executableTarget(name: "pestoctl", dependencies: ["PestoModel", "PestoSystem", "PestoDBus"]),
        .executableTarget(
            name: "pesto-activation-bench",
            dependencies: ["PestoModel", "PestoSystem", "PestoEngine", "CPestoSys", "PestoTestSupport"],
            path: "Benchmarks/ActivationBenchmark"
        ),
        .executableTarget(
            name: "pesto-dbus-bench",
            dependencies: ["PestoModel", "PestoSystem", "PestoEngine", "PestoDBus", "PestoTestSupport"],
            path: "Benchmarks/DBusBenchmark"
        ),
        .executableTarget(
            name: "pesto-loadgen",
            dependencies: ["PestoModel", "PestoSystem", "PestoEngine", "CPestoSys", "PestoTestSupport"],
            path: "Benchmarks/LoadGenerator"
        ),
        // Changes of the table under load: disruption, one change's time, churn (run-updates.sh).
        .executableTarget(
            name: "pesto-update-bench",
            dependencies: ["PestoModel", "PestoSystem", "PestoDBus", "PestoTestSupport"],
            path: "Benchmarks/UpdateBenchmark"
        ),
        // 65,535 rules with and without the state store: commit times, waits, loop turns, memory (run-large.sh).
        .executableTarget(
            name: "pesto-large-bench",
            dependencies: ["PestoModel", "PestoSystem", "PestoDBus", "PestoTestSupport"],
            path: "Benchmarks/LargeTableBenchmark"
        ),
        // Three unprivileged users' floods of refused 65,535-rule Applies against another
        // client's Status and a relayed echo (run-flood.sh).
        .executableTarget(
            name: "pesto-flood-bench",
            dependencies: ["PestoModel", "PestoSystem", "PestoEngine", "PestoDBus", "PestoTestSupport"],
            path: "Benchmarks/FloodBenchmark"
        ),
        // A long-running soak of a release pestod: concurrent D-Bus changes, uploads, traffic,
        // killed clients and killed pestods, with a ledger of acknowledged changes.
        .executableTarget(
            name: "pesto-soak",
            dependencies: ["PestoModel", "PestoSystem", "PestoEngine", "PestoDBus", "PestoTestSupport"],
            path: "Benchmarks/Soak"
        ),
        // Socket and process helpers shared by the tests and the benchmarks.
        .target(
            name: "PestoTestSupport",
            dependencies: ["PestoModel", "PestoSystem", "PestoEngine", "CPestoSys"],
            path: "Tests/PestoTestSupport"
        ),
        .testTarget(name: "PestoModelTests", dependencies: ["PestoModel", "PestoSystem", "PestoTestSupport"]),
        .testTarget(
            name: "PestoEngineTests",
            dependencies: ["PestoModel", "PestoSystem", "PestoEngine", "CPestoSys", "PestoTestSupport"]
        ),
        // A scriptable D-Bus client the service tests run as a separate process (to SIGKILL it).
        .executableTarget(
            name: "pesto-test-peer",
            dependencies: ["PestoModel", "PestoDBus"],
            path: "Tests/PestoTestPeer"
        ),
        .testTarget(
            name: "PestoServiceTests",
            dependencies: [
                "PestoModel", "PestoSystem", "PestoDBus", "PestoService", "PestoEngine", "CPestoSys", "PestoTestSupport",
                "pestod", "pesto-test-peer", "pestoctl",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
    ],
    swiftLanguageModes: [.v6]
)

// swift-tools-version:6.0
// SPDX-License-Identifier: GPL-2.0-or-later
// pesto: a Linux service that keeps a live port-forwarding table and changes it
// without disturbing peers. See doc/architecture.md for the layout.
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
        // libdbus-1 as a system library; only PestoService imports it.
        .systemLibrary(name: "CDBus", pkgConfig: "dbus-1", providers: [.apt(["libdbus-1-dev"])]),
        // GNU-only syscalls that Swift's Glibc module does not import (built with _GNU_SOURCE in its .c file).
        .target(name: "CPestoSys"),
        // The forwarding engine: rules, tables, sockets. Never imports D-Bus.
        .target(
            name: "PestoEngine",
            dependencies: ["CPestoSys", .product(name: "Logging", package: "swift-log")]
        ),
        // The D-Bus face of the engine.
        .target(
            name: "PestoService",
            dependencies: ["PestoEngine", "CDBus", "CPestoSys", .product(name: "Logging", package: "swift-log")]
        ),
        .executableTarget(
            name: "pestod",
            dependencies: [
                "PestoEngine", "PestoService",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // pestoctl reads its command line itself: pasta's options apply in the order given
        // (-A/-D/-C change the meaning of the specs after them), which ArgumentParser loses.
        .executableTarget(name: "pestoctl", dependencies: ["PestoEngine", "PestoService"]),
        .executableTarget(
            name: "pesto-activation-bench",
            dependencies: ["PestoEngine", "CPestoSys"],
            path: "Benchmarks/ActivationBenchmark"
        ),
        .executableTarget(
            name: "pesto-dbus-bench",
            dependencies: ["PestoEngine", "PestoService"],
            path: "Benchmarks/DBusBenchmark"
        ),
        .executableTarget(
            name: "pesto-loadgen",
            dependencies: ["PestoEngine", "CPestoSys"],
            path: "Benchmarks/LoadGenerator"
        ),
        // A long-running soak of a release pestod: concurrent D-Bus changes, uploads, traffic,
        // killed clients and killed pestods, with a ledger of acknowledged changes.
        .executableTarget(
            name: "pesto-soak",
            dependencies: ["PestoEngine", "PestoService", "PestoTestSupport"],
            path: "Benchmarks/Soak"
        ),
        // Socket helpers shared by the test targets.
        .target(name: "PestoTestSupport", dependencies: ["PestoEngine", "CPestoSys"], path: "Tests/PestoTestSupport"),
        .testTarget(name: "PestoEngineTests", dependencies: ["PestoEngine", "CPestoSys", "PestoTestSupport"]),
        // A scriptable D-Bus client the service tests run as a separate process (to SIGKILL it).
        .executableTarget(
            name: "pesto-test-peer",
            dependencies: ["PestoService"],
            path: "Tests/PestoTestPeer"
        ),
        .testTarget(
            name: "PestoServiceTests",
            dependencies: ["PestoService", "PestoEngine", "CPestoSys", "PestoTestSupport", "pestod", "pesto-test-peer", "pestoctl"]
        ),
    ],
    swiftLanguageModes: [.v6]
)

// SPDX-License-Identifier: GPL-2.0-or-later

// A property test with a fixed, replayable random sequence: random, malformed and hostile calls
// against a running pestod, with a model of the HOST table that predicts every answer, and
// invariants checked as it goes: pestod alive, `List` equals the model, listening sockets match
// the active rules exactly, the lock owner is the one the model expects, and no descriptor leaks.
//
// The model is an oracle of its own: it is written from doc/dbus-api.md (and the contract that
// document refines), not from pestod's code. It never calls pestod's rule decoding, validation,
// conflict check, codec or error names; pestod's D-Bus types are used only to make the calls
// (FuzzContractModel.swift). The run is split by concern: FuzzRunGenerators.swift (generators
// and predictions), FuzzRunSteps.swift, FuzzRunInvariants.swift.
//
// PESTO_FUZZ_SEED=<n> picks another random sequence (the default is fixed), PESTO_FUZZ_STEPS=<n>
// another length. The model covers both overlap policies (doc/overlap.md): one run against the
// default pestod (refuse: overlaps are Conflict), one against `pestod --overlap first-match`
// (overlaps allowed, sockets shared, each rule's PortsWon predicted from the rules alone).

import Foundation
import PestoEngine
import PestoModel
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoDBus
@testable import PestoService

/// The fuzz run's generator (shared with the other fuzz tests).
typealias FuzzRandom = SeededRandom

@Suite("pestod fuzz", .serialized, .timeLimit(.minutes(10)))
struct FuzzTests {
    /// The random sequence a plain `swift test` runs, so that every run checks the same calls.
    static let defaultSeed: UInt64 = 20_240_601

    @Test("random and malformed calls, lock sequences and killed lock holders keep every invariant", .timeLimit(.minutes(10)))
    func fuzz() throws {
        let env = ProcessInfo.processInfo.environment
        let seed = env["PESTO_FUZZ_SEED"].flatMap { UInt64($0) } ?? Self.defaultSeed
        let steps = env["PESTO_FUZZ_STEPS"].flatMap { Int($0) } ?? 6_000
        print("FuzzTests: seed \(seed), \(steps) steps (PESTO_FUZZ_SEED=\(seed) PESTO_FUZZ_STEPS=\(steps) to reproduce)")
        let run = try FuzzRun(seed: seed)
        try run.run(steps: steps)
        #expect(run.violations == 0, "seed \(seed)")
    }

    @Test(
        "the same under --overlap first-match: overlaps allowed, shared sockets, PortsWon as predicted", .timeLimit(.minutes(10)))
    func fuzzFirstMatch() throws {
        let env = ProcessInfo.processInfo.environment
        let seed = env["PESTO_FUZZ_SEED"].flatMap { UInt64($0) } ?? Self.defaultSeed
        let steps = env["PESTO_FUZZ_STEPS"].flatMap { Int($0) } ?? 6_000
        print("FuzzTests first-match: seed \(seed), \(steps) steps (PESTO_FUZZ_SEED=\(seed) PESTO_FUZZ_STEPS=\(steps) to reproduce)")
        let run = try FuzzRun(seed: seed, firstMatch: true)
        try run.run(steps: steps)
        #expect(run.violations == 0, "seed \(seed), first-match")
        #expect(run.overlapsAllowed > 0, "the run activated overlapping rules")
    }
}

/// Who makes a call.
enum FuzzClient: String {
    case main, second, peer
}

/// One rule of the model.
struct ModelEntry: Equatable {
    var rule: ModelRule
    var active: Bool
}

/// One fuzz run: the pestod under test, the model, the generators, the steps and the invariants.
final class FuzzRun {
    static let maxRules = 24
    static let maxSockets = 140_000

    let seed: UInt64
    var rng: FuzzRandom
    let f: PestodFixture
    let second: DBusConnection
    let ports: ClosedRange<UInt16>
    /// The table's `Capabilities` property, as names.
    let capabilities: Set<String>

    var model: [UInt32: ModelEntry] = [:]
    var lockOwner: FuzzClient?
    var lockSnapshot: [UInt32: ModelEntry] = [:]
    var peerName = ""

    var calls: [String: Int] = [:]
    var errors: [String: Int] = [:]
    /// Conflicts the model predicted, by the kind of address match (see `ModelRule.conflictKind`).
    var conflictKinds: [String: Int] = [:]
    /// Answers to cases the documents leave open, by case and answer.
    var openCases: [String: Int] = [:]
    var violations = 0
    var recent: [String] = []
    var step = 0
    var fdBaseline = 0
    var maxFDs = 0
    var checks = 0
    /// A socket of the test's own on a private port, so that some binds fail and are retried.
    var holder: Int32?
    /// True for a pestod started with `--overlap first-match`.
    let firstMatch: Bool
    /// Activations of a rule overlapping an active one that the model let succeed (first match).
    var overlapsAllowed = 0
    /// Rules whose PortsWon the model predicted and checked.
    var portsWonChecked = 0
    /// How `sockets()` found pestod's listeners (for the summary).
    /// Sockets bound by successful Activate calls, in all.
    var boundByActivate = 0

    init(seed: UInt64, firstMatch: Bool = false) throws {
        self.seed = seed
        self.firstMatch = firstMatch
        rng = FuzzRandom(seed: seed)
        f = try PestodFixture(
            pestodArguments: ["--max-rules", "\(Self.maxRules)", "--max-sockets", "\(Self.maxSockets)"]
                + (firstMatch ? ["--overlap", "first-match"] : []))
        second = try DBusConnection(.address(f.address))
        ports = TestSockets.freePorts(64)
        let names =
            (try f.client.call(
                PestodFixture.dest, PestodFixture.hostPath, "org.freedesktop.DBus.Properties", "Get",
                [.string(PestodFixture.tableInterface), .string("Capabilities")]
            ).first?.variantValue?.arrayValue ?? [])
            .compactMap(\.stringValue)
        capabilities = Set(names)
    }

    var pid: Int32 { f.pestod.pid }

    func connection(_ c: FuzzClient) -> DBusConnection { c == .second ? second : f.client }

    func uniqueName(_ c: FuzzClient) -> String {
        switch c {
        case .main: return f.client.uniqueName
        case .second: return second.uniqueName
        case .peer: return peerName
        }
    }

    func note(_ s: String) {
        recent.append("#\(step) \(s)")
        if recent.count > 40 { recent.removeFirst() }
    }

    func violation(_ what: String) {
        violations += 1
        let text = "FUZZ VIOLATION (seed \(seed), step \(step)): \(what)\nlast steps:\n" + recent.joined(separator: "\n")
        print(text)
        Issue.record(Comment(rawValue: text))
    }

    // MARK: Calls

    /// Makes a call; returns "success" or the error name, and the reply.
    func call(_ c: FuzzClient, path: String, interface: String?, _ member: String, _ args: [DBusValue]) -> (String, [DBusValue]) {
        calls[member, default: 0] += 1
        let m = DBusMessage.methodCall(destination: PestodFixture.dest, path: path, interface: interface, member: member, arguments: args)
        do {
            let reply = try connection(c).call(m, timeoutMilliseconds: 20_000)
            return (ContractError.success, reply.arguments ?? [])
        } catch {
            errors[error.name, default: 0] += 1
            return (error.name, [])
        }
    }

    func tableCall(_ c: FuzzClient, _ member: String, _ args: [DBusValue]) -> (String, [DBusValue]) {
        call(c, path: PestodFixture.hostPath, interface: PestodFixture.tableInterface, member, args)
    }

    /// Records the answer; a violation unless the model allows it.
    @discardableResult
    func expect(_ what: String, _ got: String, _ allowed: Answers) -> Bool {
        note("\(what) -> \(got)")
        if allowed.contains(got) { return true }
        violation("\(what): got \(got), model allows \(allowed.sorted())")
        return false
    }

    func expect(_ what: String, _ got: String, _ wanted: String) { expect(what, got, [wanted]) }

    /// Counts an answer to a case the documents leave open.
    func noteOpen(_ verdict: RequestVerdict, _ got: String) {
        guard verdict.decodeErrors.isEmpty, got == ContractError.success || got == ContractError.invalidRule else { return }
        for reason in verdict.reasons where reason.hasPrefix("open: ") {
            openCases["\(reason.dropFirst(6)) -> \(got.split(separator: ".").last ?? "")", default: 0] += 1
        }
    }

    // MARK: Driver

    func run(steps: Int) throws {
        let start = Date()
        _ = tableList()
        fdBaseline = fdCount()
        check()
        for i in 1...max(steps, 1) {
            step = i
            let k = rng.below(1000)
            switch k {
            case ..<2: try stepPeer()  // 1 in 500
            case ..<5: stepHolder()
            case ..<200: stepInsert()
            case ..<300: stepSimple("Delete")
            case ..<480: stepSimple("Activate")
            case ..<600: stepSimple("Deactivate")
            case ..<700: stepRead()
            case ..<720:
                let c: FuzzClient = rng.oneIn(2) ? .second : .main
                let (got, _) = tableCall(c, "List", [])
                expect("List", got, ContractError.success)
            case ..<780: stepApply()
            case ..<830: stepHostile()
            case ..<880: stepConflictProbe()
            default: stepManager()
            }
            if i % 25 == 0 { check() }
            if violations > 20 { break }
        }
        // Release any lock and check once more.
        if let owner = lockOwner, owner != .peer {
            let wanted = predictManager(owner, "Unlock")
            let (got, _) = call(owner, path: PestodFixture.managerPath, interface: PestodFixture.managerInterface, "Unlock", [])
            expect("final Unlock", got, wanted)
        }
        if let fd = holder { close(fd) }
        holder = nil
        check()
        // Empty the table: every descriptor beyond the baseline must be gone.
        for id in model.keys.sorted() {
            if model[id]!.active {
                expect("final Deactivate \(id)", tableCall(.main, "Deactivate", [.uint32(id)]).0, predictChange(.main, "Deactivate", id))
                applyChange("Deactivate", id)
            }
            expect("final Delete \(id)", tableCall(.main, "Delete", [.uint32(id)]).0, predictChange(.main, "Delete", id))
            applyChange("Delete", id)
        }
        check()
        let deadline = Date().addingTimeInterval(3)
        while fdCount() != fdBaseline && Date() < deadline { usleep(20_000) }
        if fdCount() != fdBaseline {
            violation("descriptor leak: \(fdCount()) open with an empty table, \(fdBaseline) at the start: \(fdTargets())")
        }
        let seconds = Date().timeIntervalSince(start)
        let callText = calls.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")
        let openText = openCases.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")
        let errorText = errors.sorted { $0.key < $1.key }.map { "\($0.key.split(separator: ".").last!) \($0.value)" }.joined(
            separator: ", ")
        print(
            """
            FuzzTests summary: seed \(seed), \(step) steps, \(checks) invariant checks, \(violations) violations, \
            \(String(format: "%.1f", seconds)) s, \(model.count) rules (\(model.values.filter(\.active).count) active) at the end, \
            fds beyond sockets max \(maxFDs) (baseline \(fdBaseline)), \(boundByActivate) sockets bound by Activate
              calls: \(callText)
              errors: \(errorText)
              overlap policy \(firstMatch ? "first-match" : "refuse"): \(overlapsAllowed) overlapping activations allowed, \(portsWonChecked) PortsWon predictions checked
              conflicts predicted: \(conflictKinds.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", "))
              cases the documents leave open: \(openText.isEmpty ? "none met" : openText)
            """)
    }
}

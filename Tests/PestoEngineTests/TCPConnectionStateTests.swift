// SPDX-License-Identifier: GPL-2.0-or-later

// The TCP relay's per-connection state machine, without a socket: events in, actions out
// (TCPConnectionState.swift). Every transition, both orders of half-close, every error path.

import PestoModel
import PestoSystem
import Testing

@testable import PestoEngine

#if canImport(Glibc)
    import Glibc
#endif

private typealias State = TCPConnectionState
private typealias Event = TCPConnectionState.Event
private typealias Action = TCPConnectionState.Action

private let readable = EventLoop.Events.readable
private let writable = EventLoop.Events.writable
/// A splice's size in the tests that pump a direction for several steps.
private let big = 16384

/// Feeds `events` in order; returns the action each one gave.
private func feed(_ state: inout State, _ events: [Event]) -> [Action] {
    events.map { state.handle($0) }
}

/// A connection that connected at once and went through its first (empty) turn: the up
/// direction found nothing to read (the down one is not tried: the target has just been
/// connected) and both sockets are watched for EPOLLIN.
private func idleConnection() -> State {
    var s = State()
    let actions = feed(
        &s, [.connect(.connected), .pipe(.up, taken: true), .spliced(.up, .wouldBlock), .pipeReleased(.up), .watched(true)])
    #expect(actions == [.takePipe(.up), .spliceIn(.up), .releasePipe(.up), .watch(client: readable, target: readable), .wait])
    #expect(s.phase == .relaying && s.clientInterest == readable && s.targetInterest == readable)
    return s
}

@Suite("TCP connection state machine", .timeLimit(.minutes(10)))
struct TCPConnectionStateTests {
    static let refused = Errno(rawValue: ECONNREFUSED)
    static let reset = Errno(rawValue: ECONNRESET)

    // MARK: Connecting

    @Test("connect() that succeeds at once starts relaying without an epoll round")
    func connectedAtOnce() {
        _ = idleConnection()
    }

    @Test("connect() in progress is asked once more; completed by then, it relays at once")
    func connectAskedAgain() {
        var s = State()
        #expect(s.handle(.connect(.inProgress)) == .askConnectAgain)
        #expect(s.phase == .connecting)
        #expect(s.handle(.connect(.connected)) == .takePipe(.up))
        #expect(s.phase == .relaying)
    }

    @Test("still in progress: the target alone is watched for EPOLLOUT, then SO_ERROR decides")
    func connectWaits() {
        var s = State()
        #expect(
            feed(&s, [.connect(.inProgress), .connect(.inProgress), .watched(true)])
                == [.askConnectAgain, .watch(client: 0, target: writable), .wait])
        #expect(s.targetInterest == writable && s.clientInterest == 0)
        #expect(s.handle(.ready(.client)) == .wait, "a stale client event changes nothing")
        #expect(s.handle(.ready(.target)) == .readPendingError)
        #expect(s.handle(.pendingError(nil)) == .takePipe(.up))
        #expect(
            feed(&s, [.pipe(.up, taken: true), .spliced(.up, .wouldBlock), .pipeReleased(.up), .watched(true)])
                == [.spliceIn(.up), .releasePipe(.up), .watch(client: readable, target: readable), .wait])
    }

    @Test("connect failures end the connection with a reset: at once, when asked again, or by SO_ERROR")
    func connectFailures() {
        var first = State()
        #expect(first.handle(.connect(.failed(Self.refused))) == .close(.connectFailed(Self.refused)))
        #expect(first.phase == .closed)

        var again = State()
        #expect(
            feed(&again, [.connect(.inProgress), .connect(.failed(Self.refused))]) == [
                .askConnectAgain, .close(.connectFailed(Self.refused)),
            ])

        var later = State()
        _ = feed(&later, [.connect(.inProgress), .connect(.inProgress), .watched(true), .ready(.target)])
        #expect(later.handle(.pendingError(Self.refused)) == .close(.connectFailed(Self.refused)))
        #expect(State.Ending.connectFailed(Self.refused).resets)
    }

    @Test("a target socket epoll cannot watch while connecting ends the connection")
    func connectUnwatchable() {
        var s = State()
        #expect(
            feed(&s, [.connect(.inProgress), .connect(.inProgress), .watched(false)]) == [
                .askConnectAgain, .watch(client: 0, target: writable), .close(.unwatchable),
            ])
    }

    // MARK: Relaying

    @Test("bytes go source → pipe → destination; a full destination blocks the direction and is watched for EPOLLOUT")
    func backPressure() {
        var s = idleConnection()
        #expect(
            feed(&s, [.ready(.client), .pipe(.up, taken: true), .spliced(.up, .moved(100)), .spliced(.up, .moved(60))])
                == [.takePipe(.up), .spliceIn(.up), .spliceOut(.up, count: 100), .spliceOut(.up, count: 40)])
        // The target's buffer is full: the up direction stops, keeps its pipe, the down one runs.
        #expect(s.handle(.spliced(.up, .wouldBlock)) == .takePipe(.down))
        #expect(s.up.destinationBlocked && s.up.pending == 40 && s.up.hasPipe)
        #expect(
            feed(&s, [.pipe(.down, taken: true), .spliced(.down, .wouldBlock), .pipeReleased(.down)])
                == [.spliceIn(.down), .releasePipe(.down), .watch(client: 0, target: readable | writable)])
        #expect(s.handle(.watched(true)) == .wait)
        // The target drains: the rest goes out, then the client is read again.
        #expect(feed(&s, [.ready(.target), .spliced(.up, .moved(40))]) == [.spliceOut(.up, count: 40), .spliceIn(.up)])
        #expect(!s.up.destinationBlocked && s.up.pending == 0)
        #expect(
            feed(
                &s,
                [
                    .spliced(.up, .wouldBlock), .pipeReleased(.up), .pipe(.down, taken: true), .spliced(.down, .wouldBlock),
                    .pipeReleased(.down),
                ])
                == [.releasePipe(.up), .takePipe(.down), .spliceIn(.down), .releasePipe(.down), .watch(client: readable, target: readable)])
    }

    @Test("a turn ends after stepsPerTurn splices; bytes left in the pipe get EPOLLOUT on the destination, so they are not stranded")
    func turnBudget() {
        var s = idleConnection()
        _ = feed(&s, [.ready(.client), .pipe(.up, taken: true)])
        // In 2b, out b, out b, in 2b, ...: the 16th splice is an in, leaving 2b bytes in the pipe.
        var last = Action.wait
        for k in 0..<State.stepsPerTurn {
            last = s.handle(.spliced(.up, .moved(k % 3 == 0 ? 2 * big : big)))
        }
        #expect(last == .takePipe(.down), "the up direction yields after \(State.stepsPerTurn) splices")
        #expect(s.up.pending == 2 * big && !s.up.destinationBlocked && s.up.hasPipe)
        #expect(
            feed(&s, [.pipe(.down, taken: true), .spliced(.down, .wouldBlock), .pipeReleased(.down)])
                == [.spliceIn(.down), .releasePipe(.down), .watch(client: readable, target: readable | writable)])
        // EPOLLOUT on the target comes at once: the pending bytes go out first.
        #expect(feed(&s, [.watched(true), .ready(.target)]) == [.wait, .spliceOut(.up, count: 2 * big)])
    }

    @Test("half-close, client first: the client's EOF becomes shutdown(target, SHUT_WR); the target's EOF later closes both (FIN)")
    func halfCloseClientFirst() {
        var s = idleConnection()
        #expect(
            feed(
                &s, [.ready(.client), .pipe(.up, taken: true), .spliced(.up, .endOfFile), .shutDown(.up, failure: nil), .pipeReleased(.up)])
                == [.takePipe(.up), .spliceIn(.up), .shutdownWrite(.up), .releasePipe(.up), .takePipe(.down)])
        #expect(s.up.finished && s.up.sourceEnded)
        #expect(
            feed(&s, [.pipe(.down, taken: true), .spliced(.down, .wouldBlock), .pipeReleased(.down)])
                == [.spliceIn(.down), .releasePipe(.down), .watch(client: 0, target: readable)])
        #expect(s.handle(.watched(true)) == .wait)
        // The target answers, then ends too.
        #expect(
            feed(
                &s,
                [
                    .ready(.target), .pipe(.down, taken: true), .spliced(.down, .moved(big)), .spliced(.down, .moved(big)),
                    .spliced(.down, .endOfFile),
                ])
                == [.takePipe(.down), .spliceIn(.down), .spliceOut(.down, count: big), .spliceIn(.down), .close(.finished)],
            "the last end of file needs no shutdown: close(2) sends the FIN")
        #expect(s.phase == .closed && !State.Ending.finished.resets)
    }

    @Test("half-close, target first: the target's EOF becomes shutdown(client, SHUT_WR); the client keeps sending, then ends")
    func halfCloseTargetFirst() {
        var s = idleConnection()
        #expect(
            feed(&s, [.ready(.target), .pipe(.up, taken: true), .spliced(.up, .wouldBlock), .pipeReleased(.up)])
                == [.takePipe(.up), .spliceIn(.up), .releasePipe(.up), .takePipe(.down)])
        #expect(
            feed(&s, [.pipe(.down, taken: true), .spliced(.down, .endOfFile), .shutDown(.down, failure: nil), .pipeReleased(.down)])
                == [.spliceIn(.down), .shutdownWrite(.down), .releasePipe(.down), .watch(client: readable, target: 0)])
        #expect(s.handle(.watched(true)) == .wait)
        #expect(s.clientInterest == readable && s.targetInterest == 0, "the target has nothing to say any more: out of epoll")
        #expect(
            feed(
                &s,
                [
                    .ready(.client), .pipe(.up, taken: true), .spliced(.up, .moved(big)), .spliced(.up, .moved(big)),
                    .spliced(.up, .endOfFile),
                ])
                == [.takePipe(.up), .spliceIn(.up), .spliceOut(.up, count: big), .spliceIn(.up), .close(.finished)])
    }

    @Test("EOF with bytes still in the pipe: they are delivered first, then the half-close")
    func endOfFileAfterData() {
        var s = idleConnection()
        _ = feed(&s, [.ready(.client), .pipe(.up, taken: true), .spliced(.up, .moved(8))])
        #expect(s.handle(.spliced(.up, .wouldBlock)) == .takePipe(.down), "destination full")
        _ = feed(&s, [.pipe(.down, taken: true), .spliced(.down, .wouldBlock), .pipeReleased(.down), .watched(true)])
        #expect(feed(&s, [.ready(.target), .spliced(.up, .moved(8))]) == [.spliceOut(.up, count: 8), .spliceIn(.up)])
        #expect(feed(&s, [.spliced(.up, .endOfFile)]) == [.shutdownWrite(.up)])
    }

    // MARK: Errors

    @Test(
        "a failed splice (either way) or a failed shutdown ends the connection with a reset",
        arguments: [ENOBUFS, ENOSPC, ENOMEM, ECONNRESET, EPIPE])
    func errorsReset(_ code: Int32) {
        let e = Errno(rawValue: code)
        var spliceIn = idleConnection()
        #expect(feed(&spliceIn, [.ready(.client), .pipe(.up, taken: true), .spliced(.up, .failed(e))]).last == .close(.broken(e)))
        #expect(spliceIn.phase == .closed)

        var spliceOut = idleConnection()
        _ = feed(
            &spliceOut,
            [.ready(.target), .pipe(.up, taken: true), .spliced(.up, .wouldBlock), .pipeReleased(.up), .pipe(.down, taken: true)])
        #expect(
            feed(&spliceOut, [.spliced(.down, .moved(4)), .spliced(.down, .failed(e))]) == [
                .spliceOut(.down, count: 4), .close(.broken(e)),
            ])

        var shutdown = idleConnection()
        _ = feed(&shutdown, [.ready(.client), .pipe(.up, taken: true)])
        #expect(feed(&shutdown, [.spliced(.up, .endOfFile), .shutDown(.up, failure: e)]) == [.shutdownWrite(.up), .close(.broken(e))])
        #expect(State.Ending.broken(e).resets)
    }

    @Test("no pipe to be had, or a socket epoll cannot watch, resets the connection")
    func resourcesRefused() {
        var noPipe = idleConnection()
        #expect(feed(&noPipe, [.ready(.client), .pipe(.up, taken: false)]) == [.takePipe(.up), .close(.outOfPipes)])
        var unwatchable = idleConnection()
        _ = feed(
            &unwatchable,
            [.ready(.client), .pipe(.up, taken: true), .spliced(.up, .endOfFile), .shutDown(.up, failure: nil), .pipeReleased(.up)])
        _ = feed(&unwatchable, [.pipe(.down, taken: true), .spliced(.down, .wouldBlock), .pipeReleased(.down)])
        #expect(unwatchable.handle(.watched(false)) == .close(.unwatchable))
        #expect(State.Ending.outOfPipes.resets && State.Ending.unwatchable.resets)
    }

    @Test("the kernel claiming end of file on a pipe that holds bytes is an error, not a crash")
    func pipeEndOfFile() {
        var s = idleConnection()
        _ = feed(&s, [.ready(.client), .pipe(.up, taken: true), .spliced(.up, .moved(5))])
        #expect(s.handle(.spliced(.up, .endOfFile)) == .close(.broken(.inputOutput)))
    }

    @Test("an unchanged interest asks epoll for nothing")
    func interestUnchanged() {
        var s = idleConnection()
        #expect(
            feed(
                &s,
                [
                    .ready(.client), .pipe(.up, taken: true), .spliced(.up, .wouldBlock), .pipeReleased(.up), .pipe(.down, taken: true),
                    .spliced(.down, .wouldBlock),
                ])
                == [.takePipe(.up), .spliceIn(.up), .releasePipe(.up), .takePipe(.down), .spliceIn(.down), .releasePipe(.down)])
        #expect(s.handle(.pipeReleased(.down)) == .wait)
    }

    // MARK: Preamble (PROXY protocol header)

    @Test("a preamble goes to the target first, at once, before the client is even read; partial sends continue")
    func preambleFirst() {
        var s = State(preamble: 40)
        let actions = feed(
            &s,
            [
                .connect(.connected), .preambleSent(.moved(15)), .preambleSent(.moved(25)), .pipe(.up, taken: true),
                .spliced(.up, .wouldBlock), .pipeReleased(.up), .watched(true),
            ])
        #expect(
            actions == [
                .writePreamble(count: 40), .writePreamble(count: 25), .takePipe(.up), .spliceIn(.up), .releasePipe(.up),
                .watch(client: readable, target: readable), .wait,
            ])
        #expect(s.preambleLeft == 0)
    }

    @Test("a target that takes no more of the preamble blocks the up direction: client not read, target watched for EPOLLOUT")
    func preambleBlocked() {
        var s = State(preamble: 12)
        var actions = feed(
            &s,
            [.connect(.connected), .preambleSent(.moved(5)), .preambleSent(.wouldBlock), .watched(true)])
        #expect(
            actions == [
                .writePreamble(count: 12), .writePreamble(count: 7), .watch(client: 0, target: readable | writable), .wait,
            ])
        // The target drains: the rest of the preamble goes, then the client is read again.
        actions = feed(&s, [.ready(.target), .preambleSent(.moved(7)), .pipe(.up, taken: true), .spliced(.up, .wouldBlock)])
        #expect(actions == [.writePreamble(count: 7), .takePipe(.up), .spliceIn(.up), .releasePipe(.up)])
        #expect(s.preambleLeft == 0)
    }

    @Test("a failed preamble send ends the connection with a reset")
    func preambleFailed() {
        var s = State(preamble: 12)
        let actions = feed(&s, [.connect(.connected), .preambleSent(.failed(Self.reset))])
        #expect(actions == [.writePreamble(count: 12), .close(.broken(Self.reset))])
    }

    @Test("a client that ends at once still has the preamble sent before the half-close")
    func preambleBeforeHalfClose() {
        var s = State(preamble: 3)
        let actions = feed(&s, [.connect(.connected), .preambleSent(.moved(3)), .pipe(.up, taken: true), .spliced(.up, .endOfFile)])
        #expect(actions == [.writePreamble(count: 3), .takePipe(.up), .spliceIn(.up), .shutdownWrite(.up)])
    }

    // MARK: Turns for the events reported

    @Test("EPOLLIN on the client serves the up direction only: no splice from the target that could only say EAGAIN")
    func readableClientServesUpOnly() {
        var s = idleConnection()
        #expect(
            feed(
                &s,
                [
                    .readiness(.client, events: readable), .pipe(.up, taken: true), .spliced(.up, .moved(1)), .spliced(.up, .moved(1)),
                    .spliced(.up, .wouldBlock), .pipeReleased(.up),
                ])
                == [.takePipe(.up), .spliceIn(.up), .spliceOut(.up, count: 1), .spliceIn(.up), .releasePipe(.up), .wait])
        #expect(s.clientInterest == readable && s.targetInterest == readable, "the client stays watched for what comes next")
    }

    @Test("EPOLLIN on the target serves the down direction only; its EOF half-closes the client")
    func readableTargetServesDownOnly() {
        var s = idleConnection()
        #expect(
            feed(
                &s,
                [
                    .readiness(.target, events: readable), .pipe(.down, taken: true), .spliced(.down, .moved(big)),
                    .spliced(.down, .moved(big)), .spliced(.down, .endOfFile), .shutDown(.down, failure: nil), .pipeReleased(.down),
                ])
                == [
                    .takePipe(.down), .spliceIn(.down), .spliceOut(.down, count: big), .spliceIn(.down), .shutdownWrite(.down),
                    .releasePipe(.down), .watch(client: readable, target: 0),
                ])
    }

    @Test("EPOLLOUT on the target serves the up direction (its pending bytes), not the down one")
    func writableTargetServesUpOnly() {
        var s = idleConnection()
        _ = feed(&s, [.readiness(.client, events: readable), .pipe(.up, taken: true), .spliced(.up, .moved(8))])
        #expect(s.handle(.spliced(.up, .wouldBlock)) == .watch(client: 0, target: readable | writable), "blocked: no down splice")
        #expect(s.handle(.watched(true)) == .wait)
        #expect(
            feed(&s, [.readiness(.target, events: writable), .spliced(.up, .moved(8)), .spliced(.up, .wouldBlock), .pipeReleased(.up)])
                == [.spliceOut(.up, count: 8), .spliceIn(.up), .releasePipe(.up), .watch(client: readable, target: readable)])
    }

    @Test(
        "a hang-up or an error serves both directions, so their splices tell what happened",
        arguments: [EventLoop.Events.hangup, EventLoop.Events.error])
    func hangupServesBoth(_ events: UInt32) {
        var s = idleConnection()
        let e = Errno(rawValue: ECONNRESET)
        #expect(
            feed(&s, [.readiness(.client, events: events), .pipe(.up, taken: true), .spliced(.up, .wouldBlock), .pipeReleased(.up)])
                == [.takePipe(.up), .spliceIn(.up), .releasePipe(.up), .takePipe(.down)])
        #expect(feed(&s, [.pipe(.down, taken: true), .spliced(.down, .failed(e))]) == [.spliceIn(.down), .close(.broken(e))])
    }

    @Test("an event while connecting: the target's asks for SO_ERROR, a stale client one changes nothing")
    func readinessWhileConnecting() {
        var s = State()
        _ = feed(&s, [.connect(.inProgress), .connect(.inProgress), .watched(true)])
        #expect(s.handle(.readiness(.client, events: readable)) == .wait)
        #expect(s.handle(.readiness(.target, events: writable)) == .readPendingError)
        #expect(s.handle(.pendingError(nil)) == .takePipe(.up), "relaying: the up direction first, the down one not tried")
    }

    @Test("connect() interrupted (EINTR, reported in progress) is asked again, then waits for EPOLLOUT")
    func connectInterrupted() {
        var s = State()
        #expect(feed(&s, [.connect(.inProgress), .connect(.inProgress)]) == [.askConnectAgain, .watch(client: 0, target: writable)])
    }

    @Test("an EOF as a turn's last splice still half-closes at once: nothing in the interest would bring it back")
    func endOfFileAsLastStep() {
        var s = idleConnection()
        _ = feed(&s, [.readiness(.client, events: readable), .pipe(.up, taken: true)])
        // In 2b, out b, out b, five times: 15 splices, the pipe empty, one splice left.
        var last = Action.wait
        for _ in 0..<5 {
            last = s.handle(.spliced(.up, .moved(2 * big)))
            #expect(last == .spliceOut(.up, count: 2 * big))
            last = s.handle(.spliced(.up, .moved(big)))
            last = s.handle(.spliced(.up, .moved(big)))
        }
        #expect(last == .spliceIn(.up))
        // The 16th splice finds the end of file: the shutdown follows anyway.
        #expect(s.handle(.spliced(.up, .endOfFile)) == .shutdownWrite(.up))
        #expect(feed(&s, [.shutDown(.up, failure: nil), .pipeReleased(.up)]) == [.releasePipe(.up), .watch(client: 0, target: readable)])
    }
}

// SPDX-License-Identifier: GPL-2.0-or-later

// TCPConnectionState: what a relayed TCP connection does next, as a value without I/O.
//
// Theory of operation
// -------------------
// The TCP relay (TCPRelay.swift) owns the sockets and pipes; this value owns the decisions.
// The relay feeds it an `Event` (a readiness event, or the outcome of the last action) and
// executes the one `Action` it returns, then feeds that action's outcome back, until the
// answer is `.wait` (nothing to do before the next readiness event) or `.close` (the
// connection is over). Every action but those two has exactly one outcome event, so the
// exchange is a simple loop with no queue and no allocation, and the whole protocol can be
// tested without a socket (TCPConnectionStateTests).
//
// Phases:
//   connecting  the relay called connect(); `.connect(.connected)` starts relaying at once.
//               `.connect(.inProgress)` the first time asks the relay to call connect() again
//               (`.askConnectAgain`): on loopback the handshake has usually completed during
//               the first call, and the second one says so (0) without an epoll round; only
//               if it is still in progress (EALREADY) is the target watched for EPOLLOUT, and
//               its readiness then asks for SO_ERROR (`.readPendingError`): none → relaying,
//               an error (or getsockopt's own failure) → `.close(.connectFailed)`.
//   relaying    each readiness event starts a turn: the up direction (client → target), then
//               the down direction (target → client), each pumped as below for at most
//               `stepsPerTurn` splices so that one busy connection cannot hold the loop; then
//               the epoll interest of both sockets is brought up to date (`.watch`). A turn
//               serves only the directions the event's bits concern (`.readiness`: EPOLLIN on
//               a side → the direction reading it, EPOLLOUT → the one writing to it, HUP/ERR →
//               both); the other one's wait is in the level-triggered interest, reported in an
//               event of its own, so no splice is made that could only say EAGAIN. The first
//               turn, right after the connect, serves the up direction only (the target has
//               sent nothing yet), and `.ready` (an adopted connection's first turn) both.
//   closed      after `.close`; no further event may come.
//
// A direction (Flow) pumps source → pipe → destination:
//   - bytes in the pipe: `.spliceOut` them to the destination; EAGAIN means its buffer is
//     full: the direction stops reading its source and waits for EPOLLOUT (back-pressure);
//   - pipe empty, source ended: `.shutdownWrite` the destination (the half-close propagates),
//     then `.releasePipe`; the direction is finished;
//   - pipe empty: `.takePipe` if it has none, then `.spliceIn` from the source; 0 bytes is the
//     source's end of file, EAGAIN ends the direction's turn (and its pipe goes back to the
//     pool, being empty);
//   - the second direction to reach its source's end is not shut down: both sockets are
//     closed at once (a FIN each, as nothing is left unread).
// A preamble (a PROXY protocol header, ProxyProtocol.swift) is written to the target
// before anything else goes up: while bytes of it are left, the up direction's only step is
// `.writePreamble` of what is left (a send(2) from the relay's per-slot buffer, so a partial
// write simply leaves the rest for the next step); EAGAIN blocks the direction as a full
// destination does, so the client is not read and the target is watched for EPOLLOUT. It goes
// out at the first turn of relaying, whether or not the client has sent anything.
//
// Any other error (a failed splice or shutdown, no pipe to be had) ends the connection with a
// reset of both sockets; both directions finished end it with a plain close (FIN).
//
// Interest (level-triggered): a source is watched for EPOLLIN while it has not ended and its
// destination is not blocked; a destination for EPOLLOUT while its pipe holds bytes (blocked,
// or left over when the turn's steps ran out: the event then comes at once). A socket with no
// interest is taken out of epoll, because epoll reports HUP and ERR even for an empty mask.

import PestoModel
import PestoSystem

/// One of the two sockets of a relayed connection.
package enum TCPSide: Sendable, Equatable {
    /// The accepted connection.
    case client
    /// The connection made to the rule's target.
    case target
}

/// One of the two directions of a relayed connection.
package enum TCPDirection: Sendable, Equatable {
    /// Client → target.
    case up
    /// Target → client.
    case down

    /// The side it reads from.
    package var source: TCPSide { self == .up ? .client : .target }
    /// The side it writes to.
    package var destination: TCPSide { self == .up ? .target : .client }
}

/// The state of one relayed TCP connection, as events in and actions out (see the theory of
/// operation at the top of TCPConnectionState.swift).
package struct TCPConnectionState: Sendable, Equatable {
    /// Splices per direction per readiness event.
    package static let stepsPerTurn = 16

    /// Where the connection is.
    package enum Phase: Sendable, Equatable {
        case connecting
        case relaying
        case closed
    }

    /// One direction's progress. Kept small (12 bytes): one lives in every relayed
    /// connection's slot, idle or not.
    package struct Flow: Sendable, Equatable {
        /// Bytes in the pipe, not yet written to the destination (a pipe holds far less
        /// than 2 GiB, so 32 bits are stored).
        package var pending: Int {
            get { Int(pendingBytes) }
            set { pendingBytes = Int32(newValue) }
        }
        private var pendingBytes: Int32 = 0
        /// The direction holds a pipe.
        package var hasPipe = false
        /// The destination refused more (EAGAIN): wait for EPOLLOUT on it.
        package var destinationBlocked = false
        /// The source reached end of file.
        package var sourceEnded = false
        /// shutdown(destination, SHUT_WR) was sent: this direction is finished.
        package var finished = false
        /// Nothing more to do in this turn.
        var idle = false
        /// Splices left in this turn (at most `stepsPerTurn`).
        var steps: Int {
            get { Int(stepsLeft) }
            set { stepsLeft = Int8(newValue) }
        }
        private var stepsLeft: Int8 = 0
    }

    /// Why a connection ends.
    package enum Ending: Sendable, Equatable {
        /// Both directions were half-closed in turn: close both sockets (FIN).
        case finished
        /// The target could not be reached: reset the client.
        case connectFailed(Errno)
        /// A splice or shutdown failed: reset both.
        case broken(Errno)
        /// No pipe could be had (out of descriptors): reset both.
        case outOfPipes
        /// epoll could not watch a socket (ENOSPC, ENOMEM): reset both.
        case unwatchable

        /// Whether the sockets are closed with a reset (SO_LINGER 0) rather than a FIN.
        package var resets: Bool { self != .finished }
    }

    /// What happened; the input of `handle`.
    package enum Event: Sendable, Equatable {
        /// connect() (the first call or the one asked again) gave this.
        case connect(Sys.ConnectResult)
        /// This side is to be served in both directions (a turn for both: an adopted
        /// connection's first, or a readiness whose events are not known).
        case ready(TCPSide)
        /// epoll reported `events` (EPOLLIN, EPOLLOUT, EPOLLHUP, EPOLLERR) on this side: a turn
        /// for only the directions they concern (see `startTurn(for:events:)`).
        case readiness(TCPSide, events: UInt32)
        /// The target's SO_ERROR after the connect's EPOLLOUT: nil when connected; the error,
        /// or getsockopt's own failure, otherwise.
        case pendingError(Errno?)
        /// The splice asked for in this direction gave this.
        case spliced(TCPDirection, Sys.SpliceResult)
        /// A pipe for this direction was (or could not be) had.
        case pipe(TCPDirection, taken: Bool)
        /// shutdown(SHUT_WR) of the direction's destination: nil on success.
        case shutDown(TCPDirection, failure: Errno?)
        /// The direction's pipe went back to the pool (or was closed).
        case pipeReleased(TCPDirection)
        /// The epoll interest asked for was set (false: epoll refused).
        case watched(Bool)
        /// The preamble's send(2) gave this (`.moved(n)`: n bytes went out).
        case preambleSent(Sys.SpliceResult)
    }

    /// What the relay is to do next; the output of `handle`.
    package enum Action: Sendable, Equatable {
        /// Call connect() on the target once more: has the handshake completed?
        case askConnectAgain
        /// Read the target's SO_ERROR.
        case readPendingError
        /// Give the direction a pipe.
        case takePipe(TCPDirection)
        /// Splice from the direction's source into its pipe.
        case spliceIn(TCPDirection)
        /// Splice `count` bytes from the direction's pipe to its destination.
        case spliceOut(TCPDirection, count: Int)
        /// shutdown(SHUT_WR) the direction's destination.
        case shutdownWrite(TCPDirection)
        /// Put the direction's (empty) pipe back.
        case releasePipe(TCPDirection)
        /// send(2) the last `count` bytes of the preamble to the target.
        case writePreamble(count: Int)
        /// Make epoll watch the client and the target for these events (0: not at all).
        case watch(client: UInt32, target: UInt32)
        /// Nothing more until the next readiness event.
        case wait
        /// Close both sockets (and both pipes); the state is then `.closed`.
        case close(Ending)
    }

    /// Where the connection is.
    package private(set) var phase = Phase.connecting
    /// Client → target.
    package private(set) var up = Flow()
    /// Target → client.
    package private(set) var down = Flow()
    /// The events epoll watches on the client now (0: not in epoll).
    package private(set) var clientInterest: UInt32 = 0
    /// The events epoll watches on the target now (0: not in epoll).
    package private(set) var targetInterest: UInt32 = 0
    /// The interest asked for by the last `.watch`.
    private var requested: (client: UInt32, target: UInt32) = (0, 0)
    /// connect() was asked again already.
    private var askedAgain = false
    /// Bytes of the preamble not yet written to the target.
    package private(set) var preambleLeft: Int {
        get { Int(preambleBytes) }
        set { preambleBytes = UInt16(newValue) }
    }
    /// `preambleLeft` as stored (a PROXY header is at most a few hundred bytes).
    private var preambleBytes: UInt16 = 0

    /// A connection whose connect() is about to be called; `preamble` bytes (a PROXY
    /// protocol header, 0 for none) go to the target before anything the client sends.
    package init(preamble: Int = 0) {
        precondition(preamble >= 0, "negative preamble")
        preambleLeft = preamble
    }

    /// A connection handed over by the pestod this one takes over from (RelayHandover.swift),
    /// to be started with `.connect(.inProgress)` while `connecting` (it then waits for the
    /// target's EPOLLOUT: connect() was asked again already) and with a `.ready` event
    /// otherwise (a turn: the pipes' pending bytes out first). Neither socket is in epoll yet.
    package init(adoptedConnecting connecting: Bool, up: Flow, down: Flow, preamble: Int) {
        precondition(preamble >= 0, "negative preamble")
        preambleLeft = preamble
        askedAgain = true
        guard !connecting else { return }
        phase = .relaying
        self.up = up
        self.down = down
    }

    package static func == (a: Self, b: Self) -> Bool {
        a.phase == b.phase && a.up == b.up && a.down == b.down && a.clientInterest == b.clientInterest
            && a.targetInterest == b.targetInterest && a.requested == b.requested && a.askedAgain == b.askedAgain
            && a.preambleLeft == b.preambleLeft
    }

    /// The flow of direction `d`.
    package func flow(_ d: TCPDirection) -> Flow { d == .up ? up : down }

    private mutating func update(_ d: TCPDirection, _ change: (inout Flow) -> Void) {
        if d == .up { change(&up) } else { change(&down) }
    }

    /// Takes in what happened and says what to do next.
    package mutating func handle(_ event: Event) -> Action {
        precondition(phase != .closed, "event \(event) for a closed connection")
        switch event {
        case .connect(let result):
            precondition(phase == .connecting, "connect result while \(phase)")
            switch result {
            case .connected:
                return startRelaying()
            case .inProgress where !askedAgain:
                askedAgain = true
                return .askConnectAgain
            case .inProgress:
                return watch(client: 0, target: EventLoop.Events.writable)
            case .failed(let e):
                return close(.connectFailed(e))
            }
        case .ready(let side):
            switch phase {
            case .connecting:
                // Only the target is watched while connecting; a client event is stale.
                return side == .target ? .readPendingError : .wait
            case .relaying:
                startTurn()
                return next()
            case .closed:
                preconditionFailure("unreachable")
            }
        case .readiness(let side, let events):
            switch phase {
            case .connecting:
                return side == .target ? .readPendingError : .wait
            case .relaying:
                startTurn(for: side, events: events)
                return next()
            case .closed:
                preconditionFailure("unreachable")
            }
        case .pendingError(let error):
            precondition(phase == .connecting, "SO_ERROR while \(phase)")
            if let error { return close(.connectFailed(error)) }
            return startRelaying()
        case .spliced(let d, let result):
            precondition(phase == .relaying, "splice result while \(phase)")
            let out = flow(d).pending > 0  // the splice asked for was out of the pipe
            switch result {
            case .moved(let n):
                update(d) {
                    $0.steps -= 1
                    if out { $0.pending -= n } else { $0.pending = n }
                    precondition($0.pending >= 0, "spliced more than the pipe held")
                    if out { $0.destinationBlocked = false }
                }
            case .endOfFile where out:
                // A pipe holding bytes cannot be at its end: the kernel says otherwise.
                return close(.broken(.inputOutput))
            case .endOfFile:
                update(d) {
                    $0.steps -= 1
                    $0.sourceEnded = true
                }
            case .wouldBlock where out:
                update(d) {
                    $0.destinationBlocked = true
                    $0.idle = true
                }
            case .wouldBlock:
                update(d) { $0.idle = true }
            case .failed(let e):
                return close(.broken(e))
            }
            return next()
        case .pipe(let d, let taken):
            guard taken else { return close(.outOfPipes) }
            update(d) { $0.hasPipe = true }
            return next()
        case .shutDown(let d, let failure):
            if let failure { return close(.broken(failure)) }
            update(d) {
                $0.finished = true
                $0.idle = true
            }
            if up.finished && down.finished { return close(.finished) }
            return flow(d).hasPipe ? .releasePipe(d) : next()
        case .pipeReleased(let d):
            update(d) { $0.hasPipe = false }
            return next()
        case .watched(let ok):
            guard ok else { return close(.unwatchable) }
            (clientInterest, targetInterest) = requested
            return .wait
        case .preambleSent(let result):
            precondition(phase == .relaying && preambleLeft > 0, "preamble result while \(phase), \(preambleLeft) left")
            switch result {
            case .moved(let n):
                precondition(n <= preambleLeft, "sent more than the preamble")
                preambleLeft -= n
                update(.up) {
                    $0.steps -= 1
                    $0.destinationBlocked = false
                }
            case .wouldBlock:
                update(.up) {
                    $0.destinationBlocked = true
                    $0.idle = true
                }
            case .endOfFile:
                // send(2) never reports an end of file; a 0-byte send of a non-empty preamble
                // would loop forever.
                return close(.broken(.inputOutput))
            case .failed(let e):
                return close(.broken(e))
            }
            return next()
        }
    }

    // MARK: Transitions

    /// The first turn of relaying, just after the connect: only the up direction, whose
    /// client may have sent something while the target was being connected; the target, just
    /// connected, has sent nothing yet (should it have, epoll reports it at once: the interest
    /// is level-triggered). This spares the down direction's splice, which would only say
    /// EAGAIN.
    private mutating func startRelaying() -> Action {
        phase = .relaying
        startTurn()
        down.idle = true
        return next()
    }

    private mutating func startTurn() {
        up.idle = up.finished
        up.steps = Self.stepsPerTurn
        down.idle = down.finished
        down.steps = Self.stepsPerTurn
    }

    /// A turn for the directions that `events` on `side` concern: the one reading from `side`
    /// when it is readable (EPOLLIN), the one writing to it when it is writable (EPOLLOUT), both
    /// on a hang-up or an error (their splice or shutdown then tells what happened). The other
    /// direction stays idle: whatever it waits for is in the epoll interest (its source's
    /// EPOLLIN, its destination's EPOLLOUT while its pipe holds bytes, or the preamble's), and
    /// the interest is level-triggered, so epoll reports it in its own event. This spares the
    /// splices that could only say EAGAIN.
    private mutating func startTurn(for side: TCPSide, events: UInt32) {
        startTurn()
        let both = events & (EventLoop.Events.hangup | EventLoop.Events.error) != 0
        let reading: TCPDirection = side == .client ? .up : .down
        if !both && events & EventLoop.Events.readable == 0 { update(reading) { $0.idle = true } }
        if !both && events & EventLoop.Events.writable == 0 {
            update(reading == .up ? .down : .up) { $0.idle = true }
        }
    }

    private mutating func close(_ ending: Ending) -> Action {
        phase = .closed
        return .close(ending)
    }

    private mutating func watch(client: UInt32, target: UInt32) -> Action {
        guard client != clientInterest || target != targetInterest else { return .wait }
        requested = (client, target)
        return .watch(client: client, target: target)
    }

    /// The next step of the turn: the up direction until it is idle, then the down one, then
    /// the interest.
    private mutating func next() -> Action {
        if let action = step(.up) { return action }
        if let action = step(.down) { return action }
        return watch(client: interest(of: .client), target: interest(of: .target))
    }

    /// The next action of direction `d` in this turn, or nil when it has nothing more to do.
    private mutating func step(_ d: TCPDirection) -> Action? {
        let f = flow(d)
        if f.idle || f.finished {
            // An empty pipe is not kept by an idle direction.
            if !f.finished && f.hasPipe && f.pending == 0 { return .releasePipe(d) }
            return nil
        }
        // A drained direction whose source ended is shut down even when its splices for the
        // turn are spent: nothing in the epoll interest would bring it back for that.
        // The last direction to end needs no shutdown: both sockets' ends of file were read, so
        // close(2) sends the FIN itself (nothing unread, so no reset).
        if f.sourceEnded && f.pending == 0 && !(d == .up && preambleLeft > 0) {
            return flow(d == .up ? .down : .up).finished ? close(.finished) : .shutdownWrite(d)
        }
        if f.steps <= 0 {
            update(d) { $0.idle = true }
            return step(d)
        }
        if d == .up && preambleLeft > 0 { return .writePreamble(count: preambleLeft) }
        if f.pending > 0 { return .spliceOut(d, count: f.pending) }
        if !f.hasPipe { return .takePipe(d) }
        return .spliceIn(d)
    }

    /// What epoll is to watch on `side` once the turn is over.
    private func interest(of side: TCPSide) -> UInt32 {
        let reading = side == .client ? up : down  // the direction `side` is the source of
        let writing = side == .client ? down : up  // the direction `side` is the destination of
        var events: UInt32 = 0
        if !reading.sourceEnded && !reading.destinationBlocked { events |= EventLoop.Events.readable }
        if writing.pending > 0 || (side == .target && preambleLeft > 0) { events |= EventLoop.Events.writable }
        return events
    }
}

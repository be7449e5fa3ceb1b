// SPDX-License-Identifier: GPL-2.0-or-later

// StoreWriter: the state store's writer thread, so that no save holds the event loop.
//
// Theory of operation
// -------------------
// The loop thread hands each batch of committed changes to `record` and goes on serving
// (Status calls, relayed traffic, the next changes). One writer thread takes the batches in
// order and saves each in one durable SQLite transaction (StoreDatabase.swift); its outcome
// (nil, or the error) is queued and the writer signals an eventfd that the loop watches.
// The loop then runs the batches' completions in the order recorded, on the loop thread:
// CommitBatch.swift sends the replies there, or undoes and refuses the changes.
//
// The loop waits for the writer in one case only: `finishRecording()`, which CommitBatch
// calls where the server needs every committed change saved before it goes on (before the
// lock holder's changes go on top of committed ones, before a large change starts, before
// a takeover hands the tables over, at exit). There it blocks until the writer is idle.
//
// Once a commit leaves the WAL past `StoreDatabase.checkpointFrames` pages, the writer wakes
// a second thread, which checkpoints through a connection of its own (a passive checkpoint
// takes no lock a commit needs): no commit waits for a checkpoint, the loop never does.
//
// Only `Shared` crosses threads, under its mutex; the database belongs to the writer
// thread once it has started. Completions never leave the loop thread.

import Logging
import PestoEngine
import PestoModel
import PestoSystem

#if canImport(Glibc)
    import Glibc
#endif

/// Saves batches of changes to a `StoreDatabase` on a thread of its own.
final class StoreWriter: EventHandler {
    /// What the loop thread and the writer thread share, under `mutex`.
    private final class Shared: @unchecked Sendable {
        let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
        let changed = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
        /// Batches waiting for the writer.
        var queue: [StoreBatch] = []
        /// Outcomes of saved batches, oldest first, not yet taken by the loop.
        var outcomes: [PestoError?] = []
        /// The writer is saving a batch it took from `queue`.
        var saving = false
        var stopping = false
        /// The WAL has grown: the checkpoint thread has work.
        var checkpointWanted = false
        /// The database: the writer thread's alone once it runs.
        let database: StoreDatabase
        /// The eventfd the loop watches.
        let wakeFD: Int32

        init(database: StoreDatabase, wakeFD: Int32) {
            self.database = database
            self.wakeFD = wakeFD
            pthread_mutex_init(mutex, nil)
            pthread_cond_init(changed, nil)
        }

        deinit {
            pthread_cond_destroy(changed)
            pthread_mutex_destroy(mutex)
            mutex.deallocate()
            changed.deallocate()
        }

        /// The checkpoint thread's nice value (the loop's and the writer's are pestod's).
        static let checkpointNice: Int32 = 10

        func lock() { pthread_mutex_lock(mutex) }
        func unlock() { pthread_mutex_unlock(mutex) }

        /// The writer thread's body: saves batches in order until stopped with nothing queued.
        func writerLoop() {
            // Signals are the loop thread's (they write its eventfd); SQLite's calls here are
            // never interrupted by them.
            var all = sigset_t()
            sigfillset(&all)
            pthread_sigmask(SIG_BLOCK, &all, nil)
            // The writer runs at the loop's priority: a commit's reply waits for it. (Niced,
            // it waited many milliseconds for a CPU wherever other work kept them busy.)
            lock()
            while true {
                if queue.isEmpty {
                    if stopping { break }
                    pthread_cond_wait(changed, mutex)
                    continue
                }
                let batch = queue.removeFirst()
                saving = true
                unlock()
                var outcome: PestoError?
                do throws(PestoError) { try database.apply(batch) } catch { outcome = error }
                lock()
                outcomes.append(outcome)
                saving = false
                if database.wantsCheckpoint { checkpointWanted = true }
                pthread_cond_broadcast(changed)
                var one: UInt64 = 1
                _ = Sys.write(wakeFD, &one, 8)  // EAGAIN: already signalled, which is all it says
            }
            unlock()
        }

        /// The checkpoint thread's body: checkpoints through `connection` when the writer asks.
        func checkpointLoop(_ connection: SQLiteDatabase) {
            var all = sigset_t()
            sigfillset(&all)
            pthread_sigmask(SIG_BLOCK, &all, nil)
            // Nobody waits for a checkpoint: where the CPUs are busy, the loop and the writer go
            // first. (Refused: it runs at their priority.)
            _ = Sys.setThreadNice(Self.checkpointNice)
            lock()
            while !stopping {
                guard checkpointWanted else {
                    pthread_cond_wait(changed, mutex)
                    continue
                }
                checkpointWanted = false
                unlock()
                StoreDatabase.checkpoint(connection)
                lock()
            }
            unlock()
            connection.close()
        }
    }

    /// Starts `body` with `shared` on a new thread; returns it (to join).
    private static func startThread(_ shared: Shared, _ body: @escaping (Shared) -> Void) throws(PestoError) -> pthread_t {
        final class Start {
            let shared: Shared
            let body: (Shared) -> Void
            init(_ shared: Shared, _ body: @escaping (Shared) -> Void) {
                self.shared = shared
                self.body = body
            }
        }
        var thread = pthread_t()
        let context = Unmanaged.passRetained(Start(shared, body)).toOpaque()
        let rc = pthread_create(
            &thread, nil,
            { context in
                let start = Unmanaged<Start>.fromOpaque(context!).takeRetainedValue()
                start.body(start.shared)
                return nil
            }, context)
        guard rc == 0 else {
            Unmanaged<Start>.fromOpaque(context).release()
            throw PestoError(.system, "Cannot start a thread of the state store.", underlyingError: Errno(rawValue: rc))
        }
        return thread
    }

    private let shared: Shared
    private var thread: pthread_t?
    private var checkpointThread: pthread_t?
    private let loop: EventLoop
    /// Completions of the batches recorded and not yet answered, oldest first.
    private var completions: [(PestoError?) -> Void] = []
    private var closed = false

    /// Starts the writer thread for `database` and watches its eventfd on `loop`.
    init(database: StoreDatabase, loop: EventLoop) throws(PestoError) {
        let fd: Int32
        switch Sys.eventFD() {
        case .success(let opened): fd = opened
        case .failure(let e): throw PestoError(.system, "Cannot create the state store's eventfd.", underlyingError: e)
        }
        shared = Shared(database: database, wakeFD: fd)
        self.loop = loop
        loop.setHandler(self, for: EngineEventKind.stateStore)
        do throws(PestoError) {
            try loop.add(fd: fd, events: EventLoop.Events.readable, kind: EngineEventKind.stateStore)
        } catch {
            Sys.close(fd)
            throw error
        }
        do throws(PestoError) {
            let checkpointConnection = try SQLiteDatabase(path: database.database.path, create: false)
            thread = try Self.startThread(shared) { $0.writerLoop() }
            checkpointThread = try Self.startThread(shared) { $0.checkpointLoop(checkpointConnection) }
        } catch {
            if let thread {
                shared.lock()
                shared.stopping = true
                pthread_cond_broadcast(shared.changed)
                shared.unlock()
                pthread_join(thread, nil)
            }
            loop.remove(fd: fd)
            Sys.close(fd)
            throw error
        }
    }

    /// Queues `changes` for the writer; `completion` runs on the loop thread once they are
    /// saved (nil) or are not (the error, and then nothing of them is in the store).
    func record(_ changes: StoreBatch, completion: @escaping (PestoError?) -> Void) {
        precondition(!closed, "a change is recorded after the state store was closed")
        completions.append(completion)
        shared.lock()
        shared.queue.append(changes)
        pthread_cond_broadcast(shared.changed)
        shared.unlock()
    }

    /// Blocks until every batch recorded so far is saved or failed, and runs their completions.
    func finishRecording() {
        guard !completions.isEmpty else { return }
        shared.lock()
        while !shared.queue.isEmpty || shared.saving { pthread_cond_wait(shared.changed, shared.mutex) }
        shared.unlock()
        deliver()
    }

    /// Runs the completions of the batches the writer has finished, in order.
    private func deliver() {
        shared.lock()
        let outcomes = shared.outcomes
        shared.outcomes.removeAll(keepingCapacity: true)
        shared.unlock()
        for outcome in outcomes {
            let completion = completions.removeFirst()
            completion(outcome)
        }
    }

    /// The writer's eventfd: batches are done.
    func handleEvent(_ events: UInt32, index: UInt32, fd: Int32) {
        var value: UInt64 = 0
        _ = Sys.read(fd, &value, 8)  // EAGAIN: drained by an earlier event; the outcomes say what is done
        deliver()
    }

    /// Saves what is queued, stops the writer thread and closes the eventfd (at exit).
    func close() {
        guard !closed else { return }
        finishRecording()
        closed = true
        shared.lock()
        shared.stopping = true
        pthread_cond_broadcast(shared.changed)
        shared.unlock()
        if let thread { pthread_join(thread, nil) }
        if let checkpointThread { pthread_join(checkpointThread, nil) }
        loop.remove(fd: shared.wakeFD)
        Sys.close(shared.wakeFD)
    }
}

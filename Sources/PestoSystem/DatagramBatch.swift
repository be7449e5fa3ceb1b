// SPDX-License-Identifier: GPL-2.0-or-later

// DatagramBatch: buffers for recvmmsg(2)/sendmmsg(2), allocated once, reused for every batch.

import CPestoSys
import PestoModel

#if canImport(Glibc)
    import Glibc
#endif

/// `capacity` datagram slots (at most `DatagramBatch.maxCount`), each with its own buffer of
/// `bufferSize` bytes, its sender and its local end: what one `Sys.receiveBatch` fills and
/// one `Sys.sendBatch` sends. Allocated once by its owner; nothing is allocated per batch.
/// Belongs to one thread.
package final class DatagramBatch {
    /// The most datagrams one batch call handles (the C shim's stack arrays are this long).
    package static let maxCount = Int(PESTO_BATCH_MAX)

    /// How many slots there are.
    package let capacity: Int
    /// The bytes each slot's buffer holds.
    package let bufferSize: Int
    private let slots: UnsafeMutablePointer<pesto_datagram>
    private let data: UnsafeMutableRawBufferPointer

    /// `capacity` slots of `bufferSize` bytes each.
    package init(capacity: Int, bufferSize: Int) {
        precondition(capacity >= 1 && capacity <= Self.maxCount, "batch capacity \(capacity) is not in 1...\(Self.maxCount)")
        precondition(bufferSize >= 1, "batch buffer size must be positive")
        self.capacity = capacity
        self.bufferSize = bufferSize
        data = UnsafeMutableRawBufferPointer.allocate(byteCount: capacity * bufferSize, alignment: 16)
        slots = UnsafeMutablePointer<pesto_datagram>.allocate(capacity: capacity)
        for i in 0..<capacity {
            slots[i] = pesto_datagram()
            slots[i].data = data.baseAddress! + i * bufferSize
            slots[i].capacity = bufferSize
        }
    }

    deinit {
        slots.deallocate()
        data.deallocate()
    }

    /// The bytes of slot `i`'s datagram (its buffer holds `bufferSize`).
    package func bytes(_ i: Int) -> UnsafeMutableRawPointer { slots[i].data! }

    /// How many bytes slot `i` received.
    package func length(_ i: Int) -> Int { Int(slots[i].length) }

    /// The sender of slot `i`'s datagram.
    package func peer(_ i: Int) -> SocketAddress {
        var address = SocketAddress()
        address.storage = slots[i].peer
        address.length = slots[i].peer_len
        return address
    }

    /// Where slot `i`'s datagram arrived (no address unless the socket asked for pktinfo).
    package func local(_ i: Int) -> PacketInfo { PacketInfo(slots[i].local) }

    /// Makes slot `i` go to `address` from `local`'s address when sent with
    /// `Sys.sendBatchEach` (its bytes and length stay as they are).
    package func setDestination(_ i: Int, to address: SocketAddress, from local: PacketInfo) {
        slots[i].peer = address.storage
        slots[i].peer_len = address.length
        slots[i].local = local.raw
    }

    /// The C slots, for the wrappers below.
    fileprivate var raw: UnsafeMutablePointer<pesto_datagram> { slots }
}

extension Sys {
    /// `recvmmsg(2)` of up to `count` datagrams (at most the batch's capacity) into the first
    /// slots of `batch`, each with its sender and local end. Returns how many arrived (at least
    /// one); EAGAIN (`.wouldBlock`) when none was waiting. Allocates nothing.
    /// With `start`, the datagrams go to the slots from `start` on.
    package static func receiveBatch(
        _ fd: Int32, into batch: DatagramBatch, at start: Int = 0, count: Int, flags: Int32
    ) -> Result<Int, Errno> {
        precondition(
            start >= 0 && count >= 1 && start + count <= batch.capacity,
            "batch of \(count) from \(start) does not fit \(batch.capacity) slots")
        return call(.recvmsg, fd: fd) { pesto_recv_batch(fd, batch.raw + start, UInt32(count), flags) }.map { Int($0) }
    }

    /// `sendmmsg(2)` of the slots `range` of `batch` (their lengths as received or set) to
    /// `address`, each leaving from `local`'s address as `sendMessage` does. Returns how many
    /// were sent, from the range's start: fewer than the range when the one after the last
    /// sent failed (its errno is lost; the caller decides about the rest); a failure when the
    /// first did.
    package static func sendBatch(
        _ fd: Int32, _ batch: DatagramBatch, range: Range<Int>, flags: Int32, to address: SocketAddress, from local: PacketInfo
    ) -> Result<Int, Errno> {
        precondition(
            !range.isEmpty && range.lowerBound >= 0 && range.upperBound <= batch.capacity, "batch range \(range) is not in the slots")
        var raw = local.raw
        let family = address.family
        let first = batch.raw + range.lowerBound
        return address.withSockaddr { sa, len in
            call(.sendmsg, fd: fd) { pesto_send_batch(fd, first, UInt32(range.count), flags, sa, len, family, &raw) }.map { Int($0) }
        }
    }

    /// `sendmmsg(2)` of the slots `range` of `batch`, each to its own destination from its own
    /// local address (`DatagramBatch.setDestination`). Returns as `sendBatch`.
    package static func sendBatchEach(_ fd: Int32, _ batch: DatagramBatch, range: Range<Int>, flags: Int32) -> Result<Int, Errno> {
        precondition(
            !range.isEmpty && range.lowerBound >= 0 && range.upperBound <= batch.capacity, "batch range \(range) is not in the slots")
        return call(.sendmsg, fd: fd) { pesto_send_batch_each(fd, batch.raw + range.lowerBound, UInt32(range.count), flags) }
            .map { Int($0) }
    }

    /// `sendmmsg(2)` on the connected socket `fd` of `count` slots of `batch`, those named by
    /// `index[0..<count]`, in that order. Returns as `sendBatch`.
    package static func sendBatchConnected(
        _ fd: Int32, _ batch: DatagramBatch, index: UnsafePointer<UInt8>, count: Int, flags: Int32
    ) -> Result<Int, Errno> {
        precondition(count >= 1 && count <= batch.capacity, "batch of \(count) does not fit \(batch.capacity) slots")
        return call(.sendmsg, fd: fd) { pesto_send_batch_connected(fd, batch.raw, index, UInt32(count), flags) }.map { Int($0) }
    }
}

// SPDX-License-Identifier: GPL-2.0-or-later

// DBusWireMessage: outgoing messages marshalled here, in one pass, and handed to libdbus whole.
//
// Theory of operation
// -------------------
// libdbus keeps a message's body signature in its header. `dbus_message_iter_append_basic`
// at the top level of a body opens that signature, appends one type code and writes the
// header field back (`_dbus_header_set_field_basic`, which re-marshals and realigns the
// header): measured with callgrind, about 15,000 instructions per top-level argument, so
// 77,000 of the 142,000 pestod spent per Status call (five top-level values), and more per
// signal (PropertiesChanged has three, RuleStateChanged four). Values inside a container do
// not pay it; top-level ones cannot avoid it through libdbus's API.
//
// So a reply, a signal or a method call is written here in the D-Bus wire format (little
// endian, the alignment rules of the specification) — header fields and body — and turned
// into a DBusMessage by `dbus_message_demarshal`, which validates it as it would validate a
// message read from the bus (about 20,000 instructions for a Status reply). Anything it
// refuses (a value the contract never produces: an ill-formed object path, a signature over
// 255 bytes, an array element signature that does not match its items) makes the caller
// fall back to building the message through libdbus's iterators, as before.
//
// Serials: libdbus gives a message a serial when it is sent only if it has none, and a
// demarshalled message must have one. Messages built here take theirs from a counter of
// their own in the upper half of the serial space (0x8000_0000 and up), far from libdbus's
// counter, which starts at 1; a serial only identifies a method call for its reply, and
// replies and signals are never answered.

import CDBus
import Synchronization

/// An outgoing message in the D-Bus wire format, built without libdbus.
package struct DBusWireMessage {
    /// Header field codes of the specification.
    package enum Field: UInt8 {
        case path = 1
        case interface = 2
        case member = 3
        case errorName = 4
        case replySerial = 5
        case destination = 6
        case signature = 8
    }

    /// The serials of messages built here (see the theory of operation).
    private static let serials = Atomic<UInt32>(0)

    /// The next serial: non-zero, in 0x8000_0000...0xFFFF_FFFF.
    static func nextSerial() -> UInt32 {
        0x8000_0000 | (serials.wrappingAdd(1, ordering: .relaxed).newValue & 0x7FFF_FFFF)
    }

    /// Builds the message of `type` with `fields` and `body`; nil when libdbus refuses it (the
    /// caller then builds it through libdbus's iterators). `noReply` sets NO_REPLY_EXPECTED.
    package static func make(type: Int32, noReply: Bool, fields: [(Field, DBusValue)], body: [DBusValue]) -> DBusMessage? {
        make(type: type, noReply: noReply, fields: fields, body: body, maxBytes: Int.max).message
    }

    /// What `make(type:noReply:fields:body:maxBytes:)` built, or how large it would have been.
    package struct Sized {
        /// The message; nil when libdbus refused it or when it is over the size asked for.
        package var message: DBusMessage?
        /// The message's size in bytes (header and body) as it goes on the wire; for a
        /// message over `maxBytes`, its body's size alone (the header adds a few hundred).
        package var bytes: Int

        package init(message: DBusMessage?, bytes: Int) {
            self.message = message
            self.bytes = bytes
        }
    }

    /// `make`, refusing to hand a message larger than `maxBytes` (or libdbus's maximum) to
    /// libdbus: `bytes` then says how large it is, and `message` is nil.
    package static func make(type: Int32, noReply: Bool, fields: [(Field, DBusValue)], body: [DBusValue], maxBytes: Int) -> Sized {
        var signature = ""
        for v in body { signature += v.signature }
        guard signature.utf8.count <= 255 else { return Sized(message: nil, bytes: 0) }
        var bodyWriter = Writer()
        bodyWriter.bytes.reserveCapacity(64)
        for v in body { bodyWriter.write(v) }
        // libdbus's maximum message size is 128 MiB; a bus's is usually less.
        guard bodyWriter.bytes.count < min(1 << 27, maxBytes) else { return Sized(message: nil, bytes: bodyWriter.bytes.count) }

        return assemble(type: type, noReply: noReply, fields: fields, signature: signature, body: bodyWriter.bytes, maxBytes: maxBytes)
    }

    /// The message of `type` with `fields` around `body`, already in the wire format with
    /// signature `signature` (written by a `Writer`, perhaps over several loop turns), unless
    /// it is larger than `maxBytes`.
    package static func assemble(
        type: Int32, noReply: Bool, fields: [(Field, DBusValue)], signature: String, body: [UInt8], maxBytes: Int
    ) -> Sized {
        guard signature.utf8.count <= 255 else { return Sized(message: nil, bytes: 0) }
        guard body.count < min(1 << 27, maxBytes) else { return Sized(message: nil, bytes: body.count) }
        var header = Writer()
        header.bytes.reserveCapacity(160 + body.count)
        header.bytes.append(UInt8(ascii: "l"))  // little endian
        header.bytes.append(UInt8(truncatingIfNeeded: type))
        header.bytes.append(noReply ? 0x1 : 0)  // NO_REPLY_EXPECTED
        header.bytes.append(1)  // protocol version
        header.uint32(UInt32(body.count))
        header.uint32(nextSerial())
        // a(yv): the header fields.
        let lengthAt = header.bytes.count
        header.uint32(0)
        let start = header.bytes.count  // 16: already 8-aligned
        var all = fields
        if !signature.isEmpty { all.append((.signature, .signature(signature))) }
        for (code, value) in all {
            header.pad(to: 8)
            header.bytes.append(code.rawValue)
            header.write(.variant(value))
        }
        header.patch(uint32: UInt32(header.bytes.count - start), at: lengthAt)
        header.pad(to: 8)
        header.bytes.append(contentsOf: body)

        var error = DBusError()
        dbus_error_init(&error)
        defer { dbus_error_free(&error) }
        let total = header.bytes.count
        guard total <= maxBytes else { return Sized(message: nil, bytes: total) }
        let raw = header.bytes.withUnsafeBufferPointer { buffer in
            buffer.withMemoryRebound(to: CChar.self) { dbus_message_demarshal($0.baseAddress, Int32(buffer.count), &error) }
        }
        return Sized(message: raw.map { DBusMessage(owning: $0) }, bytes: total)
    }

    /// Appends values in the wire format, aligned as if the buffer started a message (a body
    /// starts 8-aligned, so its own offsets align the same).
    package struct Writer {
        package var bytes: [UInt8] = []

        package init() {}

        package mutating func pad(to alignment: Int) {
            while bytes.count % alignment != 0 { bytes.append(0) }
        }

        mutating func uint16(_ v: UInt16) {
            pad(to: 2)
            withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) }
        }

        package mutating func uint32(_ v: UInt32) {
            pad(to: 4)
            withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) }
        }

        mutating func uint64(_ v: UInt64) {
            pad(to: 8)
            withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) }
        }

        /// Overwrites the uint32 at `offset` (an array's length, known once written).
        package mutating func patch(uint32 v: UInt32, at offset: Int) {
            withUnsafeBytes(of: v.littleEndian) { for (k, b) in $0.enumerated() { bytes[offset + k] = b } }
        }

        /// A string's bytes up to its first NUL, as the iterator path sends it.
        private mutating func text(_ s: String, lengthBytes: Int) {
            var s = s
            s.withUTF8 { utf8 in  // contiguous bytes: a String's UTF8View slices copied byte by byte
                let count = utf8.firstIndex(of: 0) ?? utf8.count
                if lengthBytes == 1 { bytes.append(UInt8(truncatingIfNeeded: count)) } else { uint32(UInt32(count)) }
                bytes.append(contentsOf: UnsafeBufferPointer(rebasing: utf8[..<count]))
                bytes.append(0)
            }
        }

        /// The alignment of the type whose signature starts with `code`.
        static func alignment(_ code: UInt8?) -> Int {
            switch code {
            case UInt8(ascii: "n"), UInt8(ascii: "q"): return 2
            case UInt8(ascii: "b"), UInt8(ascii: "i"), UInt8(ascii: "u"), UInt8(ascii: "s"), UInt8(ascii: "o"), UInt8(ascii: "a"),
                UInt8(ascii: "h"):
                return 4
            case UInt8(ascii: "x"), UInt8(ascii: "t"), UInt8(ascii: "d"), UInt8(ascii: "("), UInt8(ascii: "{"): return 8
            default: return 1  // y, g, v
            }
        }

        /// Appends `value`.
        package mutating func write(_ value: DBusValue) {
            switch value {
            case .byte(let v): bytes.append(v)
            case .bool(let v): uint32(v ? 1 : 0)
            case .int16(let v): uint16(UInt16(bitPattern: v))
            case .uint16(let v): uint16(v)
            case .int32(let v): uint32(UInt32(bitPattern: v))
            case .uint32(let v): uint32(v)
            case .int64(let v): uint64(UInt64(bitPattern: v))
            case .uint64(let v): uint64(v)
            case .double(let v): uint64(v.bitPattern)
            case .string(let s), .objectPath(let s): text(s, lengthBytes: 4)
            case .signature(let s): text(s, lengthBytes: 1)
            case .array(let element, let items):
                array(elementAlignment: Self.alignment(element.utf8.first)) { w in for item in items { w.write(item) } }
            case .dictionary(_, _, let entries):
                array(elementAlignment: 8) { w in
                    for e in entries {
                        w.pad(to: 8)
                        w.write(e.key)
                        w.write(e.value)
                    }
                }
            case .structure(let fields):
                pad(to: 8)
                for f in fields { write(f) }
            case .variant(let inner):
                text(inner.signature, lengthBytes: 1)
                write(inner)
            }
        }

        /// An array: its byte length (not counting the padding before the first element), then
        /// the elements `body` writes.
        private mutating func array(elementAlignment: Int, _ body: (inout Writer) -> Void) {
            uint32(0)
            let lengthAt = bytes.count - 4
            pad(to: elementAlignment)
            let start = bytes.count
            body(&self)
            patch(uint32: UInt32(bytes.count - start), at: lengthAt)
        }
    }
}

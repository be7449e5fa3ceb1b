// SPDX-License-Identifier: GPL-2.0-or-later

// DBusValue: any D-Bus value as a Swift tree, with its signature, read from and written to
// libdbus messages through DBusMessageIter (libdbus's variadic helpers are not callable from Swift).

import CDBus

/// A D-Bus value of any type the contract uses (and the other basic types, for robustness).
///
/// Incoming messages are read whole into `[DBusValue]` and then checked against the method's
/// signature before any decoding, so a client sending wrong types gets `InvalidArgs` and the
/// handlers only ever see well-typed arguments.
public indirect enum DBusValue: Equatable, Sendable {
    case byte(UInt8)
    case bool(Bool)
    case int16(Int16)
    case uint16(UInt16)
    case int32(Int32)
    case uint32(UInt32)
    case int64(Int64)
    case uint64(UInt64)
    case double(Double)
    case string(String)
    case objectPath(String)
    case signature(String)
    /// An array with its element signature (needed for empty arrays).
    case array(element: String, [DBusValue])
    /// A dictionary `a{KV}` with its key and value signatures, entries in order.
    case dictionary(key: String, value: String, [DictEntry])
    case structure([DBusValue])
    case variant(DBusValue)

    /// One `{key, value}` entry of a dictionary.
    public struct DictEntry: Equatable, Sendable {
        public var key: DBusValue
        public var value: DBusValue
        public init(_ key: DBusValue, _ value: DBusValue) {
            self.key = key
            self.value = value
        }
    }

    /// The value's D-Bus type signature.
    public var signature: String {
        switch self {
        case .byte: return "y"
        case .bool: return "b"
        case .int16: return "n"
        case .uint16: return "q"
        case .int32: return "i"
        case .uint32: return "u"
        case .int64: return "x"
        case .uint64: return "t"
        case .double: return "d"
        case .string: return "s"
        case .objectPath: return "o"
        case .signature: return "g"
        case .array(let element, _): return "a" + element
        case .dictionary(let k, let v, _): return "a{" + k + v + "}"
        case .structure(let fields): return "(" + fields.map(\.signature).joined() + ")"
        case .variant: return "v"
        }
    }

    // MARK: Convenience constructors

    /// `a{sv}` from string keys.
    public static func vardict(_ entries: [(String, DBusValue)]) -> DBusValue {
        .dictionary(key: "s", value: "v", entries.map { DictEntry(.string($0.0), .variant($0.1)) })
    }

    /// `as`.
    public static func strings(_ xs: [String]) -> DBusValue { .array(element: "s", xs.map { .string($0) }) }

    /// `ao`.
    public static func objectPaths(_ xs: [String]) -> DBusValue { .array(element: "o", xs.map { .objectPath($0) }) }

    // MARK: Accessors (nil when the value is of another type)

    public var stringValue: String? {
        if case .string(let s) = self { return s }
        return nil
    }
    public var uint32Value: UInt32? {
        if case .uint32(let v) = self { return v }
        return nil
    }
    public var uint16Value: UInt16? {
        if case .uint16(let v) = self { return v }
        return nil
    }
    public var boolValue: Bool? {
        if case .bool(let v) = self { return v }
        return nil
    }
    public var objectPathValue: String? {
        if case .objectPath(let v) = self { return v }
        return nil
    }
    public var variantValue: DBusValue? {
        if case .variant(let v) = self { return v }
        return nil
    }
    public var arrayValue: [DBusValue]? {
        if case .array(_, let v) = self { return v }
        return nil
    }
    public var structValue: [DBusValue]? {
        if case .structure(let v) = self { return v }
        return nil
    }

    /// The entries of an `a{sv}` as (key, unwrapped value) pairs; nil for other types.
    public var vardictValue: [(String, DBusValue)]? {
        guard case .dictionary("s", "v", let entries) = self else { return nil }
        return entries.compactMap { e in
            guard let k = e.key.stringValue, let v = e.value.variantValue else { return nil }
            return (k, v)
        }
    }
}

// MARK: - Type codes

/// libdbus type codes; the DBUS_TYPE_* macros are `((int) 's')` and do not import.
enum DBusTypeCode {
    static func code(_ c: Character) -> Int32 { Int32(c.asciiValue!) }
    static let invalid: Int32 = 0
    static let byte = code("y"), bool = code("b"), int16 = code("n"), uint16 = code("q")
    static let int32 = code("i"), uint32 = code("u"), int64 = code("x"), uint64 = code("t")
    static let double = code("d"), string = code("s"), objectPath = code("o"), signature = code("g")
    static let array = code("a"), variant = code("v"), structure = code("r"), dictEntry = code("e")
}

// MARK: - Reading

extension DBusValue {
    /// Reads every argument of `message`; nil when it holds a type this layer does not read (unix fds).
    static func readAll(_ message: OpaquePointer) -> [DBusValue]? {
        var iter = DBusMessageIter()
        guard dbus_message_iter_init(message, &iter) != 0 else { return [] }
        var values: [DBusValue] = []
        repeat {
            guard let v = read(&iter) else { return nil }
            values.append(v)
        } while dbus_message_iter_next(&iter) != 0
        return values
    }

    /// The signature of the value under the iterator (libdbus allocates it).
    private static func currentSignature(_ iter: inout DBusMessageIter) -> String {
        guard let p = dbus_message_iter_get_signature(&iter) else { return "" }
        defer { dbus_free(p) }
        return String(cString: p)
    }

    private static func basic<T>(_ iter: inout DBusMessageIter, _ zero: T) -> T {
        var v = zero
        withUnsafeMutableBytes(of: &v) { dbus_message_iter_get_basic(&iter, $0.baseAddress) }
        return v
    }

    /// Reads the value under the iterator (not advancing it).
    static func read(_ iter: inout DBusMessageIter) -> DBusValue? {
        let type = dbus_message_iter_get_arg_type(&iter)
        switch type {
        case DBusTypeCode.byte: return .byte(basic(&iter, UInt8(0)))
        case DBusTypeCode.bool: return .bool(basic(&iter, UInt32(0)) != 0)
        case DBusTypeCode.int16: return .int16(basic(&iter, Int16(0)))
        case DBusTypeCode.uint16: return .uint16(basic(&iter, UInt16(0)))
        case DBusTypeCode.int32: return .int32(basic(&iter, Int32(0)))
        case DBusTypeCode.uint32: return .uint32(basic(&iter, UInt32(0)))
        case DBusTypeCode.int64: return .int64(basic(&iter, Int64(0)))
        case DBusTypeCode.uint64: return .uint64(basic(&iter, UInt64(0)))
        case DBusTypeCode.double: return .double(basic(&iter, Double(0)))
        case DBusTypeCode.string, DBusTypeCode.objectPath, DBusTypeCode.signature:
            let p = basic(&iter, UnsafePointer<CChar>?.none)
            let s = p.map { String(cString: $0) } ?? ""
            if type == DBusTypeCode.string { return .string(s) }
            return type == DBusTypeCode.objectPath ? .objectPath(s) : .signature(s)
        case DBusTypeCode.array:
            let full = currentSignature(&iter)
            let element = String(full.dropFirst())
            var sub = DBusMessageIter()
            dbus_message_iter_recurse(&iter, &sub)
            var items: [DBusValue] = []
            var entries: [DictEntry] = []
            let isDict = element.hasPrefix("{")
            while dbus_message_iter_get_arg_type(&sub) != DBusTypeCode.invalid {
                if isDict {
                    var entry = DBusMessageIter()
                    dbus_message_iter_recurse(&sub, &entry)
                    guard let k = read(&entry) else { return nil }
                    dbus_message_iter_next(&entry)
                    guard let v = read(&entry) else { return nil }
                    entries.append(DictEntry(k, v))
                } else {
                    guard let v = read(&sub) else { return nil }
                    items.append(v)
                }
                dbus_message_iter_next(&sub)
            }
            if isDict {
                // element is "{KV}": split the key (always one basic type code) from the value.
                let inner = element.dropFirst().dropLast()
                return .dictionary(key: String(inner.prefix(1)), value: String(inner.dropFirst()), entries)
            }
            return .array(element: element, items)
        case DBusTypeCode.structure:
            var sub = DBusMessageIter()
            dbus_message_iter_recurse(&iter, &sub)
            var fields: [DBusValue] = []
            while dbus_message_iter_get_arg_type(&sub) != DBusTypeCode.invalid {
                guard let v = read(&sub) else { return nil }
                fields.append(v)
                dbus_message_iter_next(&sub)
            }
            return .structure(fields)
        case DBusTypeCode.variant:
            var sub = DBusMessageIter()
            dbus_message_iter_recurse(&iter, &sub)
            guard let v = read(&sub) else { return nil }
            return .variant(v)
        default:
            return nil
        }
    }
}

// MARK: - Writing

extension DBusValue {
    /// Appends `values` to `message`; false when libdbus runs out of memory.
    @discardableResult
    package static func appendAll(_ values: [DBusValue], to message: OpaquePointer) -> Bool {
        var iter = DBusMessageIter()
        dbus_message_iter_init_append(message, &iter)
        for v in values where !v.append(to: &iter) { return false }
        return true
    }

    private func appendBasic<T>(_ iter: inout DBusMessageIter, _ code: Int32, _ value: T) -> Bool {
        var v = value
        return withUnsafeBytes(of: &v) { dbus_message_iter_append_basic(&iter, code, $0.baseAddress) } != 0
    }

    private func appendString(_ iter: inout DBusMessageIter, _ code: Int32, _ s: String) -> Bool {
        // libdbus rejects invalid UTF-8 by aborting; Swift Strings are valid UTF-8, but embedded
        // NULs would truncate, so they are cut here deliberately.
        // (Searched as bytes: iterating Characters cost several percent of a large Apply.)
        let clean = s.utf8.contains(0) ? String(decoding: s.utf8.prefix { $0 != 0 }, as: UTF8.self) : s
        return clean.withCString { cs in
            var p: UnsafePointer<CChar>? = cs
            return dbus_message_iter_append_basic(&iter, code, &p) != 0
        }
    }

    private func container(_ iter: inout DBusMessageIter, _ code: Int32, _ sig: String?, _ body: (inout DBusMessageIter) -> Bool) -> Bool {
        var sub = DBusMessageIter()
        let opened: UInt32
        if let sig {
            opened = sig.withCString { dbus_message_iter_open_container(&iter, code, $0, &sub) }
        } else {
            opened = dbus_message_iter_open_container(&iter, code, nil, &sub)
        }
        guard opened != 0 else { return false }
        guard body(&sub) else {
            dbus_message_iter_abandon_container(&iter, &sub)
            return false
        }
        return dbus_message_iter_close_container(&iter, &sub) != 0
    }

    /// Appends this value at the iterator.
    func append(to iter: inout DBusMessageIter) -> Bool {
        switch self {
        case .byte(let v): return appendBasic(&iter, DBusTypeCode.byte, v)
        case .bool(let v): return appendBasic(&iter, DBusTypeCode.bool, UInt32(v ? 1 : 0))
        case .int16(let v): return appendBasic(&iter, DBusTypeCode.int16, v)
        case .uint16(let v): return appendBasic(&iter, DBusTypeCode.uint16, v)
        case .int32(let v): return appendBasic(&iter, DBusTypeCode.int32, v)
        case .uint32(let v): return appendBasic(&iter, DBusTypeCode.uint32, v)
        case .int64(let v): return appendBasic(&iter, DBusTypeCode.int64, v)
        case .uint64(let v): return appendBasic(&iter, DBusTypeCode.uint64, v)
        case .double(let v): return appendBasic(&iter, DBusTypeCode.double, v)
        case .string(let s): return appendString(&iter, DBusTypeCode.string, s)
        case .objectPath(let s): return appendString(&iter, DBusTypeCode.objectPath, s)
        case .signature(let s): return appendString(&iter, DBusTypeCode.signature, s)
        case .array(let element, let items):
            return container(&iter, DBusTypeCode.array, element) { sub in
                items.allSatisfy { $0.append(to: &sub) }
            }
        case .dictionary(let k, let v, let entries):
            return container(&iter, DBusTypeCode.array, "{" + k + v + "}") { sub in
                entries.allSatisfy { e in
                    container(&sub, DBusTypeCode.dictEntry, nil) { entry in
                        e.key.append(to: &entry) && e.value.append(to: &entry)
                    }
                }
            }
        case .structure(let fields):
            return container(&iter, DBusTypeCode.structure, nil) { sub in
                fields.allSatisfy { $0.append(to: &sub) }
            }
        case .variant(let inner):
            return container(&iter, DBusTypeCode.variant, inner.signature) { sub in
                inner.append(to: &sub)
            }
        }
    }
}

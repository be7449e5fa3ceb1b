// SPDX-License-Identifier: GPL-2.0-or-later

// ClientText: quoting a string a client sent in an error reply or a log line.
//
// A client decides how long its strings are (an interface name, a rule key, a D-Bus member
// or path can be megabytes) and what they contain (newlines would forge log lines). Every
// message that repeats a client's string goes through `ClientText.quote`, which keeps it
// short and printable. `counted` writes counts in messages ("1 rule", "2 rules").

/// Shortens and escapes client strings for quoting, and writes counts of things.
public enum ClientText {
    /// `count` followed by `noun`, plural unless the count is 1: "1 rule", "0 rules".
    /// `plural` defaults to `noun` + "s".
    public static func counted(_ count: some BinaryInteger, _ noun: String, plural: String? = nil) -> String {
        "\(count) \(count == 1 ? noun : plural ?? noun + "s")"
    }

    /// The most Unicode scalars of a client string a message repeats.
    public static let maxQuotedScalars = 64

    /// `text` in double quotes, with control characters, quotes and backslashes escaped;
    /// a string of more than `maxQuotedScalars` scalars is cut there and followed by
    /// "…(N bytes)", N being its full UTF-8 length.
    public static func quote(_ text: some StringProtocol) -> String {
        var out = "\""
        var count = 0
        for scalar in text.unicodeScalars {
            if count == maxQuotedScalars {
                out += "\"…(\(text.utf8.count) bytes)"
                return out
            }
            count += 1
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\t": out += "\\t"
            case "\r": out += "\\r"
            default:
                if scalar.value < 0x20 || (scalar.value >= 0x7F && scalar.value < 0xA0) || scalar.value == 0x2028 || scalar.value == 0x2029
                {
                    out += "\\u{\(String(scalar.value, radix: 16))}"
                } else {
                    out.unicodeScalars.append(scalar)
                }
            }
        }
        return out + "\""
    }
}

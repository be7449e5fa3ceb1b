// SPDX-License-Identifier: GPL-2.0-or-later

// SeededRandom: reproducible randomness for fuzz tests.

/// xorshift64*: tiny, seedable, good enough for choosing test inputs, so a failing fuzz
/// run can be replayed from its printed seed.
public struct SeededRandom: RandomNumberGenerator {
    private var state: UInt64

    /// A generator; seed 0 (which xorshift cannot use) is replaced by a fixed constant.
    public init(seed: UInt64) { state = seed == 0 ? 0x9E37_79B9_7F4A_7C15 : seed }

    public mutating func next() -> UInt64 {
        state ^= state >> 12
        state ^= state << 25
        state ^= state >> 27
        return state &* 0x2545_F491_4F6C_DD1D
    }

    /// 0..<n.
    public mutating func below(_ n: Int) -> Int { Int((next() >> 11) % UInt64(max(n, 1))) }
    /// True one time in `n`.
    public mutating func oneIn(_ n: Int) -> Bool { below(n) == 0 }
    /// One element of `xs` (which must not be empty).
    public mutating func pick<T>(_ xs: [T]) -> T { xs[below(xs.count)] }
}

//! A small deterministic generator for unit tests (xorshift64): the same
//! sequence on every run, so a failure repeats.

/// The xorshift64 sequence from `seed` (not 0).
pub(crate) fn xorshift(mut x: u64) -> impl FnMut() -> u64 {
    assert_ne!(x, 0, "xorshift is stuck at 0");
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

//! Which vector kernels may run. Every SIMD kernel in data and prep is picked at run time
//! through these functions, never by a feature check of its own, so `SCGPT_PORTABLE=1` (or
//! `true`) sends the whole process down the portable twins: a machine with AVX-512 can then
//! test, time and produce what one without it does, and CI runs the data tests both ways.

use std::sync::OnceLock;

/// `SCGPT_PORTABLE` is set to `1` or `true` (read once per process).
pub fn portable() -> bool {
    static PORTABLE: OnceLock<bool> = OnceLock::new();
    *PORTABLE.get_or_init(|| portable_from(std::env::var("SCGPT_PORTABLE").ok().as_deref()))
}

fn portable_from(value: Option<&str>) -> bool {
    matches!(value.map(str::trim), Some("1") | Some("true") | Some("TRUE") | Some("True"))
}

/// AVX-512 Foundation kernels may run.
pub fn avx512f() -> bool {
    #[cfg(target_arch = "x86_64")]
    return !portable() && std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// AVX-512 Doubleword/Quadword kernels may run.
pub fn avx512dq() -> bool {
    #[cfg(target_arch = "x86_64")]
    return !portable() && std::arch::is_x86_feature_detected!("avx512dq");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// AVX2 kernels may run.
pub fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    return !portable() && std::arch::is_x86_feature_detected!("avx2");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// One line for test logs: which kernels this process runs.
pub fn describe() -> String {
    format!("avx512f: {}, avx512dq: {}, avx2: {}, SCGPT_PORTABLE: {}", avx512f(), avx512dq(), avx2(), portable())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn portable_is_read_from_the_variable() {
        for (v, want) in [
            (None, false),
            (Some("1"), true),
            (Some("true"), true),
            (Some(" 1 "), true),
            (Some("0"), false),
            (Some(""), false),
            (Some("no"), false),
        ] {
            assert_eq!(portable_from(v), want, "{v:?}");
        }
        if portable() {
            assert!(!avx512f() && !avx512dq() && !avx2(), "portable runs no vector kernel");
        }
        eprintln!("{}", describe());
    }
}

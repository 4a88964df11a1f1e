//! Helpers of the unit tests.

use std::io::Write as _;

/// Whether a test that needs root can run: as root, yes. Not root and `CI`
/// unset: prints `SKIPPED <test>: <why>` and returns false. Not root in CI:
/// fails, because CI must run every test for real.
///
/// The line goes straight to the process's stderr, past libtest's output
/// capture, so `cargo xtask test` sees and counts it.
pub fn privileged(test: &str, why: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: must run as root in CI ({why})"
    );
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED {test}: {why}");
    false
}

//! The one skip policy of Iris's tests: the integration tests' `support`
//! module and the library's Redis tests (which include this file with
//! `#[path]`) both skip through [`skip`].
//!
//! A test that cannot run on this machine (no Redis answering, no
//! `redis-server` binary, no network namespaces) calls `skip(why)`: it prints
//! `SKIPPED: <test>: <why>` to stderr and returns `None`, and the test
//! returns and passes. With `IRIS_REQUIRE_REDIS=1` (set by `.ci/run`) every
//! skip panics instead, so CI runs every test or fails.

use std::io::Write as _;

/// The variable that turns a skip into a failure.
pub const REQUIRE_ALL: &str = "IRIS_REQUIRE_REDIS";

/// Reports that the running test is skipped, and why; `None`, for the test
/// to return on. Panics instead under `IRIS_REQUIRE_REDIS=1`.
pub fn skip<T>(why: impl std::fmt::Display) -> Option<T> {
    // libtest runs every test on a thread named after it.
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("a test");
    if std::env::var(REQUIRE_ALL).as_deref() == Ok("1") {
        panic!("{REQUIRE_ALL}=1 forbids skipping {test}: {why}");
    }
    // Straight to the process's stderr: libtest captures `eprintln!` of a
    // passing test, and a skip must be seen.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: {test}: {why} ({REQUIRE_ALL}=1 makes this a failure)"
    );
    None
}

//! What every target shares: how many inputs to run, and the runner that
//! counts them. A target is a strategy and a property:
//!
//! ```ignore
//! #[test]
//! fn my_input() {
//!     support::run("my_input", 1, my_strategy(), |input| {
//!         prop_assert!(...);
//!         Ok(())
//!     });
//! }
//! ```

use std::fmt::Debug;
use std::time::Instant;

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

/// Inputs per target in a normal `cargo test` run: a few seconds in all,
/// unoptimised.
const DEFAULT_CASES: u32 = 1_000;

/// Inputs per target: `FUZZ_CASES`, or [`DEFAULT_CASES`].
pub fn cases() -> u32 {
    match std::env::var("FUZZ_CASES") {
        Ok(value) => value
            .replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("FUZZ_CASES must be a number, got {value:?}")),
        Err(_) => DEFAULT_CASES,
    }
}

/// Runs `property` on `cases() / divisor` inputs from `strategy` (a target
/// whose every input costs milliseconds takes a divisor, so a long run
/// stays balanced), panicking with the shrunk input if one fails. Prints
/// how many inputs ran, for the long run's record.
pub fn run<S>(
    name: &str,
    divisor: u32,
    strategy: S,
    property: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S: Strategy,
    S::Value: Debug,
{
    let cases = (cases() / divisor.max(1)).max(1);
    let config = Config {
        cases,
        // Inputs are checked, not stored: nothing to persist between runs
        // but the shrunk failure, which the panic message carries.
        failure_persistence: None,
        ..Config::default()
    };
    let started = Instant::now();
    let mut runner = TestRunner::new(config);
    if let Err(failure) = runner.run(&strategy, property) {
        panic!("fuzz target {name} failed: {failure}");
    }
    eprintln!(
        "fuzz target {name}: {cases} inputs in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Mutates `bytes` as a fuzzer would: each `(kind, at, value)` flips bits,
/// overwrites, inserts, deletes or truncates at `at` (taken modulo the
/// length).
pub fn mutate(mut bytes: Vec<u8>, edits: &[(u8, usize, u8)]) -> Vec<u8> {
    for &(kind, at, value) in edits {
        let len = bytes.len();
        let at = if len == 0 { 0 } else { at % len };
        match kind % 5 {
            0 if len > 0 => bytes[at] ^= value.max(1),
            1 if len > 0 => bytes[at] = value,
            2 => bytes.insert(at, value),
            3 if len > 0 => {
                bytes.remove(at);
            }
            4 => bytes.truncate(at),
            _ => {}
        }
    }
    bytes
}

/// Up to `max` edits for [`mutate`].
pub fn edits(max: usize) -> impl Strategy<Value = Vec<(u8, usize, u8)>> {
    proptest::collection::vec(
        (
            proptest::prelude::any::<u8>(),
            proptest::prelude::any::<usize>(),
            proptest::prelude::any::<u8>(),
        ),
        0..=max,
    )
}

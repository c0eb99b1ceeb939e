//! Fuzzing without a nightly toolchain: a mutation engine ([`engine`]) and the targets
//! ([`targets`]), shared by the campaign (`cargo bench --bench fuzz`) and the short run in the
//! test command (`fuzz_smoke`).

pub mod engine;
pub mod targets;

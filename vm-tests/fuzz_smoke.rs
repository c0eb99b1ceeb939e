//! A short, deterministic run of every fuzz target (the campaign is `cargo bench --bench fuzz`):
//! a fixed number of mutated inputs per target from a fixed seed, none may panic. Also replays
//! every input under `vm-tests/fuzz/regressions/<target>/` (inputs that once crashed).

#[path = "fuzz/mod.rs"]
mod fuzz;

use std::time::Duration;

use fuzz::engine::{self, State};
use fuzz::targets::ALL;

#[test]
fn every_target_survives_fifty_thousand_mutated_inputs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut outcomes = Vec::new();
    let hook = std::panic::take_hook();
    engine::quiet_panics();
    for t in ALL {
        outcomes.push(engine::run(t, Duration::from_secs(600), 50_000, 0x5eed, dir.path()));
    }
    // The test's own failures must print.
    std::panic::set_hook(hook);
    let mut failed = Vec::new();
    for (t, o) in ALL.iter().zip(outcomes) {
        assert!(o.execs >= 50_000, "{}: stopped after {} executions", t.name, o.execs);
        eprintln!("{}: {} execs, seeds {}, corpus {}, outcomes {}, crashes {}", t.name, o.execs, o.seeds, o.corpus, o.signatures, o.crashes.len());
        if !o.crashes.is_empty() {
            failed.push(format!(
                "{}: {} crashing inputs, e.g. {}: {}",
                t.name,
                o.crashes.len(),
                o.crashes[0].display(),
                o.first_panic.as_deref().unwrap_or("")
            ));
        }
        if o.crashes.is_empty() {
            assert!(o.signatures > 1, "{}: every input gave the same outcome: the target does not reach the code", t.name);
        }
    }
    // Keep the crashing inputs for a look when it fails.
    if !failed.is_empty() {
        let keep = dir.keep();
        panic!("crashes (inputs kept in {}):\n{}", keep.display(), failed.join("\n"));
    }
}

#[test]
fn regression_inputs_do_not_crash() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("vm-tests/fuzz/regressions");
    let mut n = 0;
    for t in ALL {
        let Ok(rd) = std::fs::read_dir(root.join(t.name)) else { continue };
        for e in rd.flatten() {
            let input = std::fs::read(e.path()).expect("read");
            let mut st = State::default();
            (t.run)(&mut st, &input);
            n += 1;
        }
    }
    eprintln!("{n} regression inputs replayed");
}


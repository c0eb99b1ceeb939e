//! A small mutation fuzzer for the parsers that read untrusted input (stable Rust: cargo-fuzz
//! needs a nightly toolchain, which this project's machines cannot install).
//!
//! Each target is a pure function over bytes that returns an *outcome signature*: a hash of what
//! the input made the code do (which error, which decision, how many entries). Inputs are the
//! target's seeds (real packets, archives and queries built by real tools or our own encoders)
//! mutated byte-wise and spliced with each other; an input whose signature was not seen before
//! joins the corpus (bounded), so the search keeps the inputs that reach new behaviour. It is
//! outcome-guided, not coverage-guided: it finds panics, hangs and invariant breaks in parsers
//! whose result kinds are rich (DHCP decisions, tar headers), less so deep branches that end in
//! the same error.
//!
//! A panic (an `unwrap` on input, an index out of range, a broken invariant that a target checks
//! after the call) is caught, its input written to the crash directory and counted; the run goes
//! on. The targets run in the project's one release profile, so arithmetic overflow wraps
//! silently there instead of panicking: targets check the invariants that matter explicitly. An execution that takes longer than the watchdog's limit is a hang:
//! the input is written and the process exits non-zero.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One fuzz target.
pub struct Target {
    /// Name (`--targets` and the crash file names use it).
    pub name: &'static str,
    /// Largest input handed to `run`.
    pub max_len: usize,
    /// Valid inputs to start from.
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// Runs the code under test once; returns the outcome signature.
    pub run: fn(&mut State, &[u8]) -> u64,
}

/// State a target may keep across executions (e.g. a lease table that requests act on),
/// reset every [`RESET_EVERY`] executions so one run does not drift into one corner.
#[derive(Default)]
pub struct State {
    /// Target-specific state, created by the target on first use.
    pub any: Option<Box<dyn std::any::Any>>,
}

/// Executions between state resets.
pub const RESET_EVERY: u64 = 2000;
/// Most inputs kept in a corpus.
const MAX_CORPUS: usize = 4096;

/// Hashes anything into a signature.
pub fn sig<T: Hash>(v: T) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    v.hash(&mut h);
    h.finish()
}

/// A rendering with its numbers and quoted strings left out (`Err(Truncated(12))` →
/// `Err(Truncated())`, `Name("x")` → `Name("")`), at most 64 characters: outcomes that differ only
/// in values share a signature, outcomes of different kinds do not.
pub fn shape(text: &str) -> String {
    let mut out = String::new();
    let mut quoted = false;
    for c in text.chars() {
        if c == '"' {
            quoted = !quoted;
            out.push(c);
        } else if !quoted && !c.is_ascii_digit() {
            out.push(c);
        }
        if out.len() >= 64 {
            break;
        }
    }
    out
}

/// The variant name at the start of a `Debug` rendering (`Offer { mac: … }` → `Offer`).
pub fn variant(debug: &str) -> &str {
    let end = debug.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(debug.len());
    &debug[..end]
}

/// xorshift64*: fast, deterministic from its seed (a run is reproducible with `FUZZ_SEED`).
pub struct Rng(u64);

impl Rng {
    /// From a seed (0 is replaced).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    /// Next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const INTERESTING: [u64; 14] = [0, 1, 2, 0x7f, 0x80, 0xff, 0x100, 0x7fff, 0x8000, 0xffff, 0x1_0000, 0x7fff_ffff, 0xffff_ffff, u64::MAX];

/// One to four stacked mutations of `input`, `other` for splicing.
pub fn mutate(rng: &mut Rng, input: &[u8], other: &[u8], max_len: usize) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(11) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            2 if !v.is_empty() => {
                // An interesting number, 1, 2, 4 or 8 bytes, either endianness.
                let w = 1 << rng.below(4);
                let at = rng.below(v.len());
                let n = INTERESTING[rng.below(INTERESTING.len())];
                let bytes = if rng.below(2) == 0 { n.to_be_bytes() } else { n.to_le_bytes() };
                let src = if rng.below(2) == 0 { &bytes[8 - w..] } else { &bytes[..w] };
                for (k, b) in src.iter().enumerate() {
                    if let Some(slot) = v.get_mut(at + k) {
                        *slot = *b;
                    }
                }
            }
            3 if !v.is_empty() => {
                // Delete a range.
                let a = rng.below(v.len());
                let b = (a + 1 + rng.below(16.min(v.len() - a))).min(v.len());
                v.drain(a..b);
            }
            4 => {
                // Insert random bytes.
                let at = rng.below(v.len() + 1);
                let n = 1 + rng.below(16);
                let ins: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                v.splice(at..at, ins);
            }
            5 if !v.is_empty() => {
                // Duplicate a range (repeated records, repeated options).
                let a = rng.below(v.len());
                let b = (a + 1 + rng.below(64.min(v.len() - a))).min(v.len());
                let chunk = v[a..b].to_vec();
                let at = rng.below(v.len() + 1);
                v.splice(at..at, chunk);
            }
            6 if !v.is_empty() => {
                // Truncate.
                let n = rng.below(v.len());
                v.truncate(n);
            }
            7 if !other.is_empty() => {
                // Splice: our head, the other input's tail.
                let a = rng.below(v.len() + 1);
                let b = rng.below(other.len());
                v.truncate(a);
                v.extend_from_slice(&other[b..]);
            }
            8 if !v.is_empty() => {
                // Copy a range over another place in the input.
                let a = rng.below(v.len());
                let n = 1 + rng.below(32.min(v.len() - a));
                let chunk = v[a..a + n].to_vec();
                let at = rng.below(v.len());
                for (k, b) in chunk.iter().enumerate() {
                    if let Some(slot) = v.get_mut(at + k) {
                        *slot = *b;
                    }
                }
            }
            9 if !v.is_empty() => {
                // An ASCII digit or separator (text protocols: queries, PAX records).
                let i = rng.below(v.len());
                v[i] = b"0123456789=&%;: \n"[rng.below(17)];
            }
            _ => {
                // Grow with random bytes.
                let n = 1 + rng.below(64);
                v.extend((0..n).map(|_| rng.next() as u8));
            }
        }
    }
    v.truncate(max_len);
    v
}

/// What one target's run found.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Executions.
    pub execs: u64,
    /// Seeds it started from.
    pub seeds: usize,
    /// Corpus size at the end (seeds + inputs that reached a new outcome).
    pub corpus: usize,
    /// Distinct outcome signatures seen.
    pub signatures: usize,
    /// Inputs that panicked (written under the crash directory).
    pub crashes: Vec<PathBuf>,
    /// The first panic's message.
    pub first_panic: Option<String>,
    /// Wall time.
    pub elapsed: Duration,
}

/// Runs `t` for `budget` (or `max_execs`), writing crashing inputs to `crash_dir`.
pub fn run(t: &Target, budget: Duration, max_execs: u64, seed: u64, crash_dir: &Path) -> Outcome {
    let mut rng = Rng::new(seed ^ sig(t.name));
    let seeds = (t.seeds)();
    let mut corpus: Vec<Vec<u8>> = seeds.iter().map(|s| s[..s.len().min(t.max_len)].to_vec()).collect();
    if corpus.is_empty() {
        corpus.push(Vec::new());
    }
    let mut seen = HashSet::new();
    let mut out = Outcome { seeds: seeds.len(), ..Outcome::default() };
    let mut state = State::default();
    let current = Arc::new(Mutex::new(Vec::new()));
    let progress = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let watchdog = spawn_watchdog(t.name, current.clone(), progress.clone(), done.clone(), crash_dir.to_owned());
    let start = Instant::now();
    let mut i = 0usize;
    while out.execs < max_execs && (out.execs % 64 != 0 || start.elapsed() < budget) {
        // Seeds first, as they are; then mutations of random corpus members.
        let input = if i < corpus.len() && out.execs < corpus.len() as u64 {
            corpus[i].clone()
        } else {
            let a = rng.below(corpus.len());
            let b = rng.below(corpus.len());
            mutate(&mut rng, &corpus[a], &corpus[b], t.max_len)
        };
        i += 1;
        if out.execs % RESET_EVERY == 0 {
            state = State::default();
        }
        if let Ok(mut c) = current.lock() {
            c.clone_from(&input);
        }
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (t.run)(&mut state, &input)));
        out.execs += 1;
        progress.store(out.execs, Ordering::Relaxed);
        match r {
            Ok(s) => {
                if seen.insert(s) && corpus.len() < MAX_CORPUS {
                    corpus.push(input);
                }
            }
            Err(payload) => {
                // The state may be half-updated: start it again.
                state = State::default();
                if out.first_panic.is_none() {
                    let msg = payload
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                        .unwrap_or_else(|| "(not a string)".into());
                    out.first_panic = Some(msg);
                }
                if out.crashes.len() < 100 {
                    let path = crash_dir.join(format!("{}-crash-{}.bin", t.name, out.crashes.len()));
                    if std::fs::create_dir_all(crash_dir).is_ok() && std::fs::write(&path, &input).is_ok() {
                        out.crashes.push(path);
                    }
                }
            }
        }
    }
    done.store(true, Ordering::Relaxed);
    let _ = watchdog.join();
    out.corpus = corpus.len();
    out.signatures = seen.len();
    out.elapsed = start.elapsed();
    out
}

/// Silences the panic hook (every caught panic would print a message and a backtrace); call
/// once before [`run`], from the thread that owns the process (the hook is global).
pub fn quiet_panics() {
    std::panic::set_hook(Box::new(|_| {}));
}

/// A hang (no execution finished for [`HANG_AFTER`]) writes the input and exits the process.
const HANG_AFTER: Duration = Duration::from_secs(20);

fn spawn_watchdog(
    name: &'static str,
    current: Arc<Mutex<Vec<u8>>>,
    progress: Arc<AtomicU64>,
    done: Arc<AtomicBool>,
    crash_dir: PathBuf,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut last = (progress.load(Ordering::Relaxed), Instant::now());
        while !done.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(200));
            let p = progress.load(Ordering::Relaxed);
            if p != last.0 {
                last = (p, Instant::now());
            } else if last.1.elapsed() > HANG_AFTER {
                let path = crash_dir.join(format!("{name}-hang.bin"));
                let _ = std::fs::create_dir_all(&crash_dir);
                if let Ok(c) = current.lock() {
                    let _ = std::fs::write(&path, &*c);
                }
                eprintln!("fuzz {name}: no execution finished for {HANG_AFTER:?}: input in {}", path.display());
                std::process::exit(3);
            }
        }
    })
}

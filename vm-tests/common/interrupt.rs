//! Cleanup on Ctrl-C / SIGTERM for the benchmarks: the handler writes one byte to a pipe; a
//! watcher thread kills the registered PIDs (ours only), deletes the registered namespaces and
//! the scratch directory, and exits 130.

use std::fs;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use super::{Netns, Proc};

static PIDS: Mutex<Vec<u32>> = Mutex::new(Vec::new());
static NAMESPACES: Mutex<Vec<String>> = Mutex::new(Vec::new());
static SCRATCH: Mutex<Option<PathBuf>> = Mutex::new(None);
static PIPE_W: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(_: libc::c_int) {
    let fd = PIPE_W.load(Ordering::Relaxed);
    if fd >= 0 {
        let b = [1u8];
        // SAFETY: write(2) is async-signal-safe; the buffer lives for the call.
        unsafe { libc::write(fd, b.as_ptr().cast(), 1) };
    }
}

/// Installs the SIGINT/SIGTERM handler and its watcher thread; `who` names the bench in messages.
pub fn install_cleanup(who: &'static str) {
    let mut fds = [0i32; 2];
    // SAFETY: plain pipe(2) into a local array.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        eprintln!("{who}: no pipe for the signal watcher; Ctrl-C will leave namespaces behind");
        return;
    }
    PIPE_W.store(fds[1], Ordering::Relaxed);
    let rfd = fds[0];
    std::thread::spawn(move || {
        let mut b = [0u8; 1];
        // SAFETY: blocking read of one byte from our pipe.
        let n = unsafe { libc::read(rfd, b.as_mut_ptr().cast(), 1) };
        if n != 1 {
            return;
        }
        eprintln!("\n{who}: interrupted, cleaning up");
        for pid in PIDS.lock().map(|v| v.clone()).unwrap_or_default() {
            // SAFETY: kill(2) of a PID we spawned and registered.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(200));
        for ns in NAMESPACES.lock().map(|v| v.clone()).unwrap_or_default() {
            let _ = std::process::Command::new("ip").args(["netns", "del", &ns]).status();
        }
        if let Some(d) = SCRATCH.lock().ok().and_then(|d| d.clone()) {
            let _ = fs::remove_dir_all(d);
        }
        std::process::exit(130);
    });
    // SAFETY: installing a handler that only calls write(2).
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

/// A process the watcher kills on interrupt.
pub fn register(p: &Proc) {
    if let Ok(mut v) = PIDS.lock() {
        v.push(p.child.id());
    }
}

/// A namespace the watcher deletes on interrupt.
pub fn register_ns(ns: &Netns) {
    if let Ok(mut v) = NAMESPACES.lock() {
        v.push(ns.name.clone());
    }
}

/// The scratch directory the watcher removes on interrupt.
pub fn set_scratch(dir: PathBuf) {
    if let Ok(mut d) = SCRATCH.lock() {
        *d = Some(dir);
    }
}

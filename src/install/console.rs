//! The installer's console, streamed to the appliance (SystemImager's MONITOR_CONSOLE): the
//! log writer of `si-appliance install` tees every line to stderr (the node's console) and into
//! a bounded buffer here; each progress report carries what was written since the last one, and
//! a failure report adds the last kernel messages. The appliance keeps it per node
//! (`si-appliance node log MAC`, the dashboard, the end-of-run report).

use std::collections::VecDeque;
use std::io::Write;
use std::sync::Mutex;

/// Console bytes kept between two reports at most; older text is dropped and counted.
pub const PENDING_MAX: usize = 12 << 10;

#[derive(Default)]
struct Pending {
    text: VecDeque<u8>,
    skipped: u64,
    in_escape: bool,
}

static PENDING: Mutex<Pending> = Mutex::new(Pending { text: VecDeque::new(), skipped: 0, in_escape: false });

fn pending() -> std::sync::MutexGuard<'static, Pending> {
    PENDING.lock().unwrap_or_else(|e| e.into_inner())
}

/// Keeps `bytes` for the next report, without ANSI colour sequences.
pub fn capture(bytes: &[u8]) {
    let mut p = pending();
    for &b in bytes {
        if p.in_escape {
            // CSI sequences end with a letter.
            if b.is_ascii_alphabetic() {
                p.in_escape = false;
            }
            continue;
        }
        if b == 0x1b {
            p.in_escape = true;
            continue;
        }
        if b == b'\r' {
            continue;
        }
        p.text.push_back(b);
    }
    let over = p.text.len().saturating_sub(PENDING_MAX);
    if over > 0 {
        p.text.drain(..over);
        p.skipped += over as u64;
    }
}

/// The console text written since the last call (lossy UTF-8), or `None` when there is none.
pub fn take() -> Option<String> {
    let mut p = pending();
    if p.text.is_empty() {
        return None;
    }
    let bytes: Vec<u8> = p.text.drain(..).collect();
    let skipped = std::mem::take(&mut p.skipped);
    let mut s = String::new();
    if skipped > 0 {
        s.push_str(&format!("[... {skipped} bytes of console output skipped ...]\n"));
    }
    s.push_str(&String::from_utf8_lossy(&bytes));
    Some(s)
}

/// The last `n` kernel log lines (`/dev/kmsg`, read without waiting), for a failure report.
pub fn kernel_tail(n: usize) -> String {
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(mut f) = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open("/dev/kmsg") else {
        return String::new();
    };
    let mut lines: VecDeque<String> = VecDeque::new();
    let mut buf = vec![0u8; 8192];
    // One record per read; EAGAIN at the end of the buffer. Bounded in count.
    for _ in 0..100_000 {
        match std::io::Read::read(&mut f, &mut buf) {
            Ok(0) => break,
            Ok(k) => {
                let rec = String::from_utf8_lossy(&buf[..k]);
                // "prio,seq,usec,flags;message\n"
                let msg = rec.split_once(';').map(|(_, m)| m).unwrap_or(&rec).lines().next().unwrap_or("").to_owned();
                lines.push_back(msg);
                if lines.len() > n {
                    lines.pop_front();
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // EPIPE: a record was overwritten while reading; go on.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(_) => break,
        }
    }
    lines.into_iter().map(|l| l + "\n").collect()
}

/// The installer's log writer: stderr, and [`capture`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Tee;

impl Write for Tee {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        capture(buf);
        std::io::stderr().write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Tee {
    type Writer = Tee;
    fn make_writer(&'a self) -> Tee {
        Tee
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_strips_colours_bounds_and_drains() {
        // One test owns the global buffer.
        let _ = take();
        capture(b"\x1b[32m INFO\x1b[0m phase=partitioning\r\n");
        assert_eq!(take().as_deref(), Some(" INFO phase=partitioning\n"));
        assert_eq!(take(), None);
        capture(&vec![b'x'; PENDING_MAX + 10]);
        let t = take().unwrap();
        assert!(t.starts_with("[... 10 bytes of console output skipped ...]\n"), "{}", &t[..60]);
        assert_eq!(t.len() - t.find('\n').unwrap() - 1, PENDING_MAX);
    }
}

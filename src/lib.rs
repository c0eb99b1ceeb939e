//! si-appliance: one binary that turns a laptop on a rack switch into an imaging appliance
//! (DHCP/PXE, TFTP, HTTP, image store, BitTorrent tracker and seed) and, inside the clients'
//! initramfs, into their installer.
//!
//! # Layout: the path a node takes
//! One module per arrow of the data flow; `app` starts the services and is where they meet.
//! Read the modules in the order a node meets them:
//!
//! ```text
//!  power on ── DHCP (PXE ROM, arch 93) ──▶ dhcp       classify (which stage asks) → policy
//!                                                      (pure decide) → leases (journal) →
//!                                                      service (socket loop), probe/arp/guard
//!          ── TFTP: iPXE loader        ──▶ boot       tftp, file (what a node may fetch)
//!          ── DHCP again as iPXE       ──▶ dhcp       the boot script URL
//!          ── HTTP: script, kernel,    ──▶ boot       script (iPXE/pxelinux text), http
//!             initrd (+ signing key)
//!  installer (same binary, initramfs)  ──▶ install    cmdline → plan fetch → seal (signature,
//!                                                      manifest) → disk → swarm download
//!                                                      unpacked as it arrives → settings →
//!                                                      bootloader → report → seed → reboot
//!          ── GET /api/nodes/<mac>/plan ─▶ plan       pure planner (mod) + route (http),
//!                                                      nodes (records, enrolment, tokens)
//!          ── tracker, pieces          ──▶ swarm      tracker (+ tracker_http), seed (the
//!                                                      appliance's librqbit seed), engine (the
//!                                                      nodes' client: core = pure decisions,
//!                                                      picker, guard, wire; conn, file,
//!                                                      announce = thin I/O), fetch
//!          ── progress reports         ──▶ monitor    registry (state machine) → dashboard,
//!                                                      metrics, report (JSON + charts)
//!  the images themselves               ──▶ image      store (trees, archives), scan → pack
//!                                                      (tar.zst + manifest), torrent, sign,
//!                                                      unpack (hostile-archive safe)
//! ```
//!
//! Beside the path: `types` (values every module shares: MAC, image names, info-hashes, the
//! node API, events), `config` + `cli` (one validated `Config`), `net` (interfaces, sockets,
//! the one HTTP client), `task` (named, traced, cancellable tasks), `http_serve` (the bounded
//! HTTP server), `private_file` (secrets on disk). Protocol logic is pure functions over parsed
//! messages, with table tests; sockets, files and clocks stay in thin loops around them.
//!
//! # Who may import whom
//! A module imports only the modules listed for it (test code aside); the test
//! `tests::modules_import_only_what_the_layering_allows` reads `src/` and holds this table true.
//!
//! | module | may import |
//! |---|---|
//! | `types` (newtypes, node API, firmware, events), `task`, `private_file`, `http_serve` | nothing of ours |
//! | `cli` | `types` |
//! | `net` (interfaces, sockets, the HTTP client) | `types` |
//! | `config` | `types`, `cli` (flag overrides), `nodes` (the enrolment rules) |
//! | `image` | `types`, `private_file` |
//! | `swarm` | `types`, `net`, `image`, `task` |
//! | `install` (the nodes' role) | `types`, `net`, `image` (unpack, manifest, signature), `swarm` (download side), `task`, `http_serve` (serving its boot files to peers), `update` (the installed record and credentials it leaves for updates) |
//! | `nodes` | `types`, `net`, `config`, `private_file`, `monitor` (the CLI client, clock) |
//! | `monitor` | `types`, `net`, `config`, `nodes` |
//! | `boot` | `types`, `config`, `net`, `nodes` (what a node boots) |
//! | `dhcp` | `types`, `config`, `net`, `boot` (which loaders are served), `task` |
//! | `plan` (pure planner + its route) | `types`, `config`, `nodes` |
//! | `usb` (the stick, from a workstation) | `types`, `image` |
//! | `update` (an installed node's in-place update, and its client of the appliance; `serve.rs`: the appliance's side, orders and per-version archives) | `types`, `image`, `net` (the HTTP client), `swarm` (download side; the appliance's publisher), `install` (profile steps on the live system), `nodes` (the book's orders and versions), `plan` (the node routes' token check, group profiles) |
//! | `app` | all of them: what one service publishes (archive facts, info-hashes, the event sink) reaches another as values through `app` |
//!
//! So the installer links nothing of the appliance's serving side (no `config`, `dhcp`, `boot`,
//! `plan`, `monitor`, `nodes`), and no two serving modules meet outside `app`.

pub mod app;
pub mod boot;
pub mod cli;
pub mod config;
pub mod dhcp;
pub mod http_serve;
pub mod image;
pub mod install;
pub mod monitor;
pub mod net;
pub mod nodes;
pub mod plan;
pub mod private_file;
pub mod swarm;
pub mod task;
pub mod types;
pub mod update;
pub mod usb;

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    /// The table of the crate doc: module -> the modules it may import.
    const ALLOWED: &[(&str, &[&str])] = &[
        ("types", &[]),
        ("task", &[]),
        ("private_file", &[]),
        ("http_serve", &[]),
        ("cli", &["types"]),
        ("net", &["types"]),
        ("config", &["types", "cli", "nodes"]),
        ("image", &["types", "private_file"]),
        ("swarm", &["types", "net", "image", "task"]),
        ("install", &["types", "net", "image", "swarm", "task", "http_serve", "update"]),
        ("nodes", &["types", "net", "config", "private_file", "monitor"]),
        ("monitor", &["types", "net", "config", "nodes"]),
        ("boot", &["types", "config", "net", "nodes"]),
        ("dhcp", &["types", "config", "net", "boot", "task"]),
        ("plan", &["types", "config", "nodes"]),
        ("usb", &["types", "image"]),
        ("update", &["types", "image", "net", "swarm", "install", "nodes", "plan", "private_file"]),
    ];

    /// `crate::<module>` paths named in `text` outside comments and before its test module.
    fn imports(text: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for line in text.lines() {
            let code = line.trim_start();
            if code.starts_with("#[cfg(test)]") {
                break;
            }
            if code.starts_with("//") {
                continue;
            }
            for (i, _) in code.match_indices("crate::") {
                let before = code[..i].chars().next_back();
                if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                    continue; // `si_appliance_crate::`, not ours
                }
                let name: String = code[i + 7..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                out.insert(name);
            }
        }
        out
    }

    fn module_files(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                module_files(&p, files);
            } else if p.extension().is_some_and(|x| x == "rs") {
                files.push(p);
            }
        }
    }

    #[test]
    fn modules_import_only_what_the_layering_allows() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
        let mut files = Vec::new();
        module_files(&src, &mut files);
        let mut broken = Vec::new();
        for f in files {
            let rel = f.strip_prefix(&src).unwrap();
            let top = rel.components().next().unwrap().as_os_str().to_string_lossy().trim_end_matches(".rs").to_owned();
            let Some(may) = allowed.get(top.as_str()) else { continue }; // app, main, lib, bin
            for used in imports(&std::fs::read_to_string(&f).unwrap()) {
                if used != top && !may.contains(&used.as_str()) {
                    broken.push(format!("{} imports crate::{used}", rel.display()));
                }
            }
        }
        assert!(broken.is_empty(), "imports the layering (src/lib.rs) does not allow:\n{}", broken.join("\n"));
    }

    #[test]
    fn the_import_scanner_sees_code_and_skips_comments_and_tests() {
        let text = "use crate::types::MacAddr;\n// crate::app in a comment\nlet x = crate::types::node_api::Phase::Dhcp;\n#[cfg(test)]\nmod tests { use crate::install; }\n";
        assert_eq!(imports(text), ["types".to_owned()].into_iter().collect());
        assert!(imports("fn f() { crate::dhcp::run() }").contains("dhcp"));
    }
}

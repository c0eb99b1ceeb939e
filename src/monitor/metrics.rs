//! Prometheus `/metrics` (prometheus-client, OpenMetrics text), built from one registry
//! snapshot per scrape so every figure of a scrape belongs to the same instant.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::Shared;
use super::registry::now_ms;

type Labels = Vec<(String, String)>;

fn gauge(reg: &mut Registry, name: &str, help: &str, v: i64) {
    let g: Gauge = Gauge::default();
    g.set(v);
    reg.register(name, help, g);
}

fn counter(reg: &mut Registry, name: &str, help: &str, v: u64) {
    let c: Counter<u64, AtomicU64> = Counter::default();
    c.inc_by(v);
    reg.register(name, help, c);
}

/// The metrics text.
///
/// # Errors
/// Formatting failed (only if a metric could not be written to a String).
pub fn text(s: &Shared) -> Result<String, std::fmt::Error> {
    let mut reg = Registry::default();
    let d = s.deployment();
    let phases: Family<Labels, Gauge> = Family::default();
    for (p, n) in &d.phases {
        phases.get_or_create(&vec![("phase".to_owned(), (*p).to_owned())]).set(*n as i64);
    }
    reg.register("si_nodes", "Nodes per phase", phases);
    gauge(&mut reg, "si_nodes_stuck", "Nodes without progress for monitor.stuck_after", d.stuck as i64);
    gauge(&mut reg, "si_download_bytes_per_second", "Aggregate download rate of the nodes", d.down_bps as i64);
    gauge(&mut reg, "si_upload_bytes_per_second", "Aggregate upload rate of the nodes", d.up_bps as i64);
    gauge(&mut reg, "si_remaining_bytes", "Bytes the nodes still have to download", d.remaining_bytes as i64);
    gauge(&mut reg, "si_eta_seconds", "Seconds until every node has the archive (-1: unknown)", d.eta_secs.map_or(-1, |e| e as i64));
    counter(&mut reg, "si_downloaded_bytes", "Bytes the nodes downloaded", d.downloaded_bytes);
    counter(&mut reg, "si_seed_uploaded_bytes", "Bytes the appliance's seed uploaded", d.seed_uploaded_bytes);
    counter(&mut reg, "si_monitor_events", "Events the registry applied", d.events);
    counter(&mut reg, "si_monitor_events_dropped", "Events dropped: the monitor queue was full", d.dropped_events);
    counter(&mut reg, "si_monitor_events_unmatched", "Events from addresses DHCP did not explain", d.unmatched_events);
    counter(&mut reg, "si_reports_rejected", "Installer reports refused (token, body)", d.rejected_reports);
    let (done, rate, phase): (Family<Labels, Gauge>, Family<Labels, Gauge>, Family<Labels, Gauge>) = Default::default();
    {
        let r = s.lock();
        for n in r.nodes() {
            let l = vec![("mac".to_owned(), n.mac.to_string())];
            done.get_or_create(&l).set(n.bytes_done as i64);
            rate.get_or_create(&l).set(n.down_bps as i64);
            let idx = crate::types::node_api::Phase::ALL.iter().position(|p| *p == n.phase).unwrap_or(0);
            phase.get_or_create(&l).set(idx as i64);
        }
    }
    reg.register("si_node_downloaded_bytes", "Bytes downloaded per node", done);
    reg.register("si_node_download_bytes_per_second", "Download rate per node", rate);
    reg.register("si_node_phase", "Phase index per node (0 dhcp .. 8 done, 9 failed)", phase);
    gauge(&mut reg, "si_monitor_scrape_time_ms", "Server time of this scrape (ms since the epoch)", now_ms() as i64);
    let mut out = String::new();
    encode(&mut out, &reg)?;
    Ok(out)
}

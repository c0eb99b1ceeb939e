// si-appliance dashboard: node table, charts (hand-drawn SVG) and summary, fed by
// /api/nodes, /api/samples, /api/rates once and then by the server-sent events of /api/events.
// No libraries, no build step: the appliance may be air-gapped.
"use strict";

const PHASES = ["dhcp", "boot-files", "installer", "partitioning", "downloading", "configuring",
                "boot-loader", "seeding", "done", "failed"];
const COLORS = { "dhcp": "#9e9e9e", "boot-files": "#7986cb", "installer": "#4db6ac", "partitioning": "#ffb74d",
  "downloading": "#42a5f5", "configuring": "#ba68c8", "boot-loader": "#a1887f", "seeding": "#66bb6a",
  "done": "#2e7d32", "failed": "#e53935" };
const MAX_SAMPLES = 900, MAX_RATES = 300;
const nodes = new Map();   // mac -> node
const rates = new Map();   // mac -> [[ms, bytes/s]]
let samples = [], deployment = null, sortKey = "mac", sortAsc = true, dirty = false, serverSkew = 0;

const $ = (id) => document.getElementById(id);
const esc = (s) => String(s == null ? "" : s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
const mb = (bps) => (bps / 1e6).toFixed(1) + " MB/s";
const dur = (s) => s == null ? "–" : s >= 3600 ? (s / 3600).toFixed(1) + " h" : s >= 120 ? Math.round(s / 60) + " min" : Math.round(s) + " s";
const progress = (n) => n.bytes_total > 0 ? n.bytes_done / n.bytes_total : (n.phase === "done" || n.phase === "seeding" ? 1 : 0);

function pushRate(n) {
  let r = rates.get(n.mac);
  if (!r) { r = []; rates.set(n.mac, r); }
  r.push([n.updated_ms, n.down_bps]);
  if (r.length > MAX_RATES) r.splice(0, r.length - MAX_RATES);
}

function sortValue(n, k) {
  if (k === "progress") return progress(n);
  if (k === "phase") return PHASES.indexOf(n.phase);
  if (k === "ip") return n.ip ? n.ip.split(".").reduce((a, b) => a * 256 + Number(b), 0) : -1;
  const v = n[k];
  return v == null ? "" : v;
}

// Admin actions (enrol, re-image) want the admin token: the appliance prints the dashboard's
// URL with `#admin=<token>` at start; it is kept in this browser's localStorage.
const ADMIN_KEY = "si-appliance-admin";
{
  const m = /(?:^|[#&])admin=([0-9a-f]+)/.exec(location.hash);
  if (m) { localStorage.setItem(ADMIN_KEY, m[1]); history.replaceState(null, "", location.pathname + location.search); }
}
const adminToken = () => localStorage.getItem(ADMIN_KEY);

async function admin(path, body) {
  const r = await fetch(path, { method: "POST", headers: { "Content-Type": "application/json", "Authorization": "Bearer " + (adminToken() || "") }, body: JSON.stringify(body) });
  const text = await r.text();
  $("admin-note").textContent = (r.ok ? "" : "refused (" + r.status + "): ") + text.slice(0, 300);
  return r.ok;
}

function actionFor(n) {
  if (!adminToken()) return "";
  const b = (act, label) => `<button class="act" data-act="${act}" data-mac="${esc(n.mac)}">${label}</button>`;
  if (n.enrolment === "discovered") return b("enrol", "enrol");
  let out = b("log", "console");
  if (n.enrolment === "installed" || n.enrolment === "failed" || n.enrolment === "installing") out += b("reimage", "re-image");
  return out;
}

// A node's installer console (GET /api/admin/nodes/<mac>/log), shown below the table.
async function showConsole(mac) {
  const r = await fetch("/api/admin/nodes/" + mac + "/log", { headers: { "Authorization": "Bearer " + (adminToken() || "") }, cache: "no-store" });
  $("console-title").textContent = "console of " + mac + (r.ok ? "" : " (" + r.status + ")");
  $("console").textContent = await r.text();
  $("console-view").hidden = false;
}

// A node's profile steps (from /api/nodes: name, exit code, end of output), below the table.
function showSteps(mac) {
  const n = nodes.get(mac);
  if (!n) return;
  $("console-title").textContent = "profile steps of " + mac;
  $("console").textContent = (n.steps || []).map((st, i) =>
    `${st.ok ? "ok    " : "FAILED"} step ${i + 1} ${st.name} (exit ${st.exit_code == null ? "none" : st.exit_code}, ${st.secs.toFixed(1)} s)\n` +
    (st.output ? st.output.replace(/^/gm, "  | ") + "\n" : "")).join("");
  $("console-view").hidden = false;
}

document.addEventListener("click", async (e) => {
  const b = e.target.closest("button.act");
  if (!b) return;
  const mac = b.dataset.mac;
  if (b.dataset.act === "enrol") await admin("/api/admin/nodes", { macs: [mac] });
  if (b.dataset.act === "log") await showConsole(mac);
  if (b.dataset.act === "steps") showSteps(mac);
  if (b.dataset.act === "reimage" && confirm("Install " + mac + " again at its next network boot?")) await admin("/api/admin/reimage", { macs: [mac] });
});

function renderTable() {
  const now = Date.now() + serverSkew;
  const list = [...nodes.values()];
  list.sort((a, b) => {
    const x = sortValue(a, sortKey), y = sortValue(b, sortKey);
    const c = x < y ? -1 : x > y ? 1 : (a.mac < b.mac ? -1 : 1);
    return sortAsc ? c : -c;
  });
  const rows = list.map((n) => {
    const cls = ["node", n.stuck ? "stuck" : "", n.phase === "failed" ? "failed" : "", n.phase === "done" ? "done" : ""].join(" ");
    const pct = Math.round(progress(n) * 100);
    const msg = n.phase === "failed" ? (n.error || "") : (n.stuck ? "stuck: no progress. " : "") + (n.message || n.boot_files[n.boot_files.length - 1] || "");
    // A failed profile step: its name is in the error; its output's last line goes with it.
    const bad = (n.steps || []).find((st) => !st.ok);
    const stepLine = bad ? " — " + (bad.output.trim().split("\n").pop() || "") : "";
    const stepsBtn = (n.steps || []).length ? ` <button class="act" data-act="steps" data-mac="${esc(n.mac)}">steps ${n.steps.length}</button>` : "";
    return `<tr class="${cls}" data-mac="${esc(n.mac)}"><td>${esc(n.mac)}</td><td>${esc(n.ip)}</td><td>${esc(n.hostname)}</td>` +
      `<td>${esc(n.arch)}</td><td>${esc(n.enrolment)} ${actionFor(n)}</td><td><span class="phase" style="background:${COLORS[n.phase]}">${esc(n.phase)}</span></td>` +
      `<td><span class="bar"><div style="width:${pct}%"></div></span> ${pct}%</td><td>${mb(n.down_bps)}</td><td>${mb(n.up_bps)}</td>` +
      `<td>${n.peers}</td><td>${dur((now - n.last_progress_ms) / 1000)}</td><td class="msg" title="${esc(bad ? bad.output : "")}">${esc(msg + stepLine)}${stepsBtn}</td></tr>`;
  });
  document.querySelector("#nodes tbody").innerHTML = rows.join("");
  $("empty").style.display = list.length ? "none" : "";
  document.querySelectorAll("#nodes th").forEach((th) => {
    th.classList.toggle("sorted", th.dataset.k === sortKey);
    th.classList.toggle("asc", th.dataset.k === sortKey && sortAsc);
  });
}

function renderSummary() {
  const d = deployment;
  if (!d) return;
  $("s-nodes").textContent = d.nodes;
  $("s-done").textContent = d.phases.done;
  $("s-failed").textContent = d.phases.failed;
  $("s-stuck").textContent = d.stuck;
  $("s-down").textContent = mb(d.down_bps);
  $("s-eta").textContent = d.complete ? "complete" : dur(d.eta_secs);
  $("s-share").textContent = d.seed_share == null ? "–" : (d.seed_share * 100).toFixed(0) + " %";
  $("s-dropped").textContent = d.dropped_events;
  $("phases").innerHTML = PHASES.filter((p) => d.phases[p] > 0)
    .map((p) => `<span class="chip" style="background:${COLORS[p]}">${p} ${d.phases[p]}</span>`).join("");
  $("clock").textContent = new Date(d.now_ms).toLocaleTimeString();
  const sv = d.serving;
  $("serving").textContent = sv ? `on ${sv.iface} ${sv.ip} (${sv.chosen})${sv.firmware ? ", booted " + sv.firmware : ""}` : "";
}

// A line chart into <svg viewBox="0 0 600 220">: series = [{color, pts: [[x, y]]}], x in ms.
function lineChart(svg, series, yFmt) {
  const W = 600, H = 220, L = 46, R = 8, T = 8, B = 22;
  const all = series.flatMap((s) => s.pts);
  let x0 = Infinity, x1 = -Infinity, y1 = 0;
  for (const [x, y] of all) { if (x < x0) x0 = x; if (x > x1) x1 = x; if (y > y1) y1 = y; }
  if (!all.length) { x0 = Date.now() - 60000; x1 = Date.now(); }
  if (x1 - x0 < 1000) x0 = x1 - 1000;
  y1 = y1 > 0 ? y1 * 1.1 : 1;
  const sx = (x) => L + (x - x0) / (x1 - x0) * (W - L - R), sy = (y) => H - B - y / y1 * (H - T - B);
  let out = "";
  for (let i = 0; i <= 4; i++) {
    const y = y1 * i / 4;
    out += `<line class="grid" x1="${L}" x2="${W - R}" y1="${sy(y)}" y2="${sy(y)}"/><text x="${L - 4}" y="${sy(y) + 3}" text-anchor="end">${yFmt(y)}</text>`;
  }
  const span = (x1 - x0) / 1000;
  for (let i = 0; i <= 4; i++) {
    const x = x0 + (x1 - x0) * i / 4;
    out += `<text x="${sx(x)}" y="${H - 6}" text-anchor="middle">-${dur(span * (1 - i / 4))}</text>`;
  }
  out += `<line class="axis" x1="${L}" x2="${L}" y1="${T}" y2="${H - B}"/><line class="axis" x1="${L}" x2="${W - R}" y1="${H - B}" y2="${H - B}"/>`;
  for (const s of series) {
    if (!s.pts.length) continue;
    const d = s.pts.map(([x, y], i) => (i ? "L" : "M") + sx(x).toFixed(1) + " " + sy(y).toFixed(1)).join("");
    out += `<path class="line" d="${d}" stroke="${s.color}"><title>${esc(s.name || "")}</title></path>`;
  }
  svg.innerHTML = out;
}

function hue(i) { return `hsl(${(i * 137.508) % 360}, 60%, 45%)`; }

function renderCharts() {
  const fmt = (y) => (y / 1e6).toFixed(y >= 1e7 ? 0 : 1);
  lineChart($("chart-agg"), [
    { name: "nodes download", color: "#1e88e5", pts: samples.map((s) => [s.at_ms, s.down_bps]) },
    { name: "nodes upload", color: "#43a047", pts: samples.map((s) => [s.at_ms, s.up_bps]) },
    { name: "seed upload", color: "#e53935", pts: samples.map((s) => [s.at_ms, s.seed_bps]) },
  ], fmt);
  let i = 0;
  const per = [];
  for (const [mac, pts] of rates) per.push({ name: mac, color: hue(i++), pts });
  lineChart($("chart-nodes"), per, fmt);
  const share = samples.filter((s) => s.seed_share != null).map((s) => [s.at_ms, s.seed_share * 100]);
  const etaPts = samples.filter((s) => s.eta_secs != null).map((s) => [s.at_ms, s.eta_secs]);
  const maxEta = Math.max(1, ...etaPts.map((p) => p[1]));
  // ETA scaled onto the 0..100 axis of the share; its peak is given in the title.
  lineChart($("chart-seed"), [
    { name: "seed upload share %", color: "#e53935", pts: share },
    { name: `ETA (100 = ${Math.round(maxEta)} s)`, color: "#1e88e5", pts: etaPts.map(([x, y]) => [x, y / maxEta * 100]) },
  ], (y) => y.toFixed(0));
}

function render() {
  dirty = false;
  renderSummary();
  renderTable();
  renderCharts();
}

function schedule() {
  if (!dirty) { dirty = true; setTimeout(render, 250); }
}

async function getJson(url) {
  const r = await fetch(url, { cache: "no-store" });
  if (!r.ok) throw new Error(url + ": " + r.status);
  return r.json();
}

async function load() {
  const [list, smp, rts, dep] = await Promise.all([getJson("/api/nodes"), getJson("/api/samples"), getJson("/api/rates"), getJson("/api/deployment")]);
  for (const n of list) nodes.set(n.mac, n);
  samples = smp.slice(-MAX_SAMPLES);
  for (const [mac, pts] of Object.entries(rts)) rates.set(mac, pts.slice(-MAX_RATES));
  deployment = dep;
  serverSkew = dep.now_ms - Date.now();
  render();
}

// `?events=N`: close the stream after N events (a snapshot for headless browsers, whose
// virtual clock stands still while a request is open).
const EVENT_LIMIT = Number(new URLSearchParams(location.search).get("events") || 0);
let eventCount = 0;

function connect() {
  const es = new EventSource("/api/events");
  const counted = () => {
    if (EVENT_LIMIT && ++eventCount >= EVENT_LIMIT) { es.close(); $("conn").textContent = "snapshot"; }
  };
  es.onopen = () => { $("conn").textContent = "live"; $("conn").className = "conn on"; };
  es.onerror = () => { $("conn").textContent = "reconnecting…"; $("conn").className = "conn off"; };
  es.addEventListener("node", (e) => {
    const n = JSON.parse(e.data);
    nodes.set(n.mac, n);
    pushRate(n);
    schedule();
    counted();
  });
  es.addEventListener("sample", (e) => {
    const m = JSON.parse(e.data);
    samples.push(m.sample);
    if (samples.length > MAX_SAMPLES) samples.splice(0, samples.length - MAX_SAMPLES);
    deployment = m.deployment;
    serverSkew = deployment.now_ms - Date.now();
    schedule();
    counted();
  });
  es.addEventListener("lagged", () => { load().catch(() => {}); });
}

document.querySelectorAll("#nodes th").forEach((th) => th.addEventListener("click", () => {
  if (sortKey === th.dataset.k) sortAsc = !sortAsc; else { sortKey = th.dataset.k; sortAsc = true; }
  renderTable();
}));

load().catch((e) => { $("conn").textContent = "error: " + e.message; }).finally(connect);

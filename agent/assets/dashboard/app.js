// flamewatch's live dashboard: charts of every target's metrics (uPlot),
// the alerts firing, the sessions running and past, and flamegraphs of any
// recent window, fed by /api/* and the /api/events stream.
"use strict";

// The charts drawn per target, with how each value is written.
const CHARTS = [
  { metric: "cpu_pct", label: "CPU", fmt: (v) => v.toFixed(1) + " %" },
  { metric: "rss_bytes", label: "RSS", fmt: (v) => (v / 1048576).toFixed(1) + " MiB" },
  { metric: "threads", label: "Threads", fmt: (v) => v.toFixed(0) },
  { metric: "fds", label: "Open files", fmt: (v) => v.toFixed(0) },
  { metric: "time_wait", label: "TIME_WAIT", fmt: (v) => v.toFixed(0) },
  { metric: "latency_p99_ms", label: "p99 latency", fmt: (v) => v.toFixed(2) + " ms", optional: true },
  { metric: "over_budget_pct", label: "Over budget", fmt: (v) => v.toFixed(1) + " %", optional: true },
];
const SEVERITY_COLOUR = { warning: "#c77c02", critical: "#d70015", emergency: "#8e0038" };
const PID_COLOURS = ["#0a64d6", "#2f9e44", "#9c36b5", "#e8590c", "#1098ad", "#5c940d"];
const MAX_POINTS = 3600;

const state = {
  windowS: 3600,
  charts: new Map(), // "target/metric" -> chart
  markers: [], // { time, severity, rule }
  targets: [],
};

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

async function getJSON(url) {
  const r = await fetch(url, { credentials: "same-origin" });
  if (!r.ok) throw new Error(url + ": " + r.status + " " + (await r.text()));
  return r.json();
}

// Draws each rule's threshold as a dashed line, and each alert as a
// vertical line in its severity's colour.
function overlays(rules) {
  return {
    hooks: {
      draw: [
        (u) => {
          const ctx = u.ctx;
          ctx.save();
          ctx.lineWidth = 1.5;
          for (const r of rules) {
            const y = u.valToPos(r.value, "y", true);
            if (!Number.isFinite(y)) continue;
            ctx.strokeStyle = SEVERITY_COLOUR[r.severity] || "#888";
            ctx.setLineDash([6, 4]);
            ctx.beginPath();
            ctx.moveTo(u.bbox.left, y);
            ctx.lineTo(u.bbox.left + u.bbox.width, y);
            ctx.stroke();
          }
          ctx.setLineDash([]);
          for (const m of state.markers) {
            const x = u.valToPos(m.time, "x", true);
            if (!Number.isFinite(x) || x < u.bbox.left || x > u.bbox.left + u.bbox.width) continue;
            ctx.strokeStyle = SEVERITY_COLOUR[m.severity] || "#888";
            ctx.beginPath();
            ctx.moveTo(x, u.bbox.top);
            ctx.lineTo(x, u.bbox.top + u.bbox.height);
            ctx.stroke();
          }
          ctx.restore();
        },
      ],
    },
  };
}

function chartWidth(box) {
  return Math.max(260, box.clientWidth || 320);
}

// A chart of one metric of a target, one series per pid.
function makeChart(box, target, spec, pids, rules) {
  const valueText = el("span", { class: "value" }, "–");
  const title = el("div", {}, spec.label + " ", valueText);
  const plot = el("div", {});
  const wrap = el("div", { class: "chart", "data-metric": spec.metric }, title, plot);
  box.append(wrap);
  const series = [{}].concat(
    pids.map((pid, i) => ({ label: "pid " + pid, stroke: PID_COLOURS[i % PID_COLOURS.length], spanGaps: true }))
  );
  const data = [[]].concat(pids.map(() => []));
  const u = new uPlot(
    {
      width: chartWidth(box),
      height: 150,
      series,
      legend: { show: pids.length > 1 },
      plugins: [overlays(rules.filter((r) => r.metric === spec.metric))],
      scales: { x: { time: true } },
    },
    data,
    plot
  );
  const chart = { u, pids, data, spec, valueText, wrap };
  state.charts.set(target + "/" + spec.metric, chart);
  return chart;
}

function setValue(chart) {
  const vals = chart.data.slice(1).map((s) => s[s.length - 1]).filter((v) => v != null);
  chart.valueText.textContent = vals.length ? vals.map(chart.spec.fmt).join(" / ") : "–";
}

// Adds a point of `pid` at `time` (seconds) to a chart.
function addPoint(chart, pid, time, value) {
  const i = chart.pids.indexOf(pid);
  if (i < 0) return false;
  const xs = chart.data[0];
  const t = Math.round(time);
  if (xs.length === 0 || xs[xs.length - 1] < t) {
    xs.push(t);
    for (let s = 1; s < chart.data.length; s++) chart.data[s].push(null);
  }
  let at = xs.length - 1;
  while (at > 0 && xs[at] > t) at--;
  chart.data[i + 1][at] = value;
  const cutoff = t - state.windowS;
  while (xs.length > MAX_POINTS || (xs.length && xs[0] < cutoff)) {
    for (const s of chart.data) s.shift();
  }
  chart.u.setData(chart.data);
  setValue(chart);
  return true;
}

async function loadSeries(target, chart) {
  const q = "/api/targets/" + encodeURIComponent(target) + "/series?metric=" + chart.spec.metric + "&since=" + state.windowS + "s";
  const j = await getJSON(q);
  const times = new Set();
  for (const s of j.series) for (const p of s.points) times.add(Math.round(p[0]));
  const xs = Array.from(times).sort((a, b) => a - b);
  const index = new Map(xs.map((t, i) => [t, i]));
  chart.data = [xs].concat(chart.pids.map(() => xs.map(() => null)));
  for (const s of j.series) {
    const i = chart.pids.indexOf(s.pid);
    if (i < 0) continue;
    for (const p of s.points) chart.data[i + 1][index.get(Math.round(p[0]))] = p[1];
  }
  chart.u.setData(chart.data);
  setValue(chart);
}

function renderAlerts() {
  const box = document.getElementById("alerts");
  box.replaceChildren();
  for (const t of state.targets) {
    for (const p of t.pids) {
      for (const a of p.firing) {
        box.append(
          el("div", { class: "alert " + a.severity, role: "alert" },
            el("strong", {}, a.rule), " on " + t.name + " (pid " + p.pid + ") since " + a.since + ": " + a.message)
        );
      }
    }
  }
}

function liveSessions(t) {
  const rows = [];
  for (const p of t.pids) {
    for (const s of p.sessions) {
      rows.push(
        el("div", { class: "session-live" },
          s.kind + " profile of pid " + s.pid + " at " + s.hz.toFixed(0) + " Hz ",
          el("progress", { max: "100", value: String(Math.round(s.progress_pct)) }),
          " " + Math.round(s.progress_pct) + " %, " + Math.ceil(s.left_s) + " s left")
      );
    }
  }
  return rows;
}

async function renderTargets() {
  const j = await getJSON("/api/targets");
  state.targets = j.targets;
  const box = document.getElementById("targets");
  const select = document.getElementById("profile-target");
  const chosen = select.value;
  select.replaceChildren(...j.targets.map((t) => el("option", { value: t.name }, t.name)));
  if (chosen) select.value = chosen;
  box.replaceChildren();
  state.charts.clear();
  for (const t of j.targets) {
    const pids = t.pids.map((p) => p.pid);
    const charts = el("div", { class: "charts" });
    const live = el("div", { class: "live" }, ...liveSessions(t));
    box.append(
      el("div", { class: "target", "data-target": t.name },
        el("h3", {}, t.name), el("div", { class: "pids" }, "pids " + pids.join(", ")), live, charts)
    );
    for (const spec of CHARTS) {
      const has = t.pids.some((p) => spec.metric in p.metrics);
      if (spec.optional && !has) continue;
      const chart = makeChart(charts, t.name, spec, pids, t.rules);
      loadSeries(t.name, chart).catch((e) => console.warn(e));
    }
  }
  renderAlerts();
}

async function renderSessions() {
  const j = await getJSON("/api/sessions");
  const rows = j.sessions.map((s) => {
    const files = el("td", {});
    const open = (name, label) => {
      const a = el("a", { href: "/files/" + encodeURIComponent(name), "data-svg": name }, label);
      a.addEventListener("click", (ev) => {
        ev.preventDefault();
        document.getElementById("flamegraph").src = "/files/" + encodeURIComponent(name);
      });
      return a;
    };
    if (s.svg) files.append(open(s.svg, "flamegraph"), " ");
    if (s.diff_svg) files.append(open(s.diff_svg, "vs baseline"), " ");
    for (const f of s.files) files.append(el("a", { href: "/files/" + encodeURIComponent(f) }, f.split(".").slice(1).join(".")), " ");
    const top = s.top ? s.top[0] + " " + s.top[1].toFixed(1) + " %" : "";
    return el("tr", {}, el("td", {}, s.started_at), el("td", {}, s.kind), el("td", {}, (s.comm || "") + " " + (s.pid || "")),
      el("td", {}, s.samples), el("td", {}, top), files);
  });
  document.getElementById("session-rows").replaceChildren(...rows);
}

function openProfile() {
  const target = document.getElementById("profile-target").value;
  const since = document.getElementById("profile-since").value;
  if (!target) return;
  const q = "target=" + encodeURIComponent(target) + "&since=" + since;
  document.getElementById("profile-pprof").href = "/api/profile?" + q + "&format=pprof";
  const status = document.getElementById("profile-status");
  status.textContent = "profiling the " + since + " before now…";
  const frame = document.getElementById("flamegraph");
  frame.onload = () => { status.textContent = ""; };
  const diff = document.getElementById("profile-diff").checked;
  frame.src = "/api/profile?" + q + "&format=" + (diff ? "diff" : "svg");
}

function onEvent(kind, data) {
  if (kind === "tick") {
    let known = true;
    for (const [metric, value] of Object.entries(data.values)) {
      const chart = state.charts.get(data.target + "/" + metric);
      if (chart && !addPoint(chart, data.pid, data.time, value)) known = false;
    }
    if (!known || !state.targets.some((t) => t.name === data.target)) scheduleRefresh();
  } else if (kind === "alert") {
    if (data.status === "firing") {
      state.markers.push({ time: Date.parse(data.time) / 1000, severity: data.severity, rule: data.rule });
      if (state.markers.length > 500) state.markers.shift();
      for (const c of state.charts.values()) c.u.redraw();
    }
    scheduleRefresh();
  } else if (kind === "session") {
    scheduleRefresh();
    renderSessions().catch((e) => console.warn(e));
  }
}

let refreshTimer = null;
function scheduleRefresh() {
  if (refreshTimer) return;
  refreshTimer = setTimeout(() => {
    refreshTimer = null;
    renderTargets().catch((e) => console.warn(e));
  }, 500);
}

function connect() {
  const status = document.getElementById("status");
  const es = new EventSource("/api/events");
  es.onopen = () => { status.textContent = "live"; };
  es.onerror = () => { status.textContent = "reconnecting…"; };
  for (const kind of ["tick", "alert", "session"]) {
    es.addEventListener(kind, (ev) => onEvent(kind, JSON.parse(ev.data).data));
  }
}

window.addEventListener("resize", () => {
  for (const c of state.charts.values()) c.u.setSize({ width: chartWidth(c.wrap), height: 150 });
});

document.getElementById("window").addEventListener("change", (ev) => {
  state.windowS = Number(ev.target.value);
  renderTargets().catch((e) => console.warn(e));
});
document.getElementById("profile-open").addEventListener("click", openProfile);

renderTargets().then(() => document.body.setAttribute("data-ready", "1")).catch((e) => {
  document.getElementById("status").textContent = String(e);
});
renderSessions().catch((e) => console.warn(e));
connect();

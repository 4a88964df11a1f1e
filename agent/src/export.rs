//! Prometheus metrics of the daemon (`watch --metrics-addr`), in the text
//! exposition format, served on `/metrics`.
//!
//! Labels are `target` (the watched name) and `pid`, plus `rule`, `severity`
//! and `kind` from fixed sets: no label takes unbounded values. When a
//! target's process changes, the old pid's series are removed.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge, MetricType, TypedMetric},
    registry::Registry,
};
use tracing::{info, warn};

use crate::metrics::Metric;

/// A target's labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabels {
    /// Watched name.
    pub target: String,
    /// Its process id now.
    pub pid: String,
}

/// An alert rule's labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabels {
    /// Watched name.
    pub target: String,
    /// Rule name (from the configuration).
    pub rule: String,
    /// warning, critical, emergency.
    pub severity: String,
}

/// A session kind's labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SessionLabels {
    /// Watched name.
    pub target: String,
    /// on-demand, scheduled, emergency.
    pub kind: String,
}

/// A probed function's labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FunctionLabels {
    /// Watched name.
    pub target: String,
    /// Its process id now (each process has its own probe and counts).
    pub pid: String,
    /// The function as configured (`physics_step`, `libc:malloc`).
    pub function: String,
}

/// A quantile of a probed function's durations.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QuantileLabels {
    target: String,
    pid: String,
    function: String,
    /// `50`, `90`, `99` (not `quantile`: that label is a summary's).
    percentile: String,
}

/// Upper bounds (seconds) of the exported duration histogram: 1-2.5-5 steps
/// from 10 µs to 10 s, plus a 60 Hz frame (16.7 ms). The kernel's
/// histogram has 976 log-linear buckets; a scraper wants a few.
pub const DURATION_BOUNDS: [f64; 20] = [
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 0.0167, 2.5e-2, 5e-2, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// Quantiles exported beside the histogram (since the probe attached), as
/// exact as the kernel's histogram (≤ 5 %) where the buckets are coarse.
pub const DURATION_QUANTILES: [f64; 3] = [0.5, 0.9, 0.99];

/// A histogram whose counts come whole from elsewhere (the kernel's, read
/// each interval): sum (s), count and per-bound counts (not cumulative;
/// the last is `+Inf`).
#[derive(Debug, Clone, Default)]
pub struct Durations(Arc<std::sync::Mutex<HistogramCounts>>);

/// Sum (s), count, and (upper bound, calls) per bucket.
type HistogramCounts = (f64, u64, Vec<(f64, u64)>);

impl Durations {
    /// Replaces the counts by those of `lat`.
    pub fn set(&self, lat: &crate::probes::Latency) {
        let mut per = vec![0u64; DURATION_BOUNDS.len() + 1];
        for b in lat.nonempty() {
            // A kernel bucket goes under the first bound it ends at or
            // below: no call is counted under a bound it may exceed.
            let high_s = b.high_ns as f64 / 1e9;
            let k = DURATION_BOUNDS
                .iter()
                .position(|&le| high_s <= le * (1.0 + 1e-9))
                .unwrap_or(DURATION_BOUNDS.len());
            per[k] += b.count;
        }
        let bounds = DURATION_BOUNDS.iter().copied().chain([f64::INFINITY]);
        let buckets = bounds.zip(per).collect();
        if let Ok(mut g) = self.0.lock() {
            *g = (lat.sum_ns as f64 / 1e9, lat.count, buckets);
        }
    }
}

impl TypedMetric for Durations {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Durations {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let g = self.0.lock().map_err(|_| std::fmt::Error)?;
        encoder.encode_histogram::<NoLabelSet>(g.0, g.1, &g.2, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

type GaugeF = Gauge<f64, AtomicU64>;

/// Every metric the daemon exports.
pub struct Exporter {
    registry: Registry,
    target: Vec<(Metric, Family<TargetLabels, GaugeF>)>,
    alerts_firing: Family<RuleLabels, Gauge>,
    alerts_total: Family<RuleLabels, Counter>,
    sessions_total: Family<SessionLabels, Counter>,
    sessions_running: Gauge,
    overhead_pct: Family<TargetLabels, GaugeF>,
    sampling_hz: Family<TargetLabels, GaugeF>,
    lost_samples: Family<TargetLabels, GaugeF>,
    tcp_lost_events: Family<TargetLabels, GaugeF>,
    agent_cpu_pct: GaugeF,
    agent_rss_bytes: GaugeF,
    webhook_failed: Counter,
    durations: Family<FunctionLabels, Durations>,
    quantiles: Family<QuantileLabels, GaugeF>,
}

/// Name, help and unit of a target metric.
fn describe(m: Metric) -> (&'static str, &'static str) {
    match m {
        Metric::CpuPct => ("target_cpu_percent", "CPU use of the target, percent of one core"),
        Metric::RssBytes => ("target_rss_bytes", "Resident memory of the target"),
        Metric::Threads => ("target_threads", "Threads of the target"),
        Metric::Fds => ("target_open_fds", "Open file descriptors of the target"),
        Metric::CtxSwitchesPerS => (
            "target_context_switches_per_second",
            "Context switches of the target per second",
        ),
        Metric::TcpEstablished => (
            "target_tcp_established",
            "Established TCP connections of the target",
        ),
        Metric::TimeWait => (
            "target_tcp_time_wait",
            "Sockets in TIME_WAIT on the target's ports now",
        ),
        Metric::TimeWaitPerS => (
            "target_tcp_time_wait_per_second",
            "Sockets entering TIME_WAIT per second",
        ),
        Metric::ResetsPerS => (
            "target_tcp_resets_per_second",
            "TCP resets of the target per second",
        ),
        Metric::RecvQueueBytes => (
            "target_recv_queue_bytes",
            "Bytes received but not yet read by the target",
        ),
        Metric::LatencyP50Ms => (
            "target_latency_p50_seconds",
            "Median duration of the target's first probed function in the interval",
        ),
        Metric::LatencyP99Ms => (
            "target_latency_p99_seconds",
            "99th percentile duration of the target's first probed function in the interval",
        ),
        Metric::LatencyMaxMs => (
            "target_latency_max_seconds",
            "Longest call of the target's first probed function in the interval",
        ),
        Metric::CallsPerS => (
            "target_calls_per_second",
            "Calls of the target's first probed function per second",
        ),
        Metric::OverBudgetPct => (
            "target_over_budget_percent",
            "Calls of the target's first probed function over its budget, percent",
        ),
    }
}

/// What a metric's value is multiplied by for export.
fn scale(m: Metric) -> f64 {
    match m {
        Metric::LatencyP50Ms | Metric::LatencyP99Ms | Metric::LatencyMaxMs => 1e-3,
        _ => 1.0,
    }
}

const TARGET_METRICS: [Metric; 15] = [
    Metric::CpuPct,
    Metric::RssBytes,
    Metric::Threads,
    Metric::Fds,
    Metric::CtxSwitchesPerS,
    Metric::TcpEstablished,
    Metric::TimeWait,
    Metric::TimeWaitPerS,
    Metric::ResetsPerS,
    Metric::RecvQueueBytes,
    Metric::LatencyP50Ms,
    Metric::LatencyP99Ms,
    Metric::LatencyMaxMs,
    Metric::CallsPerS,
    Metric::OverBudgetPct,
];

/// What a running session reports about a target.
#[derive(Debug, Clone, Copy, Default)]
pub struct SessionView {
    /// Profiling overhead of the last interval, percent of the target's CPU.
    pub overhead_pct: f64,
    /// Sampling rate now.
    pub hz: f64,
    /// Samples lost so far in the session.
    pub lost_samples: u64,
}

impl Default for Exporter {
    fn default() -> Self {
        Self::new()
    }
}

impl Exporter {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("flamewatch");
        let target = TARGET_METRICS
            .iter()
            .map(|&m| {
                let family = Family::<TargetLabels, GaugeF>::default();
                let (name, help) = describe(m);
                registry.register(name, help, family.clone());
                (m, family)
            })
            .collect();
        let alerts_firing = Family::<RuleLabels, Gauge>::default();
        registry.register(
            "alerts_firing",
            "Alerts firing now (1) by rule",
            alerts_firing.clone(),
        );
        let alerts_total = Family::<RuleLabels, Counter>::default();
        registry.register("alerts", "Alerts fired", alerts_total.clone());
        let sessions_total = Family::<SessionLabels, Counter>::default();
        registry.register("sessions", "Profiling sessions run", sessions_total.clone());
        let sessions_running = Gauge::default();
        registry.register(
            "sessions_running",
            "Profiling sessions running now",
            sessions_running.clone(),
        );
        let overhead_pct = Family::<TargetLabels, GaugeF>::default();
        registry.register(
            "profiling_overhead_percent",
            "What profiling costs the target now, percent of its CPU (0 without a session)",
            overhead_pct.clone(),
        );
        let sampling_hz = Family::<TargetLabels, GaugeF>::default();
        registry.register(
            "sampling_rate_hz",
            "Effective sampling rate of the running session",
            sampling_hz.clone(),
        );
        let lost_samples = Family::<TargetLabels, GaugeF>::default();
        registry.register(
            "lost_samples",
            "Samples lost by the running session",
            lost_samples.clone(),
        );
        let tcp_lost_events = Family::<TargetLabels, GaugeF>::default();
        registry.register(
            "tcp_lost_events",
            "TCP events lost (ring buffer full)",
            tcp_lost_events.clone(),
        );
        let agent_cpu_pct = GaugeF::default();
        registry.register(
            "agent_cpu_percent",
            "CPU use of the agent itself, percent of one core",
            agent_cpu_pct.clone(),
        );
        let agent_rss_bytes = GaugeF::default();
        registry.register(
            "agent_rss_bytes",
            "Resident memory of the agent itself",
            agent_rss_bytes.clone(),
        );
        let webhook_failed = Counter::default();
        registry.register(
            "webhook_failures",
            "Alert records the webhook could not deliver",
            webhook_failed.clone(),
        );
        let durations = Family::<FunctionLabels, Durations>::default();
        registry.register(
            "function_duration_seconds",
            "Durations of a probed function ([[target.probe]]) since its probe attached",
            durations.clone(),
        );
        let quantiles = Family::<QuantileLabels, GaugeF>::default();
        registry.register(
            "function_duration_percentile_seconds",
            "Percentiles of a probed function's durations since its probe attached (from the kernel's log-linear histogram)",
            quantiles.clone(),
        );
        Self {
            durations,
            quantiles,
            registry,
            target,
            alerts_firing,
            alerts_total,
            sessions_total,
            sessions_running,
            overhead_pct,
            sampling_hz,
            lost_samples,
            tcp_lost_events,
            agent_cpu_pct,
            agent_rss_bytes,
            webhook_failed,
        }
    }

    /// The latest values of a target (milliseconds exported as seconds,
    /// Prometheus' base unit).
    pub fn set_target(&self, labels: &TargetLabels, values: &[(Metric, f64)]) {
        for (m, v) in values {
            if let Some((_, family)) = self.target.iter().find(|(t, _)| t == m) {
                family.get_or_create(labels).set(*v * scale(*m));
            }
        }
    }

    /// The target's process went away: drop its series.
    pub fn remove_target(&self, labels: &TargetLabels) {
        for (_, family) in &self.target {
            family.remove(labels);
        }
        for f in [
            &self.overhead_pct,
            &self.sampling_hz,
            &self.lost_samples,
            &self.tcp_lost_events,
        ] {
            f.remove(labels);
        }
    }

    /// A session's view of a target (zeros when none runs).
    pub fn set_session(&self, labels: &TargetLabels, view: SessionView, tcp_lost: u64) {
        self.overhead_pct.get_or_create(labels).set(view.overhead_pct);
        self.sampling_hz.get_or_create(labels).set(view.hz);
        self.lost_samples
            .get_or_create(labels)
            .set(view.lost_samples as f64);
        self.tcp_lost_events.get_or_create(labels).set(tcp_lost as f64);
    }

    /// A probed function's durations so far (histogram and quantiles).
    pub fn set_function(&self, labels: &FunctionLabels, lat: &crate::probes::Latency) {
        self.durations.get_or_create(labels).set(lat);
        for q in DURATION_QUANTILES {
            let ql = quantile_labels(labels, q);
            self.quantiles
                .get_or_create(&ql)
                .set(lat.quantile(q) as f64 / 1e9);
        }
    }

    /// A probe went away (its process, or the probe): drop its series.
    pub fn remove_function(&self, labels: &FunctionLabels) {
        self.durations.remove(labels);
        for q in DURATION_QUANTILES {
            self.quantiles.remove(&quantile_labels(labels, q));
        }
    }

    /// An alert fired (`firing` true) or resolved.
    pub fn alert(&self, labels: &RuleLabels, firing: bool) {
        if firing {
            self.alerts_total.get_or_create(labels).inc();
        }
        self.alerts_firing.get_or_create(labels).set(i64::from(firing));
    }

    /// A session started.
    pub fn session_started(&self, labels: &SessionLabels) {
        self.sessions_total.get_or_create(labels).inc();
    }

    /// Sessions running now.
    pub fn set_sessions_running(&self, n: usize) {
        self.sessions_running.set(n as i64);
    }

    /// The agent's own use.
    pub fn set_agent(&self, cpu_pct: f64, rss_bytes: f64, webhook_failed: u64) {
        self.agent_cpu_pct.set(cpu_pct);
        self.agent_rss_bytes.set(rss_bytes);
        let seen = self.webhook_failed.get();
        if webhook_failed > seen {
            self.webhook_failed.inc_by(webhook_failed - seen);
        }
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// The classic Prometheus text format (version 0.0.4), for scrapers and
    /// tools that do not ask for OpenMetrics (promtool, curl).
    pub fn render_text(&self) -> String {
        to_prometheus_text(&self.render())
    }
}

fn quantile_labels(l: &FunctionLabels, q: f64) -> QuantileLabels {
    QuantileLabels {
        target: l.target.clone(),
        pid: l.pid.clone(),
        function: l.function.clone(),
        percentile: (q * 100.0).round().to_string(),
    }
}

/// OpenMetrics text to the classic Prometheus text format: counter families
/// are named by their `_total` samples, and `# UNIT`/`# EOF` go.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Serves `/metrics` of `exporter` on `addr` until the runtime stops.
/// Returns the bound address (port 0 picks one).
pub async fn serve(
    addr: SocketAddr,
    exporter: Arc<Exporter>,
    dashboard: Option<Arc<crate::dashboard::Dashboard>>,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    if !bound.ip().is_loopback() {
        warn!(
            "metrics served on {bound}, beyond this machine: anyone who reaches it sees the targets' metrics"
        );
    }
    let scrapes = Arc::new(AtomicU64::new(0));
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move |headers: axum::http::HeaderMap| {
            let exporter = exporter.clone();
            let scrapes = scrapes.clone();
            async move {
                scrapes.fetch_add(1, Ordering::Relaxed);
                // Prometheus asks for OpenMetrics; everything else gets the
                // classic text format.
                let openmetrics = headers
                    .get(axum::http::header::ACCEPT)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.contains("application/openmetrics-text"));
                if openmetrics {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        exporter.render(),
                    )
                } else {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        exporter.render_text(),
                    )
                }
            }
        }),
    );
    let app = match dashboard {
        Some(d) => crate::dashboard::router(d, app),
        None => app,
    };
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            warn!("metrics server stopped: {e}");
        }
    });
    info!("Prometheus metrics on http://{bound}/metrics (and the dashboard on http://{bound}/)");
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test that the exposition carries target, alert and session metrics
    /// with their labels, and drops a replaced pid's series.
    #[test]
    fn exposition() {
        let e = Exporter::new();
        let old = TargetLabels {
            target: "logcaster".into(),
            pid: "1".into(),
        };
        e.set_target(&old, &[(Metric::CpuPct, 97.5), (Metric::TimeWait, 1200.0)]);
        let rule = RuleLabels {
            target: "logcaster".into(),
            rule: "cpu_high".into(),
            severity: "critical".into(),
        };
        e.alert(&rule, true);
        e.session_started(&SessionLabels {
            target: "logcaster".into(),
            kind: "emergency".into(),
        });
        let text = e.render();
        assert!(
            text.contains(r#"flamewatch_target_cpu_percent{target="logcaster",pid="1"} 97.5"#),
            "{text}"
        );
        assert!(text.contains(
            r#"flamewatch_alerts_firing{target="logcaster",rule="cpu_high",severity="critical"} 1"#
        ));
        assert!(text.contains(
            r#"flamewatch_alerts_total{target="logcaster",rule="cpu_high",severity="critical"} 1"#
        ));
        assert!(text.contains(r#"flamewatch_sessions_total{target="logcaster",kind="emergency"} 1"#));
        assert!(text.trim_end().ends_with("# EOF"));
        e.remove_target(&old);
        assert!(!e.render().contains(r#"pid="1""#));
        let classic = e.render_text();
        assert!(
            classic.contains("# TYPE flamewatch_alerts_total counter"),
            "{classic}"
        );
        assert!(classic.contains("# HELP flamewatch_alerts_total Alerts fired"));
        assert!(!classic.contains("# EOF"));
    }

    /// Test that a probed function's kernel histogram is exported as a
    /// Prometheus histogram with cumulative fixed `le` buckets, sum and
    /// count, with its quantiles beside it, and that both go with the probe.
    #[test]
    fn function_durations_histogram() {
        let e = Exporter::new();
        let mut lat = crate::probes::Latency::default();
        for k in 0..100u64 {
            lat.record(if k % 10 == 9 { 30_000_000 } else { 2_000_000 });
        }
        let labels = FunctionLabels {
            target: "game-server".into(),
            pid: "7".into(),
            function: "game_tick".into(),
        };
        e.set_function(&labels, &lat);
        let text = e.render_text();
        let series = r#"{target="game-server",pid="7",function="game_tick""#;
        let labels_text = &series[1..];
        let bucket =
            |le: &str| format!("flamewatch_function_duration_seconds_bucket{{le=\"{le}\",{labels_text}}}");
        for (le, n) in [
            ("0.001", 0),
            ("0.0025", 90),
            ("0.0167", 90),
            ("0.025", 90),
            ("0.05", 100),
            ("+Inf", 100),
        ] {
            assert!(text.contains(&format!("{} {n}\n", bucket(le))), "le {le}: {text}");
        }
        assert!(
            text.contains(&format!(
                "flamewatch_function_duration_seconds_count{series}}} 100"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "flamewatch_function_duration_seconds_sum{series}}} 0.48"
            )),
            "{text}"
        );
        assert!(
            text.contains("# TYPE flamewatch_function_duration_seconds histogram"),
            "{text}"
        );
        let p99 = text
            .lines()
            .find(|l| {
                l.starts_with("flamewatch_function_duration_percentile_seconds")
                    && l.contains("percentile=\"99\"")
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .expect("p99 gauge");
        assert!((p99 - 0.03).abs() < 0.0015, "{p99}");
        e.remove_function(&labels);
        assert!(!e.render_text().contains("game_tick"));
    }

    /// Test that dashboards/flamewatch.json (the Grafana dashboard) is valid
    /// JSON and that every metric its queries name is one the agent exports.
    #[test]
    fn grafana_dashboard_names_exported_metrics() {
        let doc: serde_json::Value =
            serde_json::from_str(include_str!("../../dashboards/flamewatch.json")).expect("valid JSON");
        let mut exprs = Vec::new();
        fn collect(v: &serde_json::Value, out: &mut Vec<String>) {
            match v {
                serde_json::Value::Object(m) => {
                    for (k, v) in m {
                        match v.as_str() {
                            Some(s) if k == "expr" || k == "query" || k == "definition" => {
                                out.push(s.to_owned())
                            }
                            _ => collect(v, out),
                        }
                    }
                }
                serde_json::Value::Array(a) => a.iter().for_each(|v| collect(v, out)),
                _ => {}
            }
        }
        collect(&doc, &mut exprs);
        assert!(exprs.len() >= 10, "{exprs:?}");
        let e = Exporter::new();
        let labels = TargetLabels {
            target: "t".into(),
            pid: "1".into(),
        };
        let all: Vec<(Metric, f64)> = Metric::ALL.iter().map(|&m| (m, 1.0)).collect();
        e.set_target(&labels, &all);
        e.set_session(
            &labels,
            SessionView {
                overhead_pct: 1.0,
                hz: 99.0,
                lost_samples: 0,
            },
            0,
        );
        let rule = RuleLabels {
            target: "t".into(),
            rule: "cpu_high".into(),
            severity: "critical".into(),
        };
        e.alert(&rule, true);
        e.session_started(&SessionLabels {
            target: "t".into(),
            kind: "emergency".into(),
        });
        let exported = e.render_text();
        let names: std::collections::BTreeSet<&str> = exported
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        for expr in &exprs {
            let mut rest = expr.as_str();
            while let Some(at) = rest.find("flamewatch_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    names.contains(name.as_str()),
                    "{name} (in {expr}) is not exported: {names:?}"
                );
                rest = &rest[at + name.len()..];
            }
        }
    }
}

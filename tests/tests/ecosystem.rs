//! The daemon with the tools engineers already run: Prometheus scraping
//! its /metrics, Alertmanager receiving its alerts. Real servers (Debian's
//! prometheus and prometheus-alertmanager packages), started by the tests.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use flamewatch_e2e::*;
use serde_json::Value;

/// GET over plain HTTP/1.0: (status, body).
fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n")?.1.to_owned();
    Some((status, body))
}

/// A daemon watching `pid`, with `extra` configuration at the top level.
fn daemon(dir: &Path, pid: u32, extra: &str, rules: &str) -> TestProcess {
    let config = dir.join("flamewatch.toml");
    std::fs::write(
        &config,
        format!(
            "output = {:?}\ncontrol_socket = {:?}\n{extra}\n[[target]]\npid = {pid}\n{rules}",
            dir.display().to_string(),
            dir.join("control.sock").display().to_string()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(flamewatch_bin());
    cmd.args(["watch", "--config", config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    TestProcess::spawn(cmd)
}

/// Test that /metrics passes `promtool check metrics`, and that a real
/// Prometheus server scrapes it and answers a target metric through its
/// query API.
#[test]
fn prometheus_scrapes_the_agent() {
    if !privileged("prometheus_scrapes_the_agent") {
        return;
    }
    let dir = output_dir();
    let mut cmd = Command::new(target_bin("hotpaths"));
    cmd.args(["--seconds", "120"]);
    let target = TestProcess::spawn_ready(cmd);
    let metrics = format!("127.0.0.1:{}", free_tcp_port());
    let _d = daemon(
        dir.path(),
        target.pid(),
        &format!("metrics_addr = {metrics:?}"),
        "",
    );
    let mut body = String::new();
    assert!(
        wait_until(Duration::from_secs(15), || {
            body = http_get(&metrics, "/metrics").map(|(_, b)| b).unwrap_or_default();
            body.contains("flamewatch_target_cpu_percent")
        }),
        "metrics served: {body}"
    );
    let pid = target.pid().to_string();
    for name in [
        "flamewatch_target_cpu_percent",
        "flamewatch_target_rss_bytes",
        "flamewatch_target_threads",
        "flamewatch_target_open_fds",
        "flamewatch_target_tcp_time_wait",
        "flamewatch_agent_cpu_percent",
        "flamewatch_sessions_running",
    ] {
        assert!(body.contains(name), "{name} missing:\n{body}");
    }
    assert!(body.contains(&format!("pid=\"{pid}\"")));

    // promtool reads the exposition on stdin.
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian prometheus)");
    check.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // A real Prometheus scraping us every second.
    let prom_addr = format!("127.0.0.1:{}", free_tcp_port());
    let prom_dir = dir.path().join("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    let prom_config = prom_dir.join("prometheus.yml");
    std::fs::write(
        &prom_config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: flamewatch\n    static_configs:\n      - targets: ['{metrics}']\n"
        ),
    )
    .unwrap();
    let mut prom = Command::new("prometheus");
    prom.arg(format!("--config.file={}", prom_config.display()))
        .arg(format!("--storage.tsdb.path={}", prom_dir.join("data").display()))
        .arg(format!("--web.listen-address={prom_addr}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _prom = TestProcess::spawn(prom);
    let query = format!("/api/v1/query?query=flamewatch_target_rss_bytes%7Bpid%3D%22{pid}%22%7D");
    let mut answer = Value::Null;
    assert!(
        wait_until(Duration::from_secs(30), || {
            answer = http_get(&prom_addr, &query)
                .and_then(|(_, b)| serde_json::from_str(&b).ok())
                .unwrap_or(Value::Null);
            answer["data"]["result"].as_array().is_some_and(|r| !r.is_empty())
        }),
        "Prometheus answered the query: {answer}"
    );
    let value: f64 = answer["data"]["result"][0]["value"][1]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(value > 100_000.0, "RSS of the target: {value}");
}

/// Test that a real Alertmanager receives the firing alert (visible through
/// its API, with our labels and annotations), then the resolved one (it
/// notifies its own receiver with status "resolved").
#[test]
fn alertmanager_firing_then_resolved() {
    if !privileged("alertmanager_firing_then_resolved") {
        return;
    }
    let dir = output_dir();
    // Busy 8 s of CPU, then asleep for long: fires (and is profiled), then
    // clears.
    let mut cmd = Command::new(target_bin("sleepspin"));
    cmd.args([
        "--spin-us",
        "8000000",
        "--sleep-us",
        "60000000",
        "--seconds",
        "120",
    ]);
    let target = TestProcess::spawn_ready(cmd);
    let (hook, notifications) = http_receiver("/");
    let am_dir = dir.path().join("alertmanager");
    std::fs::create_dir_all(&am_dir).unwrap();
    let am_config = am_dir.join("alertmanager.yml");
    std::fs::write(
        &am_config,
        format!(
            "route:\n  receiver: test\n  group_wait: 1s\n  group_interval: 1s\n  repeat_interval: 1h\n\
             receivers:\n  - name: test\n    webhook_configs:\n      - url: '{hook}'\n        send_resolved: true\n"
        ),
    )
    .unwrap();
    let am_addr = format!("127.0.0.1:{}", free_tcp_port());
    let mut am = Command::new("prometheus-alertmanager");
    am.arg(format!("--config.file={}", am_config.display()))
        .arg(format!("--storage.path={}", am_dir.join("data").display()))
        .arg(format!("--web.listen-address={am_addr}"))
        .arg("--cluster.listen-address=")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _am = TestProcess::spawn(am);
    assert!(wait_until(Duration::from_secs(15), || http_get(
        &am_addr, "/-/ready"
    )
    .is_some_and(|(s, _)| s == 200)));
    let _d = daemon(
        dir.path(),
        target.pid(),
        &format!(
            "metrics_addr = \"off\"\nalertmanager = \"http://{am_addr}\"\n[emergency]\nduration = \"2s\""
        ),
        // Critical: it starts an emergency profile, linked in Alertmanager.
        "[[target.rule]]\nname = \"cpu_burst\"\nseverity = \"critical\"\nkind = \"threshold\"\n\
         metric = \"cpu_pct\"\nabove = 50\nfor_s = 1\nclear_s = 2\n",
    );
    let mut alerts = Value::Null;
    assert!(
        wait_until(Duration::from_secs(15), || {
            alerts = http_get(&am_addr, "/api/v2/alerts")
                .and_then(|(_, b)| serde_json::from_str(&b).ok())
                .unwrap_or(Value::Null);
            alerts
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x["labels"]["alertname"] == "cpu_burst"))
        }),
        "firing alert visible in Alertmanager: {alerts}"
    );
    let a = alerts
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["labels"]["alertname"] == "cpu_burst")
        .unwrap();
    assert_eq!(a["labels"]["severity"], "critical");
    assert_eq!(a["labels"]["target"], "sleepspin");
    assert_eq!(a["status"]["state"], "active");
    assert!(a["annotations"]["message"].as_str().unwrap().contains("above 50"));
    // The emergency profile's flamegraph joins the same alert.
    let mut flamegraph = String::new();
    assert!(
        wait_until(Duration::from_secs(10), || {
            flamegraph = http_get(&am_addr, "/api/v2/alerts")
                .and_then(|(_, b)| serde_json::from_str::<Value>(&b).ok())
                .and_then(|all| {
                    all.as_array()?
                        .iter()
                        .find(|x| x["labels"]["alertname"] == "cpu_burst")?["annotations"]["flamegraph"]
                        .as_str()
                        .map(str::to_owned)
                })
                .unwrap_or_default();
            !flamegraph.is_empty()
        }),
        "flamegraph annotation in Alertmanager"
    );
    assert!(
        flamegraph.ends_with(".svg") && Path::new(&flamegraph).exists(),
        "{flamegraph}"
    );
    let resolved =
        |n: &Value| n["status"] == "resolved" && n["alerts"][0]["labels"]["alertname"] == "cpu_burst";
    assert!(
        wait_until(Duration::from_secs(20), || notifications
            .lock()
            .unwrap()
            .iter()
            .any(resolved)),
        "Alertmanager resolved it: {:#?}",
        notifications.lock().unwrap()
    );
    assert!(notifications
        .lock()
        .unwrap()
        .iter()
        .any(|n| n["status"] == "firing"));
    // And it is no longer active.
    let active: Value = http_get(&am_addr, "/api/v2/alerts")
        .and_then(|(_, b)| serde_json::from_str(&b).ok())
        .unwrap();
    assert!(
        !active
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["labels"]["alertname"] == "cpu_burst"),
        "{active}"
    );
}

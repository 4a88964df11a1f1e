//! The daemon's live dashboard: its JSON API, event stream and profiles
//! (read back by `go tool pprof` over HTTP), its access rules, and the page
//! in headless Chromium.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use fantoccini::{Client, ClientBuilder, Locator};
use flamewatch_e2e::{browser::*, *};
use serde_json::Value;

/// An HTTP/1.0 response: status, header lines, body.
struct Reply {
    status: u16,
    headers: String,
    body: Vec<u8>,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.text()))
    }

    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }
}

/// GET `path` on `addr` with `extra` header lines.
fn get(addr: &str, path: &str, extra: &[&str]) -> Reply {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut head = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n");
    for h in extra {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("headers end");
    let headers = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = headers
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap();
    Reply {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }
}

/// A critical rule on CPU above 25 % for 2 s (the spinning target gets
/// less than a core on a busy machine).
const CPU_RULE: &str =
    "[[target.rule]]\nname = \"cpu_high\"\nseverity = \"critical\"\nkind = \"threshold\"\n\
                        metric = \"cpu_pct\"\nabove = 25\nfor_s = 2\n";

/// The daemon watching `pid` with `rules`, its dashboard on a free port;
/// with that address.
fn daemon(dir: &Path, pid: u32, rules: &str) -> (TestProcess, String) {
    let addr = format!("127.0.0.1:{}", free_tcp_port());
    let config = dir.join("flamewatch.toml");
    std::fs::write(
        &config,
        format!(
            "output = {:?}\ncontrol_socket = {:?}\nmetrics_addr = {addr:?}\n[emergency]\nduration = \"3s\"\n\
             [[target]]\npid = {pid}\n{rules}",
            dir.display().to_string(),
            dir.join("control.sock").display().to_string()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(flamewatch_bin());
    cmd.args(["watch", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let d = TestProcess::spawn(cmd);
    assert!(
        wait_until(Duration::from_secs(15), || {
            TcpStream::connect(&addr).is_ok()
                && get(&addr, "/api/targets", &[]).json()["targets"]
                    .as_array()
                    .is_some_and(|t| !t.is_empty())
        }),
        "dashboard up with its target"
    );
    (d, addr)
}

/// hotpaths spinning, 2:1.
fn hotpaths() -> TestProcess {
    let mut cmd = Command::new(target_bin("hotpaths-fp"));
    cmd.args(["--ratio", "2:1", "--seconds", "120"]);
    TestProcess::spawn_ready(cmd)
}

/// Test that the API lists the target with its latest metrics and rule
/// lines, serves its history, streams ticks over Server-Sent Events, and
/// answers a profile of the last seconds as folded stacks and as pprof that
/// `go tool pprof` reads over HTTP; with the security headers, and one-line
/// errors for bad queries and files outside the folder.
#[test]
fn dashboard_api() {
    if !privileged("dashboard_api") {
        return;
    }
    let _turn = cpu_bound_turn();
    let dir = output_dir();
    let target = hotpaths();
    let (_d, addr) = daemon(dir.path(), target.pid(), CPU_RULE);
    let pid = target.pid();
    assert!(
        wait_until(Duration::from_secs(15), || {
            let j = get(&addr, "/api/targets", &[]).json();
            j["targets"][0]["pids"][0]["metrics"]["cpu_pct"]
                .as_f64()
                .is_some_and(|c| c > 25.0)
        }),
        "cpu_pct of the busy target"
    );
    let j = get(&addr, "/api/targets", &[]).json();
    let t = &j["targets"][0];
    assert_eq!(t["name"], "hotpaths-fp");
    assert_eq!(t["pids"][0]["pid"].as_u64(), Some(u64::from(pid)));
    assert_eq!(t["rules"][0]["rule"], "cpu_high");
    assert_eq!(t["rules"][0]["value"].as_f64(), Some(25.0));
    let mut s = Value::Null;
    assert!(
        wait_until(Duration::from_secs(10), || {
            s = get(
                &addr,
                "/api/targets/hotpaths-fp/series?metric=cpu_pct&since=1m",
                &[],
            )
            .json();
            s["series"][0]["points"].as_array().is_some_and(|p| p.len() >= 3)
        }),
        "three points of history: {s}"
    );

    // The event stream: a tick arrives within a few seconds.
    let mut stream = TcpStream::connect(&addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(stream, "GET /api/events HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut lines = BufReader::new(stream).lines();
    let tick = lines
        .by_ref()
        .map_while(Result::ok)
        .take(200)
        .find(|l| l.starts_with("data:") && l.contains("\"type\":\"tick\""));
    assert!(
        tick.is_some_and(|l| l.contains(&format!("\"pid\":{pid}"))),
        "a tick event"
    );

    // Profiles of the recent past, from the flight recorder.
    let folded = get(
        &addr,
        "/api/profile?target=hotpaths-fp&since=20s&format=folded",
        &[],
    );
    assert_eq!(folded.status, 200, "{}", folded.text());
    assert!(folded.text().contains("hot_a"), "{}", folded.text());
    let url = format!("http://{addr}/api/profile?target=hotpaths-fp&since=20s&format=pprof");
    let pprof_home = tempfile::tempdir().unwrap();
    let out = Command::new("go")
        .args(["tool", "pprof", "-top", &url])
        .env("PPROF_TMPDIR", pprof_home.path())
        .env("HOME", pprof_home.path())
        .output()
        .expect("go tool pprof (Debian golang-go)");
    let top = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && top.contains("hot_a"),
        "{top}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Headers and refusals.
    let page = get(&addr, "/", &[]);
    assert_eq!(page.status, 200);
    for (h, want) in [
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "SAMEORIGIN"),
        ("referrer-policy", "no-referrer"),
    ] {
        assert_eq!(page.header(h).as_deref(), Some(want), "{h}");
    }
    assert!(page
        .header("content-security-policy")
        .is_some_and(|c| c.contains("script-src 'self'")));
    let bad = get(&addr, "/api/profile?target=hotpaths-fp&since=soon", &[]);
    assert_eq!(bad.status, 400);
    assert!(
        bad.text().contains("since = \"soon\"") && bad.text().trim().lines().count() == 1,
        "{}",
        bad.text()
    );
    let bad = get(&addr, "/api/targets/hotpaths-fp/series?metric=nope", &[]);
    assert_eq!(bad.status, 400, "{}", bad.text());
    std::os::unix::fs::symlink("/etc/passwd", dir.path().join("planted.svg")).unwrap();
    assert_eq!(
        get(&addr, "/files/planted.svg", &[]).status,
        404,
        "a symlink is not served"
    );
    assert_eq!(get(&addr, "/files/..%2Fetc%2Fpasswd.json", &[]).status, 404);
    // The metrics are still there.
    assert!(get(&addr, "/metrics", &[])
        .text()
        .contains("flamewatch_target_cpu_percent"));
}

/// Test that the live window's differential wants a healthy baseline (404
/// and why, in one line, before there is one), and that once a window taken
/// while nothing fires is one, the next window's differential is drawn.
#[test]
fn dashboard_differential() {
    if !privileged("dashboard_differential") {
        return;
    }
    let _turn = cpu_bound_turn();
    let dir = output_dir();
    let target = hotpaths();
    let (_d, addr) = daemon(dir.path(), target.pid(), "");
    std::thread::sleep(Duration::from_secs(3));
    let diff = "/api/profile?target=hotpaths-fp&since=20s&format=diff";
    let none = get(&addr, diff, &[]);
    assert_eq!(none.status, 404, "{}", none.text());
    assert!(
        none.text().contains("no healthy baseline") && none.text().trim().lines().count() == 1,
        "{}",
        none.text()
    );
    // That window, taken while nothing fired, is the baseline now.
    let svg = get(&addr, diff, &[]);
    assert_eq!(svg.status, 200, "{}", svg.text());
    assert_eq!(svg.header("content-type").as_deref(), Some("image/svg+xml"));
    assert!(
        svg.text()
            .contains("differential: the window vs the healthy baseline")
            && svg.text().contains("hot_a"),
        "{}",
        svg.text()
    );
}

/// Test that serving beyond loopback without a token is refused (exit 2,
/// one line), and that with one every route wants it: as a bearer header,
/// or once in the page's URL, which sets a cookie.
#[test]
fn dashboard_token() {
    if !privileged("dashboard_token") {
        return;
    }
    let dir = output_dir();
    let out = flamewatch(&[
        "watch",
        "--pid",
        "1",
        "--metrics-addr",
        "0.0.0.0:9",
        "--output",
        dir.path().to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--dashboard-token") && err.trim().lines().count() == 1,
        "{err}"
    );

    let target = hotpaths();
    let token = "s3cr3t-token-0123456789";
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let port = free_tcp_port();
    let mut cmd = Command::new(flamewatch_bin());
    cmd.args([
        "watch",
        "--pid",
        &target.pid().to_string(),
        "--metrics-addr",
        &format!("0.0.0.0:{port}"),
    ])
    .arg("--dashboard-token")
    .arg(&token_file)
    .arg("--output")
    .arg(dir.path())
    .arg("--control-socket")
    .arg(dir.path().join("control.sock"))
    .stdout(Stdio::null())
    .stderr(Stdio::inherit());
    let _d = TestProcess::spawn(cmd);
    let addr = format!("127.0.0.1:{port}");
    assert!(wait_until(Duration::from_secs(15), || TcpStream::connect(&addr).is_ok()));
    for path in ["/", "/api/targets", "/metrics", "/api/profile?target=x"] {
        assert_eq!(get(&addr, path, &[]).status, 401, "{path} without the token");
    }
    let wrong = get(
        &addr,
        "/api/targets",
        &["Authorization: Bearer s3cr3t-token-0123456780"],
    );
    assert_eq!(wrong.status, 401);
    let bearer = format!("Authorization: Bearer {token}");
    assert_eq!(get(&addr, "/api/targets", &[&bearer]).status, 200);
    let login = get(&addr, &format!("/?token={token}"), &[]);
    assert_eq!(login.status, 303, "{}", login.headers);
    let cookie = login.header("set-cookie").unwrap();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().unwrap();
    assert_eq!(
        get(&addr, "/api/targets", &[&format!("Cookie: {pair}")]).status,
        200
    );
}

/// Runs `script` in the page until it returns true.
async fn wait_js(client: &Client, script: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if client
            .execute(script, vec![])
            .await
            .is_ok_and(|v| v == Value::Bool(true))
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// Test that the page in headless Chromium (no network) draws a chart per
/// metric with the latest value written beside it (a probe's p99 latency
/// too), shows the alert when the CPU rule fires, opens the flamegraph of
/// the last minutes in place, logs no console error (CSP included), and
/// fits a phone-sized window; screenshots go to target/test-artifacts.
#[tokio::test(flavor = "current_thread")]
// The turn is a std lock shared with the other tests' threads, held for the
// whole test on purpose; nothing else on this runtime takes it.
#[allow(clippy::await_holding_lock)]
async fn dashboard_in_chromium() {
    if !privileged("dashboard_in_chromium") {
        return;
    }
    let _turn = cpu_bound_turn();
    let dir = output_dir();
    let target = hotpaths();
    // A latency probe too: its p99 chart appears beside the others.
    let rules = format!("{CPU_RULE}[[target.probe]]\nfunction = \"hot_b\"\nbudget = \"1ms\"\n");
    let (_d, addr) = daemon(dir.path(), target.pid(), &rules);
    let (browser, driver_url) = Browser::start();
    let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(browser.capabilities())
        .connect(&driver_url)
        .await
        .expect("WebDriver session");
    let result = browse(&client, &addr).await;
    let mut log = Vec::new();
    console(&client, "dashboard", &mut log).await;
    let _ = client.close().await;
    drop(browser);
    let errors: Vec<_> = log.iter().filter(|(_, l, _)| l == "SEVERE").collect();
    result.unwrap_or_else(|e| panic!("{e}; console: {log:?}"));
    assert!(errors.is_empty(), "console errors: {errors:?}");
}

async fn browse(client: &Client, addr: &str) -> Result<(), String> {
    client
        .goto(&format!("http://{addr}/"))
        .await
        .map_err(|e| e.to_string())?;
    let charts =
        "return document.querySelectorAll('.target[data-target=\"hotpaths-fp\"] .chart canvas').length >= 5";
    if !wait_js(client, charts, Duration::from_secs(20)).await {
        return Err("five charts drawn".into());
    }
    let cpu = "var v = document.querySelector('.chart[data-metric=cpu_pct] .value'); \
               return !!v && / %$/.test(v.textContent) && parseFloat(v.textContent) > 25";
    if !wait_js(client, cpu, Duration::from_secs(20)).await {
        return Err("the CPU value written beside its chart".into());
    }
    let p99 = "var v = document.querySelector('.chart[data-metric=latency_p99_ms] .value'); \
               return !!v && / ms$/.test(v.textContent) && parseFloat(v.textContent) > 0";
    if !wait_js(client, p99, Duration::from_secs(20)).await {
        return Err("the probe's p99 latency chart with its value".into());
    }
    let alert = "var a = document.querySelector('#alerts .alert.critical'); return !!a && a.textContent.indexOf('cpu_high') >= 0";
    if !wait_js(client, alert, Duration::from_secs(30)).await {
        return Err("the cpu_high alert shown".into());
    }
    let shots = artifacts_dir();
    let png = client.screenshot().await.map_err(|e| e.to_string())?;
    std::fs::write(shots.join("dashboard.png"), png).map_err(|e| e.to_string())?;
    client
        .find(Locator::Id("profile-open"))
        .await
        .map_err(|e| e.to_string())?
        .click()
        .await
        .map_err(|e| e.to_string())?;
    let frames = "var d = document.getElementById('flamegraph').contentDocument; \
                  return !!d && d.querySelectorAll('#frames g').length > 3";
    if !wait_js(client, frames, Duration::from_secs(30)).await {
        return Err("the flamegraph of the last 5 minutes opened in place".into());
    }
    client
        .set_window_size(390, 844)
        .await
        .map_err(|e| e.to_string())?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fits = "return document.documentElement.scrollWidth <= window.innerWidth + 1";
    if !wait_js(client, fits, Duration::from_secs(5)).await {
        return Err("no horizontal scrolling in a phone-sized window".into());
    }
    let png = client.screenshot().await.map_err(|e| e.to_string())?;
    std::fs::write(shots.join("dashboard-phone.png"), png).map_err(|e| e.to_string())?;
    println!("screenshots: {}", shots.display());
    Ok(())
}

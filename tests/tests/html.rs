//! The output folder's index.html in a real browser: Debian's Chromium,
//! headless, with a new empty profile and no network, driven over W3C
//! WebDriver by chromedriver (fantoccini client).

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use fantoccini::{Client, ClientBuilder, Locator};
use flamewatch_e2e::{browser::*, *};
use serde_json::{json, Value};

/// The function the game server's `hot-path` incident spends its time in.
const HOT: &str = "hot_path_pathfinding";

/// Waits until the page's URL satisfies `cond`.
async fn wait_for_url(client: &Client, cond: impl Fn(&str) -> bool) -> String {
    for _ in 0..100 {
        let url = client.current_url().await.expect("url").to_string();
        if cond(&url) {
            return url;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "the page did not change: {}",
        client.current_url().await.expect("url")
    );
}

/// The flamegraph's frames painted in inferno's search colour, and its
/// "Matched:" line.
async fn highlighted(client: &Client) -> (Vec<String>, String) {
    // The SVG's script sets up on load; wait for it.
    for _ in 0..100 {
        let ready = client
            .execute(
                "return typeof searchcolor === 'string' && typeof frames === 'object' && frames !== null",
                vec![],
            )
            .await
            .expect("script");
        if ready == Value::Bool(true) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let v = client
        .execute(
            r##"var hits = [];
               var groups = document.querySelectorAll("#frames g");
               for (var i = 0; i < groups.length; i++) {
                 var r = groups[i].querySelector("rect");
                 if (r && r.getAttribute("fill") === searchcolor)
                   hits.push(groups[i].querySelector("title").textContent);
               }
               return [hits, document.getElementById("matched").textContent];"##,
            vec![],
        )
        .await
        .expect("script");
    let hits = v[0]
        .as_array()
        .expect("hits")
        .iter()
        .map(|h| h.as_str().unwrap_or("").to_owned())
        .collect();
    (hits, v[1].as_str().unwrap_or("").to_owned())
}

/// Test that after a real `record` the folder's index.html loads in
/// headless Chromium without console errors or any network request, lists
/// the session and the alerts timeline, that its flamegraph link opens the
/// SVG, whose search highlights the hot function (typed into inferno's
/// search prompt, and from the index's top-function link); screenshots are
/// kept under target/test-artifacts.
#[tokio::test(flavor = "current_thread")]
async fn index_in_chromium() {
    if !privileged("index_in_chromium") {
        return;
    }
    let mut cmd = Command::new(target_bin("game-server-fp"));
    cmd.args(["--port", &free_udp_port().to_string(), "--incident", "hot-path"]);
    let target = TestProcess::spawn_ready(cmd);
    let dir = output_dir();
    let pid = target.pid();
    // A firing alert as `flamewatch watch` writes them; its message has
    // markup characters that must come out as text.
    let alert = json!({
        "time": "2026-11-22T03:14:58Z", "status": "firing",
        "target": {"pid": pid, "comm": "game-server-fp"},
        "rule": "cpu_high", "severity": "critical", "metric": "cpu_pct",
        "value": 99.5, "threshold": 80.0,
        "message": "CPU 99.5 % > 80 % for 10 s <script>alert(1)</script>"
    });
    std::fs::write(dir.path().join("alerts.jsonl"), format!("{alert}\n")).expect("alerts");
    let out = flamewatch(&[
        "record",
        "--pid",
        &pid.to_string(),
        "--duration",
        "3s",
        "--output",
        dir.path().to_str().expect("utf-8 path"),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    drop(target);
    let svg = printed_files(&out.stdout, "svg");
    assert_eq!(svg.len(), 1, "one flamegraph");
    let index = dir.path().join("index.html");
    assert!(index.exists(), "record wrote {}", index.display());

    let (browser, driver_url) = Browser::start();
    let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(browser.capabilities())
        .connect(&driver_url)
        .await
        .unwrap_or_else(|e| {
            let log = std::fs::read_to_string(browser.profile.path().join("chromedriver.log"));
            panic!("WebDriver session: {e}\n{}", log.unwrap_or_default())
        });
    let result = browse(&client, &index, &svg[0]).await;
    let _ = client.close().await;
    drop(browser);
    result.check();
}

/// What the browser saw.
struct Seen {
    console: Vec<(String, String, String)>,
    resources: Value,
    sessions: Value,
    alerts: Value,
    hrefs: Vec<String>,
    svg_url: String,
    svg_name: String,
    /// Whether an error logged on purpose was read back.
    probe_seen: bool,
    prompt_hits: (Vec<String>, String),
    link_hits: (Vec<String>, String),
    link_url: String,
    screenshots: Vec<PathBuf>,
}

async fn browse(client: &Client, index: &Path, svg: &Path) -> Seen {
    let mut console_seen = Vec::new();
    let mut screenshots = Vec::new();
    let artifacts = artifacts_dir();
    let index_url = format!("file://{}", index.display());
    client.goto(&index_url).await.expect("open the index");
    console(client, "index", &mut console_seen).await;
    // Everything the page loaded besides itself (nothing, if it is static).
    let resources = client
        .execute(
            "return performance.getEntriesByType('resource').map(function (e) { return e.name; })",
            vec![],
        )
        .await
        .expect("script");
    let sessions = client
        .execute(
            r##"return Array.prototype.map.call(
                 document.querySelectorAll("#sessions + table tbody tr"),
                 function (tr) { return tr.innerText; })"##,
            vec![],
        )
        .await
        .expect("script");
    let alerts = client
        .execute(
            r##"var rows = document.querySelectorAll("#alerts + table tbody tr");
               return Array.prototype.map.call(rows, function (tr) {
                 var sev = tr.querySelector(".badge.sev-critical");
                 return [tr.innerText, sev ? getComputedStyle(sev).backgroundColor : ""];
               })"##,
            vec![],
        )
        .await
        .expect("script");
    let hrefs = client
        .execute(
            r##"return Array.prototype.map.call(document.querySelectorAll("a[href]"),
                 function (a) { return a.getAttribute("href"); })"##,
            vec![],
        )
        .await
        .expect("script")
        .as_array()
        .expect("hrefs")
        .iter()
        .map(|h| h.as_str().unwrap_or("").to_owned())
        .collect();
    let shot = artifacts.join("html-index.png");
    std::fs::write(&shot, client.screenshot().await.expect("screenshot")).expect("write");
    screenshots.push(shot);

    // The session's flamegraph link, then inferno's own search prompt.
    client
        .find(Locator::Css("#sessions + table a.svg"))
        .await
        .expect("flamegraph link")
        .click()
        .await
        .expect("click");
    let svg_url = wait_for_url(client, |u| u.ends_with(".svg")).await;
    let _ = highlighted(client).await;
    client
        .find(Locator::Css("#search"))
        .await
        .expect("search button")
        .click()
        .await
        .expect("click search");
    client.send_alert_text(HOT).await.expect("type into the prompt");
    client.accept_alert().await.expect("accept the prompt");
    let prompt_hits = highlighted(client).await;
    console(client, "flamegraph", &mut console_seen).await;
    let shot = artifacts.join("html-flamegraph-search.png");
    std::fs::write(&shot, client.screenshot().await.expect("screenshot")).expect("write");
    screenshots.push(shot);

    // Back on the index, the top function's link opens the flamegraph with
    // the function highlighted (inferno's `s=` parameter).
    client.goto(&index_url).await.expect("open the index again");
    client
        .find(Locator::Css("#sessions + table .fn a"))
        .await
        .expect("top function link")
        .click()
        .await
        .expect("click");
    let link_url = wait_for_url(client, |u| u.contains(".svg?s=")).await;
    let link_hits = highlighted(client).await;
    console(client, "flamegraph via s=", &mut console_seen).await;
    // The console log is read for real: an error logged now shows up.
    client
        .execute("console.error('flamewatch console probe'); return true", vec![])
        .await
        .expect("script");
    let mut probe = Vec::new();
    console(client, "probe", &mut probe).await;
    Seen {
        probe_seen: probe
            .iter()
            .any(|(_, l, m)| l == "SEVERE" && m.contains("flamewatch console probe")),
        svg_name: svg.file_name().expect("file").to_string_lossy().into_owned(),
        console: console_seen,
        resources,
        sessions,
        alerts,
        hrefs,
        svg_url,
        prompt_hits,
        link_hits,
        link_url,
        screenshots,
    }
}

impl Seen {
    fn check(&self) {
        for (page, level, message) in &self.console {
            println!("console [{page}] {level}: {message}");
        }
        for shot in &self.screenshots {
            println!("screenshot: {}", shot.display());
        }
        println!("flamegraph: {}", self.svg_url);
        println!(
            "search prompt highlighted {:?}, {:?}",
            self.prompt_hits.0, self.prompt_hits.1
        );
        println!(
            "{} highlighted {:?}, {:?}",
            self.link_url, self.link_hits.0, self.link_hits.1
        );
        println!(
            "console: {} entries on the pages; an error logged on purpose was read back: {}",
            self.console.len(),
            self.probe_seen
        );
        assert!(self.probe_seen, "the console log of the browser is readable");
        let errors: Vec<_> = self.console.iter().filter(|(_, l, _)| l == "SEVERE").collect();
        assert!(errors.is_empty(), "console errors: {errors:?}");
        assert_eq!(self.resources, json!([]), "the index loads nothing but itself");
        let sessions = self.sessions.as_array().expect("rows");
        assert_eq!(sessions.len(), 1, "{sessions:?}");
        let row = sessions[0].as_str().unwrap_or("");
        assert!(
            row.contains("game-server-fp") && row.contains("on-demand") && row.contains(HOT),
            "{row}"
        );
        let alerts = self.alerts.as_array().expect("rows");
        assert_eq!(alerts.len(), 1, "{alerts:?}");
        let text = alerts[0][0].as_str().unwrap_or("");
        assert!(
            text.contains("<script>alert(1)</script>"),
            "markup shown as text: {text}"
        );
        let colour = alerts[0][1].as_str().unwrap_or("");
        assert!(
            !colour.is_empty() && colour != "rgba(0, 0, 0, 0)",
            "the critical badge is coloured: {colour:?}"
        );
        assert!(self.svg_url.ends_with(&self.svg_name), "{} opened", self.svg_name);
        assert!(self.hrefs.len() >= 4, "{:?}", self.hrefs);
        for href in &self.hrefs {
            assert!(
                !href.starts_with('/') && !href.contains(':') && !href.contains(".."),
                "relative link: {href}"
            );
        }
        for (how, (hits, matched)) in [("prompt", &self.prompt_hits), ("s= link", &self.link_hits)] {
            assert!(!hits.is_empty(), "{how}: {HOT} highlighted");
            assert!(
                hits.iter().all(|h| h.starts_with(&format!("{HOT} ("))),
                "{how}: only {HOT} highlighted: {hits:?}"
            );
            assert!(matched.starts_with("Matched: "), "{how}: {matched:?}");
        }
    }
}

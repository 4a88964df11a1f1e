//! A headless Chromium for the browser tests: Debian's Chromium with a new
//! empty profile and no network, driven over W3C WebDriver by chromedriver
//! (fantoccini client).

use std::{
    net::TcpStream,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use fantoccini::{wd::WebDriverCompatibleCommand, Client};
use serde_json::{json, Value};

use crate::{free_tcp_port, wait_until, workspace_root, TestProcess};

/// chromedriver's console log endpoint (not in W3C WebDriver; chromedriver
/// keeps Selenium's): the browser's log entries since the last call.
#[derive(Debug)]
pub struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(&self, base: &url::Url, session: Option<&str>) -> Result<url::Url, url::ParseError> {
        base.join(&format!("session/{}/se/log", session.unwrap_or_default()))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (http::Method::POST, Some(json!({"type": "browser"}).to_string()))
    }
}

/// chromedriver and the Chromium it starts, ended when dropped (even when
/// the test fails half-way).
pub struct Browser {
    driver: Option<TestProcess>,
    /// The browser's profile folder (chromedriver.log is in it).
    pub profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver on a free loopback port; returns it and its URL.
    pub fn start() -> (Self, String) {
        let port = free_tcp_port();
        let profile = tempfile::Builder::new()
            .prefix("flamewatch-chromium-")
            .tempdir()
            .expect("temp dir");
        let log = std::fs::File::create(profile.path().join("chromedriver.log")).expect("log file");
        let mut cmd = Command::new("chromedriver");
        cmd.arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(log);
        let driver = TestProcess::spawn(cmd);
        let addr = format!("127.0.0.1:{port}");
        assert!(
            wait_until(Duration::from_secs(15), || TcpStream::connect(&addr).is_ok()),
            "chromedriver listens on {addr}"
        );
        (
            Self {
                driver: Some(driver),
                profile,
            },
            format!("http://{addr}/"),
        )
    }

    /// Capabilities of a Chromium that touches nothing outside this test:
    /// a new profile, no network (the background services would try, and
    /// this machine refuses), no first-run or sync.
    pub fn capabilities(&self) -> serde_json::Map<String, Value> {
        let user_data = self.profile.path().join("profile");
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    // Any host name but loopback's fails to resolve: an
                    // external asset in a page would show up as a console
                    // error.
                    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                    "--window-size=1400,1000",
                    format!("--user-data-dir={}", user_data.display()),
                ],
            },
            "goog:loggingPrefs": {"browser": "ALL"},
        });
        caps.as_object().expect("object").clone()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The Chromium processes chromedriver started carry our profile dir
        // on their command line: end exactly those, then chromedriver.
        let marker = self.profile.path().display().to_string();
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.filter_map(Result::ok) {
                let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else {
                    continue;
                };
                let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmdline).contains(&marker) {
                    // SAFETY: kill has no memory preconditions.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        drop(self.driver.take());
    }
}

/// Where test artifacts (screenshots) are kept: `<target>/test-artifacts`.
pub fn artifacts_dir() -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from)
        .join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("artifacts dir");
    dir
}

/// The browser's console entries since the last call.
pub async fn console(client: &Client, page: &str, seen: &mut Vec<(String, String, String)>) {
    let entries = client.issue_cmd(BrowserLog).await.expect("browser log");
    for e in entries.as_array().into_iter().flatten() {
        seen.push((
            page.to_owned(),
            e["level"].as_str().unwrap_or("").to_owned(),
            e["message"].as_str().unwrap_or("").to_owned(),
        ));
    }
}

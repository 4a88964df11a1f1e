//! The daemon's control socket: `flamewatch trigger` asks a running
//! `flamewatch watch` for an on-demand profile.
//!
//! A Unix socket only root can open (mode 0600, and the peer's uid is
//! checked too); one JSON request line, one JSON reply line when the
//! session's files are written.

use std::{os::unix::fs::PermissionsExt as _, path::Path, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};
use tracing::{debug, warn};

/// Where the daemon listens.
pub const SOCKET: &str = "/run/flamewatch/control.sock";

/// Errors of the control channel.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No daemon listens.
    #[error(
        "no flamewatch watch daemon is listening on {path} ({source}); start one with `flamewatch watch`"
    )]
    NoDaemon {
        /// Socket path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Talking to it failed.
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
    /// It answered something unreadable.
    #[error("control socket: bad reply: {0}")]
    Reply(#[from] serde_json::Error),
}

/// What `flamewatch trigger` asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// A watched process, by name…
    #[serde(default)]
    pub process: Option<String>,
    /// …or by pid.
    #[serde(default)]
    pub pid: Option<u32>,
    /// Session length, seconds: the rate is boosted for that long.
    #[serde(default)]
    pub duration_s: f64,
    /// Instead, the last this many seconds from the flight recorder, at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_s: Option<f64>,
    /// Sampling rate of the boost (default: the record default, 99 Hz).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freq_hz: Option<u64>,
    /// How long to wait for a configured target that is not running yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_s: Option<f64>,
}

/// The daemon's answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// Whether a profile was written.
    pub ok: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The files written (svg, folded, json for each target).
    #[serde(default)]
    pub files: Vec<String>,
}

/// A request and where to send its reply.
pub type Incoming = (Request, oneshot::Sender<Reply>);

/// Listens on `path` and forwards requests to the daemon.
pub fn serve(path: &Path) -> std::io::Result<mpsc::Receiver<Incoming>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // A socket left by a daemon that was killed.
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Err(e) = handle(stream, tx).await {
                    debug!("control connection: {e}");
                }
            });
        }
    });
    Ok(rx)
}

async fn handle(stream: UnixStream, tx: mpsc::Sender<Incoming>) -> std::io::Result<()> {
    // The file mode keeps others out; the credentials say so twice.
    if stream.peer_cred().map(|c| c.uid()).unwrap_or(u32::MAX) != 0 {
        warn!("control socket: refused a connection from a non-root user");
        return Ok(());
    }
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    let reply = match serde_json::from_str::<Request>(&line) {
        Ok(req) => {
            let (rtx, rrx) = oneshot::channel();
            if tx.send((req, rtx)).await.is_err() {
                Reply {
                    error: Some("the daemon is stopping".into()),
                    ..Reply::default()
                }
            } else {
                rrx.await.unwrap_or_else(|_| Reply {
                    error: Some("the session was dropped".into()),
                    ..Reply::default()
                })
            }
        }
        Err(e) => Reply {
            error: Some(format!("bad request: {e}")),
            ..Reply::default()
        },
    };
    let mut text = serde_json::to_string(&reply).unwrap_or_default();
    text.push('\n');
    write.write_all(text.as_bytes()).await
}

/// Sends `req` to the daemon at `path` and waits for its reply (at most
/// `timeout`).
pub async fn trigger(path: &Path, req: &Request, timeout: Duration) -> Result<Reply, ControlError> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|source| ControlError::NoDaemon {
            path: path.display().to_string(),
            source,
        })?;
    let (read, mut write) = stream.into_split();
    let mut text = serde_json::to_string(req)?;
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    let mut line = String::new();
    tokio::time::timeout(timeout, BufReader::new(read).read_line(&mut line))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no reply from the daemon"))??;
    Ok(serde_json::from_str(&line)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test a request/reply round trip over a socket only root may open.
    #[tokio::test]
    async fn round_trip() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED round_trip: the daemon only answers root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let mut rx = serve(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        tokio::spawn(async move {
            let (req, reply) = rx.recv().await.unwrap();
            assert_eq!(req.process.as_deref(), Some("logcaster"));
            let _ = reply.send(Reply {
                ok: true,
                files: vec!["a.svg".into()],
                error: None,
            });
        });
        let req = Request {
            process: Some("logcaster".into()),
            pid: None,
            duration_s: 1.0,
            since_s: None,
            freq_hz: None,
            wait_s: None,
        };
        let reply = trigger(&path, &req, Duration::from_secs(5)).await.unwrap();
        assert!(reply.ok);
        assert_eq!(reply.files, ["a.svg"]);
        let none = trigger(&dir.path().join("nope.sock"), &req, Duration::from_secs(1)).await;
        assert!(matches!(none, Err(ControlError::NoDaemon { .. })));
    }
}

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
    /// A request's duration is not a usable number of seconds.
    #[error("bad request: duration_s = {0}: want seconds in (0, 31536000] (at most 365 days)")]
    Duration(f64),
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
    /// Session length, seconds.
    pub duration_s: f64,
}

impl Request {
    /// The session length asked for (at least a second), or why it is not
    /// one: `Duration::from_secs_f64` panics on a value like 1e300.
    pub fn duration(&self) -> Result<Duration, ControlError> {
        let s = self.duration_s;
        if !(s.is_finite() && s > 0.0) {
            return Err(ControlError::Duration(s));
        }
        Duration::try_from_secs_f64(s.max(1.0))
            .ok()
            .and_then(|d| crate::config::check_duration("duration_s", d, false).ok())
            .ok_or(ControlError::Duration(s))
    }
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
        // Checked here, so the daemon only ever sees a usable duration.
        Ok(req) if req.duration().is_err() => Reply {
            error: req.duration().err().map(|e| e.to_string()),
            ..Reply::default()
        },
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

    /// Test that a request's duration is checked: a second at least, a year
    /// at most, and 1e300, infinity or NaN are errors naming the value.
    #[test]
    fn request_durations() {
        let req = |duration_s| Request {
            process: None,
            pid: Some(1),
            duration_s,
        };
        assert_eq!(req(0.2).duration().unwrap(), Duration::from_secs(1));
        assert_eq!(req(30.0).duration().unwrap(), Duration::from_secs(30));
        for bad in [1e300, f64::INFINITY, f64::NAN, -3.0, 0.0, 4e7] {
            let err = req(bad).duration().unwrap_err().to_string();
            assert!(err.contains(&format!("duration_s = {bad}")), "{err}");
        }
    }

    /// Test a request/reply round trip over a socket only root may open.
    #[tokio::test]
    async fn round_trip() {
        if !crate::testutil::privileged("round_trip", "the daemon only answers root") {
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
        };
        // A duration the daemon could not turn into a session is answered
        // here, with an error naming it.
        for bad in [1e300, -1.0, 0.0, 1e20] {
            let req = Request {
                duration_s: bad,
                ..req.clone()
            };
            let reply = trigger(&path, &req, Duration::from_secs(5)).await.unwrap();
            assert!(!reply.ok, "{bad}");
            assert!(reply.error.unwrap().contains("duration_s"), "{bad}");
        }
        let reply = trigger(&path, &req, Duration::from_secs(5)).await.unwrap();
        assert!(reply.ok);
        assert_eq!(reply.files, ["a.svg"]);
        let none = trigger(&dir.path().join("nope.sock"), &req, Duration::from_secs(1)).await;
        assert!(matches!(none, Err(ControlError::NoDaemon { .. })));
    }
}

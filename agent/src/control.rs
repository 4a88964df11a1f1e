//! The daemon's control socket: `flamewatch trigger` asks a running
//! `flamewatch watch` for an on-demand profile.
//!
//! A Unix socket only root can open (mode 0600, and the peer's uid is
//! checked too); one JSON request line, one JSON reply line when the
//! session's files are written.
//!
//! Its lifecycle: a daemon holds `<socket>.lock` (`flock`, opened
//! `O_NOFOLLOW`) for its whole life, so a second daemon on the same socket
//! is refused ([`ControlError::Locked`]); holding the lock, a socket still
//! at the path is a dead daemon's and is replaced; on exit a daemon removes
//! the socket only if it is still the one it bound (same device and inode).

use std::{
    fs::File,
    os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
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
    /// Another daemon holds the socket's lock (or answers on the socket).
    #[error("another `flamewatch watch` is running on {path} (it holds {path}.lock)")]
    Locked {
        /// Socket path.
        path: PathBuf,
    },
    /// Something other than a socket is at the socket's path.
    #[error("{path} exists and is not a socket; not replacing it")]
    NotASocket {
        /// Socket path.
        path: PathBuf,
    },
    /// The socket's folder is not safe to create files in.
    #[error(transparent)]
    Folder(#[from] crate::fsafe::FsError),
    /// Opening the lock, binding or setting up the socket failed.
    #[error("{path}: {source}")]
    Bind {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A request line that is not a request (JSON, known fields).
    #[error("bad request: {0}")]
    Malformed(#[source] serde_json::Error),
    /// A request line longer than [`MAX_REQUEST`].
    #[error("bad request: longer than {MAX_REQUEST} bytes")]
    TooLong,
    /// A request's duration is not a usable number of seconds.
    #[error("bad request: duration_s = {0:?}: want seconds in (0, 31536000] (at most 365 days)")]
    Duration(f64),
    /// A request's other field is out of range.
    #[error("bad request: {field} = {value:?}: want {want}")]
    Field {
        /// The field.
        field: &'static str,
        /// Its value.
        value: f64,
        /// Its range.
        want: &'static str,
    },
}

/// Longest request line read (a request is some 100 bytes): a client
/// cannot make the daemon buffer more.
pub const MAX_REQUEST: usize = 64 << 10;

/// A request line, parsed (unknown fields refused) and validated.
pub fn parse_request(line: &str) -> Result<Request, ControlError> {
    if line.len() > MAX_REQUEST {
        return Err(ControlError::TooLong);
    }
    let req: Request = serde_json::from_str(line).map_err(ControlError::Malformed)?;
    req.validate()?;
    Ok(req)
}

/// What `flamewatch trigger` asks for.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
    /// Also write the profile as pprof (the daemon's formats may not).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pprof: bool,
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

    /// Checks every field of the request (the daemon only ever sees usable
    /// values).
    pub fn validate(&self) -> Result<(), ControlError> {
        self.duration()?;
        let check = |field, value: Option<f64>, lo: f64, hi: f64, want| match value {
            Some(v) if !(v.is_finite() && v >= lo && v <= hi) => Err(ControlError::Field {
                field,
                value: v,
                want,
            }),
            _ => Ok(()),
        };
        check("since_s", self.since_s, 1.0, 86_400.0, "seconds in [1, 86400]")?;
        check("wait_s", self.wait_s, 0.0, 300.0, "seconds in [0, 300]")?;
        check(
            "freq_hz",
            self.freq_hz.map(|f| f as f64),
            1.0,
            crate::config::MAX_FREQ_HZ as f64,
            "a rate in [1, 100000] Hz",
        )
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
    /// The target's latest healthy baseline (folded) when the profile was
    /// taken, if it has one: what a differential compares against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<String>,
}

/// A request and where to send its reply.
pub type Incoming = (Request, oneshot::Sender<Reply>);

impl ControlError {
    /// Whether this is the user's to fix (exit status 2): another daemon,
    /// or a path or folder that cannot be used.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            Self::Locked { .. } | Self::NotASocket { .. } | Self::Folder(_)
        )
    }
}

/// The lock file beside `socket`: `<socket>.lock`.
pub fn lock_path(socket: &Path) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// What a bound socket holds until it is dropped: the lock, and the
/// identity of the socket file to remove (only that one) on the way out.
#[derive(Debug)]
struct Bound {
    path: PathBuf,
    dev: u64,
    ino: u64,
    /// Released after the socket is removed (fields drop after `drop`).
    _lock: File,
}

impl Drop for Bound {
    fn drop(&mut self) {
        // A socket someone bound after ours was removed is theirs.
        let ours =
            std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.dev() == self.dev && m.ino() == self.ino);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The daemon's control socket, bound and locked, not yet served.
#[derive(Debug)]
pub struct Listener {
    listener: std::os::unix::net::UnixListener,
    bound: Bound,
}

impl Listener {
    /// Takes `<path>.lock` and binds the socket at `path` (mode 0600),
    /// replacing a dead daemon's socket. Refused with
    /// [`ControlError::Locked`] while another daemon runs on `path`.
    pub fn bind(path: &Path) -> Result<Self, ControlError> {
        let err = |p: &Path| {
            let p = p.to_owned();
            move |source| ControlError::Bind { path: p, source }
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::fsafe::create_dir(dir)?;
        }
        let lock_file = lock_path(path);
        let lock = crate::fsafe::open_lock(&lock_file).map_err(err(&lock_file))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(ControlError::Locked {
                    path: path.to_owned(),
                })
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(err(&lock_file)(e)),
        }
        remove_stale(path)?;
        let listener = std::os::unix::net::UnixListener::bind(path).map_err(err(path))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err(path))?;
        let meta = std::fs::symlink_metadata(path).map_err(err(path))?;
        listener.set_nonblocking(true).map_err(err(path))?;
        Ok(Self {
            listener,
            bound: Bound {
                path: path.to_owned(),
                dev: meta.dev(),
                ino: meta.ino(),
                _lock: lock,
            },
        })
    }

    /// Serves the socket (on the current tokio runtime): requests come out
    /// of the returned [`Control`].
    pub fn serve(self) -> Result<Control, ControlError> {
        let listener = UnixListener::from_std(self.listener).map_err(|source| ControlError::Bind {
            path: self.bound.path.clone(),
            source,
        })?;
        let (tx, rx) = mpsc::channel(16);
        let task = tokio::spawn(accept_loop(listener, tx));
        Ok(Control {
            rx,
            task: task.abort_handle(),
            _bound: self.bound,
        })
    }
}

/// Holding the lock, whatever socket is at `path` belongs to a daemon that
/// died (or to an agent too old to take the lock, if it still answers).
fn remove_stale(path: &Path) -> Result<(), ControlError> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    let kind = meta.file_type();
    if kind.is_socket() && std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(ControlError::Locked {
            path: path.to_owned(),
        });
    }
    if !kind.is_socket() && !kind.is_symlink() {
        return Err(ControlError::NotASocket {
            path: path.to_owned(),
        });
    }
    // unlink: a planted link is removed, never followed.
    debug!("replacing the stale control socket {}", path.display());
    std::fs::remove_file(path).map_err(|source| ControlError::Bind {
        path: path.to_owned(),
        source,
    })
}

/// A served control socket: the daemon's requests. Dropping it stops
/// serving, removes the socket (if still ours) and releases the lock.
#[derive(Debug)]
pub struct Control {
    rx: mpsc::Receiver<Incoming>,
    task: tokio::task::AbortHandle,
    _bound: Bound,
}

impl Control {
    /// The next request, with where to send its reply.
    pub async fn recv(&mut self) -> Option<Incoming> {
        self.rx.recv().await
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: UnixListener, tx: mpsc::Sender<Incoming>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, say: wait rather than spin.
                debug!("control socket accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, tx).await {
                debug!("control connection: {e}");
            }
        });
    }
}

async fn handle(stream: UnixStream, tx: mpsc::Sender<Incoming>) -> std::io::Result<()> {
    // The file mode keeps others out; the credentials say so twice.
    if stream.peer_cred().map(|c| c.uid()).unwrap_or(u32::MAX) != 0 {
        warn!("control socket: refused a connection from a non-root user");
        return Ok(());
    }
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    // One byte past the limit tells a long line from a full one.
    BufReader::new(read.take(MAX_REQUEST as u64 + 1))
        .read_line(&mut line)
        .await?;
    let reply = match parse_request(&line) {
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
        // Checked here, so the daemon only ever sees a usable request.
        Err(e) => Reply {
            error: Some(e.to_string()),
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

    /// Test that request lines are parsed and validated in one place:
    /// unknown fields, wrong types, bad numbers and overlong lines are one
    /// error line each, and a good request passes.
    #[test]
    fn request_lines() {
        let ok = parse_request(r#"{"pid":1,"duration_s":5}"#).unwrap();
        assert_eq!(ok.pid, Some(1));
        let bad = [
            (r#"{"pid":1,"duration_s":5,"sped":1}"#, "unknown field `sped`"),
            (r#"{"pid":"one","duration_s":5}"#, "invalid type"),
            (r#"{"pid":1,"duration_s":-5}"#, "duration_s = -5"),
            (r#"{"pid":1,"duration_s":1e300}"#, "duration_s = 1e300"),
            (r#"{"pid":1,"duration_s":5,"freq_hz":0}"#, "freq_hz = 0"),
            (r#"{"pid":1,"duration_s":5,"since_s":1e9}"#, "since_s"),
            (r#"{"pid":1,"duration_s":5,"wait_s":-1}"#, "wait_s = -1"),
            ("not json", "bad request"),
            ("", "bad request"),
        ];
        for (line, want) in bad {
            let e = parse_request(line).expect_err(line).to_string();
            assert!(e.contains(want) && !e.contains('\n'), "{line}: {e}");
        }
        let long = format!(r#"{{"process":"{}","duration_s":5}}"#, "a".repeat(MAX_REQUEST));
        assert!(matches!(parse_request(&long), Err(ControlError::TooLong)));
    }

    /// Test that a request's duration is checked: a second at least, a year
    /// at most, and 1e300, infinity or NaN are errors naming the value.
    #[test]
    fn request_durations() {
        let req = |duration_s| Request {
            process: None,
            pid: Some(1),
            duration_s,
            since_s: None,
            freq_hz: None,
            wait_s: None,
            pprof: false,
        };
        assert_eq!(req(0.2).duration().unwrap(), Duration::from_secs(1));
        assert_eq!(req(30.0).duration().unwrap(), Duration::from_secs(30));
        for bad in [1e300, f64::INFINITY, f64::NAN, -3.0, 0.0, 4e7] {
            let err = req(bad).duration().unwrap_err().to_string();
            assert!(err.contains(&format!("duration_s = {bad:?}")), "{err}");
        }
    }

    /// Test that a second daemon on a socket is refused while the first
    /// serves it, and that the first removes its socket when dropped and
    /// lets the next one in.
    #[tokio::test]
    async fn second_daemon_is_locked_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let first = Listener::bind(&path).unwrap().serve().unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let err = Listener::bind(&path).unwrap_err();
        assert!(
            matches!(err, ControlError::Locked { .. }) && err.is_usage(),
            "{err}"
        );
        assert!(err.to_string().contains("c.sock.lock"), "{err}");
        assert!(path.exists(), "the refused daemon left the socket alone");
        drop(first);
        assert!(!path.exists(), "removed on the way out");
        assert!(
            lock_path(&path).exists(),
            "the lock file stays (unlinking it races)"
        );
        let _again = Listener::bind(&path).unwrap();
    }

    /// Test that a socket left by a killed daemon is replaced, and that a
    /// lock-less agent still answering on it is not.
    #[test]
    fn stale_socket_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        // Bound and closed: the file stays, nobody listens (Connection refused).
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(std::os::unix::net::UnixStream::connect(&path).is_err());
        let l = Listener::bind(&path).unwrap();
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
        drop(l);
        let alive = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let err = Listener::bind(&path).unwrap_err();
        assert!(matches!(err, ControlError::Locked { .. }), "{err}");
        drop(alive);
    }

    /// Test that a daemon removes only the socket it bound: one bound at the
    /// same path after its own was removed stays.
    #[test]
    fn removes_only_its_own_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let l = Listener::bind(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let _other = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(l);
        assert!(std::fs::symlink_metadata(&path).unwrap().file_type().is_socket());
    }

    /// Test that planted links are not followed: a symlink at the lock is
    /// refused, one at the socket is replaced, and a regular file at the
    /// socket's path is left alone with an error.
    #[test]
    fn planted_paths() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let path = dir.path().join("c.sock");
        std::os::unix::fs::symlink(&victim, lock_path(&path)).unwrap();
        let err = Listener::bind(&path).unwrap_err();
        assert!(
            matches!(&err, ControlError::Bind { source, .. } if source.raw_os_error() == Some(libc::ELOOP)),
            "{err}"
        );
        std::fs::remove_file(lock_path(&path)).unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        let l = Listener::bind(&path).unwrap();
        assert!(std::fs::symlink_metadata(&path).unwrap().file_type().is_socket());
        drop(l);
        std::fs::write(&path, "not a socket").unwrap();
        let err = Listener::bind(&path).unwrap_err();
        assert!(
            matches!(err, ControlError::NotASocket { .. }) && err.is_usage(),
            "{err}"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a socket");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    }

    /// Test a request/reply round trip over a socket only root may open.
    #[tokio::test]
    async fn round_trip() {
        if !crate::testutil::privileged("round_trip", "the daemon only answers root") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let mut rx = Listener::bind(&path).and_then(Listener::serve).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        tokio::spawn(async move {
            let (req, reply) = rx.recv().await.unwrap();
            assert_eq!(req.process.as_deref(), Some("logcaster"));
            let _ = reply.send(Reply {
                ok: true,
                files: vec!["a.svg".into()],
                ..Reply::default()
            });
        });
        let req = Request {
            process: Some("logcaster".into()),
            pid: None,
            duration_s: 1.0,
            since_s: None,
            freq_hz: None,
            wait_s: None,
            pprof: false,
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

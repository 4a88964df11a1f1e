//! One overhead budget per target, shared by every session on the machine.
//!
//! Each session that samples a target keeps a claim file,
//! `/run/flamewatch/budget/<target pid>/<agent pid>-<session>.json`, with the
//! overhead it currently costs that target (a daemon runs several sessions). A new session reads the others' claims:
//! it is refused when they already use the budget (or hold the maximum
//! number of sessions), and otherwise governs itself within what is left.
//! Claims of dead agents are ignored and removed; a claim is removed when its
//! session ends.
//!
//! A session checks the budget before it loads anything and can only claim
//! its share after calibrating, a second later. Two sessions starting
//! together would both see the whole budget, so a session holds the
//! registry's admission lock (`flock` on `.lock`) from its check until its
//! claim, with the overhead it predicts, is written.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Most sessions on one target at once (the source design's limit).
pub const MAX_SESSIONS: usize = 3;

/// Errors of the budget layer.
#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    /// Other sessions use the budget.
    #[error(
        "pid {target} is already profiled by flamewatch at {used:.1} % of its CPU ({sessions}); \
         the budget is {budget:.1} %, so another session would exceed it"
    )]
    NoRoom {
        /// Target pid.
        target: u32,
        /// Overhead already used, percent.
        used: f64,
        /// The budget, percent.
        budget: f64,
        /// Who uses it.
        sessions: String,
    },
    /// Too many sessions.
    #[error(
        "pid {target} already has {count} profiling sessions ({sessions}); at most {MAX_SESSIONS} at once"
    )]
    TooMany {
        /// Target pid.
        target: u32,
        /// Sessions found.
        count: usize,
        /// Who they are.
        sessions: String,
    },
}

/// What one agent claims of a target's budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClaimRecord {
    /// The agent's pid.
    pub agent_pid: u32,
    /// Its session id.
    pub session: String,
    /// Overhead it costs the target now, percent.
    pub pct: f64,
    /// Its sampling rate now.
    pub hz: u64,
}

/// The claims directory.
#[derive(Debug, Clone)]
pub struct Registry {
    dir: PathBuf,
}

/// The admission lock, held from checking the budget until claiming it;
/// released when dropped.
#[derive(Debug)]
pub struct Admission {
    _file: Option<std::fs::File>,
}

/// Longest wait for another session to finish starting. Starting takes about
/// a second; a session stuck longer must not stop every other one.
const ADMISSION_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Our claim on a target; removed when dropped.
#[derive(Debug)]
pub struct Claim {
    path: PathBuf,
    record: ClaimRecord,
}

impl Registry {
    /// The machine-wide registry.
    pub fn system() -> Self {
        Self::at("/run/flamewatch/budget")
    }

    /// A registry in another folder (tests).
    pub fn at(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// Waits until no other session (of any agent) is between its budget
    /// check and its claim, and holds that turn until the returned value is
    /// dropped. Without a usable registry folder, or after
    /// [`ADMISSION_WAIT`], it goes on unserialized rather than not at all.
    pub async fn admit(&self) -> Admission {
        let path = self.dir.join(".lock");
        let file = crate::fsafe::create_dir(&self.dir)
            .map_err(std::io::Error::other)
            .and_then(|()| crate::fsafe::open_lock(&path));
        let file = match file {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!("budget admission lock {}: {e}; not serialized", path.display());
                return Admission { _file: None };
            }
        };
        let deadline = tokio::time::Instant::now() + ADMISSION_WAIT;
        loop {
            match file.try_lock() {
                Ok(()) => return Admission { _file: Some(file) },
                Err(std::fs::TryLockError::WouldBlock) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(e) => {
                    tracing::warn!(
                        "budget admission lock {}: {e}; going on without it",
                        path.display()
                    );
                    return Admission { _file: None };
                }
            }
        }
    }

    fn target_dir(&self, target: u32) -> PathBuf {
        self.dir.join(target.to_string())
    }

    /// Live claims on `target` other than `mine`.
    pub fn others(&self, target: u32, mine: Option<&Claim>) -> Vec<ClaimRecord> {
        let Ok(entries) = std::fs::read_dir(self.target_dir(target)) else {
            return Vec::new();
        };
        let mut claims = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if mine.is_some_and(|c| c.path == path) {
                continue;
            }
            let Some(record) = read_claim(&path) else { continue };
            if !crate::target::is_alive(record.agent_pid) {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            claims.push(record);
        }
        claims.sort_by_key(|c| c.agent_pid);
        claims
    }

    /// The budget left on `target` for a session holding `mine` (or for a
    /// new one), or why there is none.
    pub fn available(&self, target: u32, budget_pct: f64, mine: Option<&Claim>) -> Result<f64, BudgetError> {
        let others = self.others(target, mine);
        let describe = || {
            others
                .iter()
                .map(|c| {
                    format!(
                        "session {} of agent pid {} at {:.2} %",
                        c.session, c.agent_pid, c.pct
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        if others.len() >= MAX_SESSIONS {
            return Err(BudgetError::TooMany {
                target,
                count: others.len(),
                sessions: describe(),
            });
        }
        let used: f64 = others.iter().map(|c| c.pct).sum();
        // Less than a tenth of the budget left is not enough to sample usefully.
        if budget_pct - used < 0.1 * budget_pct {
            return Err(BudgetError::NoRoom {
                target,
                used,
                budget: budget_pct,
                sessions: describe(),
            });
        }
        Ok(budget_pct - used)
    }

    /// Registers a claim of `session` on `target`, at `pct` (the overhead it
    /// predicts) until it measures its own.
    pub fn claim(&self, target: u32, session: &str, pct: f64, hz: u64) -> Claim {
        let dir = self.target_dir(target);
        if let Err(e) = crate::fsafe::create_dir(&dir) {
            tracing::warn!("budget claims: {e}");
        }
        let me = std::process::id();
        let record = ClaimRecord {
            agent_pid: me,
            session: session.to_owned(),
            pct,
            hz,
        };
        let file: String = session
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let claim = Claim {
            path: dir.join(format!("{me}-{file}.json")),
            record,
        };
        claim.write();
        claim
    }
}

fn read_claim(path: &Path) -> Option<ClaimRecord> {
    serde_json::from_str(&crate::fsafe::read_nofollow(path).ok()?).ok()
}

impl Claim {
    fn write(&self) {
        if let Ok(bytes) = serde_json::to_vec(&self.record) {
            let _ = crate::render::write_file(&self.path, &bytes);
        }
    }

    /// Publishes our current cost and rate.
    pub fn update(&mut self, pct: f64, hz: u64) {
        if self.record.pct != pct || self.record.hz != hz {
            self.record.pct = pct;
            self.record.hz = hz;
            self.write();
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        // Remove the target's folder once it is empty.
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_other(reg: &Registry, target: u32, agent_pid: u32, pct: f64) {
        let dir = reg.target_dir(target);
        std::fs::create_dir_all(&dir).unwrap();
        let rec = ClaimRecord {
            agent_pid,
            session: format!("s{agent_pid}"),
            pct,
            hz: 99,
        };
        std::fs::write(
            dir.join(format!("{agent_pid}.json")),
            serde_json::to_vec(&rec).unwrap(),
        )
        .unwrap();
    }

    /// Test that live claims of others reduce the budget and dead ones are dropped.
    #[test]
    fn shares_budget() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::at(dir.path());
        assert_eq!(reg.available(42, 5.0, None).unwrap(), 5.0);
        write_other(&reg, 42, 1, 2.0); // pid 1 (init) is alive
        write_other(&reg, 42, 4_194_309, 3.0); // no such pid: stale
        assert!((reg.available(42, 5.0, None).unwrap() - 3.0).abs() < 1e-9);
        assert!(
            !reg.target_dir(42).join("4194309.json").exists(),
            "stale claim removed"
        );
    }

    /// Test that a full budget refuses a new session with a clear message.
    #[test]
    fn refuses_when_full() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::at(dir.path());
        write_other(&reg, 42, 1, 4.8);
        let err = reg.available(42, 5.0, None).unwrap_err();
        assert!(err.to_string().contains("already profiled"), "{err}");
    }

    /// Test that a fourth session is refused.
    #[test]
    fn refuses_fourth_session() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::at(dir.path());
        // Three live agents: init, and two kernel threads stand in for live pids.
        for pid in [1, 2, 3] {
            write_other(&reg, 42, pid, 0.1);
        }
        let err = reg.available(42, 5.0, None).unwrap_err();
        assert!(matches!(err, BudgetError::TooMany { count: 3, .. }), "{err}");
    }

    /// Test that a session starting while another is between its budget
    /// check and its claim waits for that claim, and so sees it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn admission_serializes_check_and_claim() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::at(dir.path());
        let first = reg.admit().await;
        assert_eq!(reg.available(9, 5.0, None).unwrap(), 5.0);
        let second = {
            let reg = reg.clone();
            tokio::spawn(async move {
                let _turn = reg.admit().await;
                reg.available(9, 5.0, None).unwrap()
            })
        };
        // The second one is still waiting while the first calibrates.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(
            !second.is_finished(),
            "admitted while another session was starting"
        );
        let claim = reg.claim(9, "first", 3.0, 99);
        drop(first);
        let left = second.await.unwrap();
        assert!((left - 2.0).abs() < 1e-9, "the second session saw {left} % left");
        drop(claim);
    }

    /// Test that our claim is published and removed with the session.
    #[test]
    fn claim_lifecycle() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::at(dir.path());
        let mut claim = reg.claim(7, "on-demand_x", 0.2, 99);
        assert!((reg.available(7, 5.0, None).unwrap() - 4.8).abs() < 1e-9);
        claim.update(0.5, 99);
        let path = reg
            .target_dir(7)
            .join(format!("{}-on-demand_x.json", std::process::id()));
        assert_eq!(read_claim(&path).unwrap().pct, 0.5);
        assert!(
            reg.others(7, Some(&claim)).is_empty(),
            "a session's own claim is not another's"
        );
        // Another session of the same agent sees it, and shares the budget.
        assert_eq!(reg.others(7, None).len(), 1);
        assert!((reg.available(7, 5.0, None).unwrap() - 4.5).abs() < 1e-9);
        drop(claim);
        assert!(!path.exists());
        assert!(!reg.target_dir(7).exists());
    }
}

//! Root-safe files end to end: symlinks planted at every name the agent
//! writes are replaced, never written through, and folders others can
//! write to (without the sticky bit) are refused.

use std::{
    os::unix::fs::{symlink, MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use flamewatch_e2e::*;

fn hotpaths() -> TestProcess {
    let mut cmd = Command::new(target_bin("hotpaths-fp"));
    cmd.args(["--ratio", "1:1"]);
    TestProcess::spawn_ready(cmd)
}

/// `20261122T031500Z` of `t` (UTC), as the agent stamps its file names.
fn compact_utc(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// A file outside the output folder, and what it holds and its inode
/// times: what a symlink planted in the folder points at.
struct Victim {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Victim {
    fn new() -> Self {
        let dir = output_dir();
        let path = dir.path().join("victim");
        std::fs::write(&path, "precious\n").unwrap();
        Self { _dir: dir, path }
    }

    fn assert_untouched(&self) {
        let meta = std::fs::metadata(&self.path).unwrap();
        assert_eq!(std::fs::read_to_string(&self.path).unwrap(), "precious\n");
        assert_eq!(meta.len(), 9);
        assert_eq!(meta.nlink(), 1, "no hard link made to it");
    }
}

/// Plants links to `victim` at `names` in `dir`.
fn plant(dir: &Path, victim: &Path, names: &[String]) {
    for name in names {
        symlink(victim, dir.join(name)).unwrap();
    }
}

/// The report names a session of `label` on `pid` would use when starting
/// within `secs` seconds from now, plus their old `.tmp` names.
fn report_names(label: &str, pid: u32, secs: u64) -> Vec<String> {
    let now = SystemTime::now();
    let mut names = vec!["index.html".to_owned(), "index.html.tmp".to_owned()];
    for s in 0..secs {
        let stem = format!("{label}-{pid}-{}", compact_utc(now + Duration::from_secs(s)));
        for ext in ["svg", "folded", "json", "pb.gz"] {
            names.push(format!("{stem}.{ext}"));
            names.push(format!("{stem}.{ext}.tmp"));
        }
    }
    names
}

/// Test that `record` into a folder where every file name it will use
/// (reports, their old temporary names, the index) is a symlink to a file
/// outside the folder writes its reports as regular files in the folder
/// and leaves that file untouched.
#[test]
fn record_replaces_planted_symlinks() {
    if !privileged("record_replaces_planted_symlinks") {
        return;
    }
    let target = hotpaths();
    let victim = Victim::new();
    let out = output_dir();
    let names = report_names("planted", target.pid(), 20);
    plant(out.path(), &victim.path, &names);
    let pid = target.pid().to_string();
    let run = flamewatch(&[
        "record",
        "--pid",
        &pid,
        "--duration",
        "2s",
        "--label",
        "planted",
        "--format",
        "svg,folded,json,pprof",
        "--output",
        out.path().to_str().unwrap(),
    ]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    victim.assert_untouched();
    let printed: Vec<PathBuf> = String::from_utf8_lossy(&run.stdout)
        .lines()
        .map(PathBuf::from)
        .collect();
    assert_eq!(printed.len(), 4, "{printed:?}");
    for path in &printed {
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        assert!(names.contains(&name), "{name} was planted beforehand");
    }
    for path in printed.iter().chain([&out.path().join("index.html")]) {
        let meta = std::fs::symlink_metadata(path).unwrap();
        assert!(meta.is_file(), "{} is a regular file", path.display());
        assert_eq!(meta.mode() & 0o777, 0o644, "{}", path.display());
        assert!(meta.len() > 0 && std::fs::read_to_string(path).map_or(true, |t| t != "precious\n"));
    }
    // No temporary file is left behind.
    let left: Vec<String> = std::fs::read_dir(out.path())
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().into_string().ok())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Test that the daemon does not append alerts through a symlink planted
/// at alerts.jsonl (the record is lost and logged, the file outside the
/// folder untouched).
#[test]
fn watch_does_not_append_through_symlinks() {
    if !privileged("watch_does_not_append_through_symlinks") {
        return;
    }
    let victim = Victim::new();
    let out = output_dir();
    plant(out.path(), &victim.path, &["alerts.jsonl".to_owned()]);
    // A target that exits at once: the daemon writes a target_gone record.
    let mut short = Command::new("sleep").arg("3").spawn().unwrap();
    let pid = short.id().to_string();
    let logs = output_dir();
    let log = logs.path().join("watch.log");
    let mut cmd = Command::new(flamewatch_bin());
    cmd.args(["watch", "--pid", &pid, "--metrics-addr", "off", "--output"])
        .arg(out.path())
        .arg("--control-socket")
        .arg(out.path().join("control.sock"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let daemon = TestProcess::spawn(cmd);
    let _ = short.wait();
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    let logged = wait_until(Duration::from_secs(15), || {
        text().contains("alerts.jsonl") && text().contains("symbolic links")
    });
    daemon.signal(libc::SIGINT);
    assert!(daemon.wait_with_timeout(Duration::from_secs(20)).is_some());
    assert!(logged, "the refused append is logged: {}", text());
    victim.assert_untouched();
    assert!(std::fs::symlink_metadata(out.path().join("alerts.jsonl"))
        .unwrap()
        .is_symlink());
}

/// Test that `record` and `watch` refuse (exit 2, one line) an output
/// folder others can write to without the sticky bit, or one inside such a
/// folder, and write into a sticky one (as /tmp is).
#[test]
fn world_writable_folders_are_refused() {
    if !privileged("world_writable_folders_are_refused") {
        return;
    }
    let target = hotpaths();
    let pid = target.pid().to_string();
    let base = output_dir();
    let open = base.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    for dir in [open.clone(), open.join("inner")] {
        let run = flamewatch(&[
            "record",
            "--pid",
            &pid,
            "--duration",
            "1s",
            "--output",
            dir.to_str().unwrap(),
        ]);
        let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
        assert_eq!(run.status.code(), Some(2), "{stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("flamewatch:")).collect();
        assert_eq!(lines.len(), 1, "{stderr}");
        assert!(
            lines[0].contains("refusing to write") && lines[0].contains("sticky"),
            "{stderr}"
        );
        assert!(!dir.join("index.html").exists());
        let watch = flamewatch(&[
            "watch",
            "--pid",
            &pid,
            "--metrics-addr",
            "off",
            "--output",
            dir.to_str().unwrap(),
        ]);
        assert_eq!(
            watch.status.code(),
            Some(2),
            "{}",
            String::from_utf8_lossy(&watch.stderr)
        );
    }
    // Sticky, as /tmp: others cannot replace root's files there.
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let run = flamewatch(&[
        "record",
        "--pid",
        &pid,
        "--duration",
        "1s",
        "--output",
        open.to_str().unwrap(),
    ]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(open.join("index.html").is_file());
    // A folder the agent creates is 0755.
    let made = base.path().join("made/here");
    let run = flamewatch(&[
        "record",
        "--pid",
        &pid,
        "--duration",
        "1s",
        "--output",
        made.to_str().unwrap(),
    ]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    for d in [&made, &base.path().join("made")] {
        assert_eq!(
            std::fs::metadata(d).unwrap().mode() & 0o7777,
            0o755,
            "{}",
            d.display()
        );
    }
}

/// Test that the bad durations that used to panic are one-line usage
/// errors naming the value: `record --duration 1e20` and a watch config
/// with `interval = "0s"`.
#[test]
fn endless_and_zero_durations_are_usage_errors() {
    let dir = output_dir();
    let run = flamewatch(&["record", "--pid", "1", "--duration", "1e20"]);
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    assert_eq!(run.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("1e20"), "{stderr}");
    let config = dir.path().join("c.toml");
    std::fs::write(&config, "interval = \"0s\"\n").unwrap();
    let run = flamewatch(&["watch", "--pid", "1", "--config", config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    assert_eq!(run.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("interval") && stderr.contains("0s"), "{stderr}");
}

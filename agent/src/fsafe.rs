//! Files and folders written safely as root.
//!
//! The agent runs as root and writes into folders other users may be able
//! to reach (`/tmp/…`, a shared output folder). Nothing it writes follows a
//! symlink planted at a predictable name:
//!
//! - whole files are written to a temporary file created with `O_EXCL`
//!   under a random name in the destination folder (the `tempfile` crate),
//!   then renamed over the destination: a rename replaces a symlink, it
//!   never writes through it;
//! - appends and lock files are opened with `O_NOFOLLOW`;
//! - folders the agent creates are mode 0755 (owned by root, who runs it);
//! - it refuses to write into a folder others can write to unless it has
//!   the sticky bit (as `/tmp`), where nobody can rename or delete another
//!   user's files; the folder's ancestors are checked too, since whoever
//!   can rename a folder can put a symlink in its place.

use std::{
    fs::{File, OpenOptions},
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

/// Mode of the folders the agent creates.
pub const DIR_MODE: u32 = 0o755;
/// Mode of the reports and other files the agent writes (readable by a web
/// server or a non-root engineer, as before).
pub const FILE_MODE: u32 = 0o644;

/// Errors of safe file handling.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// A folder others can write to, without the sticky bit.
    #[error(
        "refusing to write into {path}: {dir} is writable by other users (mode {mode:04o}) \
         and has no sticky bit; use a folder only root can write to, or a sticky one like /tmp"
    )]
    Unsafe {
        /// The folder asked for.
        path: PathBuf,
        /// The unsafe folder (it or an ancestor).
        dir: PathBuf,
        /// Its mode.
        mode: u32,
    },
    /// A file system call failed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

impl FsError {
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// Creates `dir` (and missing parents) with mode 0755, and checks that it is
/// safe to write into ([`check_dir`]).
pub fn create_dir(dir: &Path) -> Result<(), FsError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(FsError::io(dir))?;
    check_dir(dir)
}

/// Refuses `dir` when it, or one of its ancestors, is writable by others
/// (`o+w`) and has no sticky bit.
pub fn check_dir(dir: &Path) -> Result<(), FsError> {
    let real = std::fs::canonicalize(dir).map_err(FsError::io(dir))?;
    for d in real.ancestors() {
        let meta = std::fs::metadata(d).map_err(FsError::io(d))?;
        let mode = meta.mode() & 0o7777;
        if unsafe_mode(mode) {
            return Err(FsError::Unsafe {
                path: dir.to_owned(),
                dir: d.to_owned(),
                mode,
            });
        }
    }
    Ok(())
}

/// Writable by others and not sticky.
fn unsafe_mode(mode: u32) -> bool {
    mode & 0o002 != 0 && mode & 0o1000 == 0
}

/// Writes `bytes` to `path` atomically and without following links: a
/// temporary file created with `O_EXCL` under a random name beside it, then
/// renamed over it. A reader never sees half a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    // Hidden, and ending in `.tmp`: never taken for a report.
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .permissions(std::fs::Permissions::from_mode(FILE_MODE))
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Opens `path` for appending, creating it (mode 0644) when missing; a
/// symlink there is an error (`O_NOFOLLOW`), not followed.
pub fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Opens (creating, mode 0600) a lock file without following a symlink.
pub fn open_lock(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Reads `path` as text, refusing a symlink (`O_NOFOLLOW`).
pub fn read_nofollow(path: &Path) -> std::io::Result<String> {
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)?,
        &mut text,
    )?;
    Ok(text)
}

/// The last `max` bytes of `path` as text (whole lines: a line cut at the
/// start is dropped), refusing a symlink. Bounds what a scan of a large
/// append-only file (alerts.jsonl) reads.
pub fn read_tail(path: &Path, max: u64) -> std::io::Result<String> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    let len = f.metadata()?.len();
    let start = len.saturating_sub(max);
    // One byte before the window: whether the window starts a line.
    f.seek(SeekFrom::Start(start.saturating_sub(1)))?;
    let mut bytes = Vec::with_capacity((len - start.saturating_sub(1)) as usize);
    f.take(max + 1).read_to_end(&mut bytes)?;
    let text = if start == 0 {
        &bytes[..]
    } else {
        // Skip to the first line that starts inside the window.
        let cut = bytes
            .iter()
            .position(|&b| b == b'\n')
            .map_or(bytes.len(), |i| i + 1);
        &bytes[cut..]
    };
    Ok(String::from_utf8_lossy(text).into_owned())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    /// Test that an atomic write through a planted symlink replaces the
    /// link and leaves its target alone, with mode 0644 and no temp file left.
    #[test]
    fn write_replaces_a_planted_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let path = out.join("index.html");
        symlink(&victim, &path).unwrap();
        symlink(&victim, out.join("index.html.tmp")).unwrap();
        write_atomic(&path, b"report").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert!(!std::fs::symlink_metadata(&path).unwrap().is_symlink());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "report");
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, FILE_MODE);
        let names: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    /// Test that appends and lock files refuse a symlink.
    #[test]
    fn appends_refuse_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let link = dir.path().join("alerts.jsonl");
        symlink(&victim, &link).unwrap();
        assert_eq!(open_append(&link).unwrap_err().raw_os_error(), Some(libc::ELOOP));
        assert_eq!(open_lock(&link).unwrap_err().raw_os_error(), Some(libc::ELOOP));
        assert!(read_nofollow(&link).is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        let real = dir.path().join("real.jsonl");
        open_append(&real).unwrap().write_all(b"a\n").unwrap();
        open_append(&real).unwrap().write_all(b"b\n").unwrap();
        assert_eq!(read_nofollow(&real).unwrap(), "a\nb\n");
    }

    /// Test that the tail of a file is whole lines within the bound.
    #[test]
    fn tails_are_whole_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        std::fs::write(&path, "one\ntwo\nthree\n").unwrap();
        assert_eq!(read_tail(&path, 100).unwrap(), "one\ntwo\nthree\n");
        assert_eq!(read_tail(&path, 14).unwrap(), "one\ntwo\nthree\n");
        assert_eq!(read_tail(&path, 10).unwrap(), "two\nthree\n");
        assert_eq!(read_tail(&path, 9).unwrap(), "three\n");
        assert_eq!(read_tail(&path, 7).unwrap(), "three\n");
        assert_eq!(read_tail(&path, 5).unwrap(), "");
    }

    /// Test that a folder others can write to is refused unless sticky, that
    /// an unsafe ancestor is refused too, and that created folders are 0755.
    #[test]
    fn folder_checks() {
        let dir = tempfile::tempdir().unwrap();
        let created = dir.path().join("a/b");
        create_dir(&created).unwrap();
        for d in [&created, &dir.path().join("a")] {
            assert_eq!(std::fs::metadata(d).unwrap().mode() & 0o7777, DIR_MODE);
        }
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = create_dir(&open).unwrap_err();
        assert!(matches!(err, FsError::Unsafe { mode: 0o777, .. }), "{err}");
        assert!(!err.to_string().contains('\n'));
        let err = create_dir(&open.join("inner")).unwrap_err();
        assert!(
            matches!(&err, FsError::Unsafe { dir, .. } if *dir == open),
            "{err}"
        );
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        create_dir(&open).unwrap();
        create_dir(&open.join("inner")).unwrap();
        assert!(unsafe_mode(0o777) && unsafe_mode(0o2757));
        assert!(!unsafe_mode(0o1777) && !unsafe_mode(0o775) && !unsafe_mode(0o755));
    }
}

//! Symbolization with blazesym.
//!
//! User addresses are turned into (file, file offset) with mappings captured
//! from /proc/PID/maps while the target lives (at start, and again whenever
//! its maps change), so a target that exits mid-session is still symbolized.
//! Kernel addresses are looked up in kallsyms. A frame that cannot be
//! symbolized becomes `module+0xoffset` or `[unknown]`: data, never an error.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs::{self, File},
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::PathBuf,
    sync::Arc,
};

use blazesym::symbolize::{
    source::{Elf, Kernel, Source},
    Input, Symbolized, Symbolizer,
};
use blazesym::MaybeDefault;
use tracing::debug;

use crate::aggregate::{FrameName, RawProfile, Symbols};

/// A file mapped executable by a target.
#[derive(Debug)]
pub struct ModuleFile {
    /// Path as the target sees it (from its maps).
    pub path: PathBuf,
    /// Path blazesym opens: the same path when it is still that file, or our
    /// own descriptor of it (deleted or replaced since it was mapped, or in
    /// another mount namespace).
    open_path: PathBuf,
    /// Keeps `open_path` valid when it is one of our descriptors.
    _keep: Option<File>,
}

impl ModuleFile {
    /// Short name for frames: the file name.
    pub fn short_name(&self) -> String {
        self.path.file_name().map_or_else(
            || self.path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        )
    }
}

/// What an executable mapping holds.
#[derive(Debug, Clone)]
pub enum MappingKind {
    /// A file (executable or library).
    File(Arc<ModuleFile>),
    /// The vDSO.
    Vdso,
    /// Anonymous executable memory (JIT code) or a pseudo-file.
    Other(String),
}

/// One executable mapping of a process.
#[derive(Debug, Clone)]
pub struct Mapping {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// File offset of `start`.
    pub offset: u64,
    /// Its contents.
    pub kind: MappingKind,
}

/// Captured executable mappings of the targets, kept after they exit.
#[derive(Debug, Default)]
pub struct MapsCache {
    by_pid: HashMap<u32, Vec<Mapping>>,
    last_text: HashMap<u32, String>,
    files: HashMap<(u64, u64), Arc<ModuleFile>>,
}

/// One parsed line of /proc/PID/maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapsLine {
    /// Start address.
    pub start: u64,
    /// End address.
    pub end: u64,
    /// Permissions, e.g. `r-xp`.
    pub perms: String,
    /// File offset.
    pub offset: u64,
    /// Inode (0 for anonymous).
    pub inode: u64,
    /// Path or pseudo-name (`[vdso]`), empty when anonymous.
    pub path: String,
}

/// Parses the text of /proc/PID/maps.
pub fn parse_maps(text: &str) -> Vec<MapsLine> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(6, char::is_whitespace);
            let range = parts.next()?;
            let perms = parts.next()?.to_owned();
            let offset = u64::from_str_radix(parts.next()?, 16).ok()?;
            let _dev = parts.next()?;
            let inode = parts.next()?.parse().ok()?;
            let path = parts.next().unwrap_or("").trim().to_owned();
            let (start, end) = range.split_once('-')?;
            Some(MapsLine {
                start: u64::from_str_radix(start, 16).ok()?,
                end: u64::from_str_radix(end, 16).ok()?,
                perms,
                offset,
                inode,
                path,
            })
        })
        .collect()
}

impl MapsCache {
    /// Reads the executable mappings of `pid` if they changed since the last
    /// capture. Returns whether anything new was recorded. Fails only when
    /// the process is gone (its earlier capture stays).
    pub fn capture(&mut self, pid: u32) -> std::io::Result<bool> {
        let text = fs::read_to_string(format!("/proc/{pid}/maps"))?;
        Ok(self.capture_text(pid, text))
    }

    /// Records the executable mappings listed in `text` (the contents of
    /// /proc/PID/maps) unless it is what was last recorded.
    fn capture_text(&mut self, pid: u32, text: String) -> bool {
        if self.last_text.get(&pid) == Some(&text) {
            return false;
        }
        let mut fresh = Vec::new();
        for line in parse_maps(&text) {
            if !line.perms.contains('x') {
                continue;
            }
            let kind = if line.path == "[vdso]" {
                MappingKind::Vdso
            } else if line.path.starts_with('/') && line.inode != 0 {
                match self.module_file(pid, &line) {
                    Some(file) => MappingKind::File(file),
                    None => {
                        debug!(pid, path = %line.path, "mapped file not readable");
                        MappingKind::Other(line.path.clone())
                    }
                }
            } else if line.path.is_empty() {
                MappingKind::Other("[anon]".to_owned())
            } else {
                MappingKind::Other(line.path.clone())
            };
            fresh.push(Mapping {
                start: line.start,
                end: line.end,
                offset: line.offset,
                kind,
            });
        }
        let entry = self.by_pid.entry(pid).or_default();
        // Newer mappings replace the ranges they overlap; older ones that
        // were unmapped stay, for samples taken before.
        entry.retain(|old| !fresh.iter().any(|m| m.start < old.end && old.start < m.end));
        entry.extend(fresh);
        entry.sort_by_key(|m| m.start);
        self.last_text.insert(pid, text);
        true
    }

    fn module_file(&mut self, pid: u32, line: &MapsLine) -> Option<Arc<ModuleFile>> {
        let path = PathBuf::from(&line.path);
        // Same inode at the same path from our mount namespace: use the path
        // (lets blazesym find split debug info next to it).
        let same = fs::metadata(&path).is_ok_and(|m| m.ino() == line.inode);
        let (open_path, keep, dev) = if same {
            let dev = fs::metadata(&path).map(|m| m.dev()).unwrap_or(0);
            (path.clone(), None, dev)
        } else {
            let via = format!("/proc/{pid}/map_files/{:x}-{:x}", line.start, line.end);
            let file = File::open(&via).ok()?;
            let dev = file.metadata().map(|m| m.dev()).unwrap_or(0);
            let open = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
            (open, Some(file), dev)
        };
        let key = (dev, line.inode);
        if let Some(file) = self.files.get(&key) {
            return Some(file.clone());
        }
        let file = Arc::new(ModuleFile {
            path,
            open_path,
            _keep: keep,
        });
        self.files.insert(key, file.clone());
        Some(file)
    }

    /// The mapping holding `addr` in `pid`.
    pub fn lookup(&self, pid: u32, addr: u64) -> Option<&Mapping> {
        let maps = self.by_pid.get(&pid)?;
        let i = maps.partition_point(|m| m.start <= addr);
        maps.get(i.checked_sub(1)?).filter(|m| addr < m.end)
    }
}

/// The address to look up for a stack entry: return addresses point after
/// the call, so look at the call itself.
fn lookup_addr(ip: u64, is_leaf: bool) -> u64 {
    if is_leaf {
        ip
    } else {
        ip.saturating_sub(1)
    }
}

/// Symbols of every address of a raw profile, looked up in batches.
#[derive(Debug, Default)]
pub struct SymbolTable {
    user: HashMap<(u32, u64), Arc<[FrameName]>>,
    kernel: HashMap<u64, Arc<[FrameName]>>,
}

impl Symbols for SymbolTable {
    fn user(&self, tgid: u32, ip: u64, is_leaf: bool) -> Vec<FrameName> {
        self.user
            .get(&(tgid, lookup_addr(ip, is_leaf)))
            .map_or_else(|| vec![FrameName::from("[unknown]")], |f| f.to_vec())
    }

    fn kernel(&self, ip: u64, is_leaf: bool) -> Vec<FrameName> {
        self.kernel
            .get(&lookup_addr(ip, is_leaf))
            .map_or_else(|| vec![FrameName::from("[unknown]_[k]")], |f| f.to_vec())
    }
}

fn frames_of(sym: &Symbolized<'_>) -> Option<Vec<FrameName>> {
    match sym {
        Symbolized::Sym(sym) => {
            let mut frames = vec![FrameName::from(sym.name.as_ref())];
            frames.extend(sym.inlined.iter().map(|f| FrameName::from(f.name.as_ref())));
            Some(frames)
        }
        Symbolized::Unknown(_) => None,
    }
}

/// A file and the (address, file offset) pairs to look up in it.
type FileBatch = (Arc<ModuleFile>, Vec<(u64, u64)>);

/// Looks up every address of `raw` (for the processes in `pids`).
pub fn symbolize(raw: &RawProfile, maps: &MapsCache, pids: &[u32]) -> SymbolTable {
    let mut user: HashMap<u32, HashSet<u64>> = HashMap::new();
    let mut kernel: HashSet<u64> = HashSet::new();
    for key in raw.samples.keys().filter(|k| pids.contains(&k.tgid)) {
        let in_kernel = key.kernel.has_frames();
        if let Some(ips) = key.user.ips() {
            let set = user.entry(key.tgid).or_default();
            for (i, &ip) in ips.iter().enumerate() {
                set.insert(lookup_addr(ip, i == 0 && !in_kernel));
            }
        }
        if let Some(ips) = key.kernel.ips() {
            for (i, &ip) in ips.iter().enumerate() {
                kernel.insert(lookup_addr(ip, i == 0));
            }
        }
    }

    let symbolizer = Symbolizer::builder().enable_code_info(false).build();
    let mut table = SymbolTable::default();

    for (tgid, addrs) in user {
        // Group by mapped file so each file is opened and searched once.
        let mut by_file: BTreeMap<*const ModuleFile, FileBatch> = BTreeMap::new();
        for addr in addrs {
            let frames: Arc<[FrameName]> = match maps.lookup(tgid, addr) {
                Some(Mapping {
                    kind: MappingKind::File(file),
                    start,
                    offset,
                    ..
                }) => {
                    let file_offset = addr - start + offset;
                    by_file
                        .entry(Arc::as_ptr(file))
                        .or_insert_with(|| (file.clone(), Vec::new()))
                        .1
                        .push((addr, file_offset));
                    continue;
                }
                Some(Mapping {
                    kind: MappingKind::Vdso,
                    ..
                }) => [FrameName::from("[vdso]")].into(),
                Some(Mapping {
                    kind: MappingKind::Other(name),
                    ..
                }) => [FrameName::from(format!("[unknown] {name}"))].into(),
                None => [FrameName::from("[unknown]")].into(),
            };
            table.user.insert((tgid, addr), frames);
        }
        for (_, (file, entries)) in by_file {
            let offsets: Vec<u64> = entries.iter().map(|&(_, off)| off).collect();
            let src = Source::Elf(Elf::new(&file.open_path));
            let results = symbolizer
                .symbolize(&src, Input::FileOffset(&offsets))
                .unwrap_or_else(|e| {
                    debug!(path = %file.path.display(), "symbolization failed: {e}");
                    Vec::new()
                });
            let short = file.short_name();
            for (i, &(addr, off)) in entries.iter().enumerate() {
                let frames = results
                    .get(i)
                    .and_then(frames_of)
                    .unwrap_or_else(|| vec![FrameName::from(format!("{short}+{off:#x}"))]);
                table.user.insert((tgid, addr), frames.into());
            }
        }
    }

    if !kernel.is_empty() {
        let addrs: Vec<u64> = kernel.into_iter().collect();
        let src = Source::Kernel(Kernel {
            // kallsyms is enough for function names; searching for a vmlinux
            // with DWARF would cost seconds for nothing here.
            vmlinux: MaybeDefault::None,
            debug_syms: false,
            ..Kernel::default()
        });
        let results = symbolizer
            .symbolize(&src, Input::AbsAddr(&addrs))
            .unwrap_or_else(|e| {
                debug!("kernel symbolization failed: {e}");
                Vec::new()
            });
        for (i, &addr) in addrs.iter().enumerate() {
            let frames: Vec<FrameName> = results
                .get(i)
                .and_then(frames_of)
                .map(|f| {
                    f.into_iter()
                        .map(|n| FrameName::from(format!("{n}_[k]")))
                        .collect()
                })
                .unwrap_or_else(|| vec![FrameName::from("[unknown]_[k]")]);
            table.kernel.insert(addr, frames.into());
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::StackSlot;

    /// Test that maps lines parse, including paths with spaces and anonymous maps.
    #[test]
    fn parse_maps_lines() {
        let text = "\
55d0c0a00000-55d0c0a01000 r--p 00000000 fd:01 1234                       /usr/bin/my app
55d0c0a01000-55d0c0a02000 r-xp 00001000 fd:01 1234                       /usr/bin/my app
7ffd1b1f0000-7ffd1b1f2000 r-xp 00000000 00:00 0                          [vdso]
7f0000000000-7f0000001000 rwxp 00000000 00:00 0 
";
        let lines = parse_maps(text);
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[1].path, "/usr/bin/my app");
        assert_eq!(lines[1].offset, 0x1000);
        assert_eq!(lines[1].inode, 1234);
        assert_eq!(lines[2].path, "[vdso]");
        assert_eq!(lines[3].path, "");
    }

    /// Test that unchanged maps are not processed again, and that a new
    /// mapping replaces the older one it overlaps while others stay.
    #[test]
    fn capture_keeps_history() {
        let mut maps = MapsCache::default();
        let a = "1000-2000 r-xp 00000000 00:00 0 [vdso]\n3000-4000 r-xp 00000000 00:00 0 \n".to_owned();
        assert!(maps.capture_text(7, a.clone()));
        assert!(!maps.capture_text(7, a), "unchanged");
        let b = "1000-2000 r-xp 00000000 00:00 0 [vdso]\n3800-4800 r-xp 00000000 00:00 0 \n".to_owned();
        assert!(maps.capture_text(7, b));
        assert!(matches!(maps.lookup(7, 0x1800).unwrap().kind, MappingKind::Vdso));
        assert_eq!(maps.lookup(7, 0x3900).unwrap().start, 0x3800);
        assert!(
            maps.lookup(7, 0x3100).is_none(),
            "replaced by the overlapping mapping"
        );
    }

    /// Test that our own code symbolizes through a captured mapping, with the
    /// same function names blazesym gives for the live process.
    #[test]
    fn symbolizes_own_function() {
        let pid = std::process::id();
        let mut maps = MapsCache::default();
        assert!(maps.capture(pid).expect("own maps"));
        assert!(
            !maps.capture(pid).expect("own maps"),
            "unchanged maps are not re-read"
        );
        let addr = symbolizes_own_function as *const () as u64;
        let mapping = maps.lookup(pid, addr).expect("mapped");
        assert!(matches!(mapping.kind, MappingKind::File(_)));
        let mut raw = RawProfile::default();
        raw.add(
            crate::aggregate::RawSampleKey {
                tgid: pid,
                tid: pid,
                user: StackSlot::Frames([addr, addr + 1].into()),
                kernel: StackSlot::Absent,
            },
            crate::aggregate::Weight {
                samples: 1,
                period_ns: 1,
            },
        );
        let table = symbolize(&raw, &maps, &[pid]);
        let frames = table.user(pid, addr, true);
        assert!(
            frames.iter().any(|f| f.contains("symbolizes_own_function")),
            "{frames:?}"
        );
        // Unmapped address: data, not an error.
        assert_eq!(table.user(pid, 8, true), vec![FrameName::from("[unknown]")]);
    }
}

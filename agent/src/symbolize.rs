//! Symbolization with blazesym.
//!
//! User addresses are turned into (file, file offset) with mappings captured
//! from /proc/PID/maps while the target lives (at start, and again whenever
//! its maps change), so a target that exits mid-session is still symbolized.
//! Kernel addresses are looked up in kallsyms. A frame that cannot be
//! symbolized becomes `module+0xoffset` or `[unknown]`: data, never an error.
//!
//! blazesym demangles with cpp_demangle, which rejects some names GCC emits
//! (an `sr` expression on a substitution, as in libstdc++'s `enable_if`
//! helpers: gimli-rs/cpp_demangle#308). Names left mangled go through
//! `c++filt`, the GNU demangler perf uses too, in one batch per profile.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs::{self, File},
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::PathBuf,
    sync::Arc,
};

use blazesym::symbolize::{
    source::{Elf, Kernel, Source},
    CodeInfo, Input, Sym, Symbolized, Symbolizer,
};
use blazesym::MaybeDefault;
use tracing::{debug, warn};

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
    /// GNU build id, lowercase hex, read when the file was first mapped (a
    /// file replaced later at the same path must not lend us its id).
    build_id: Option<String>,
}

impl ModuleFile {
    /// The file's GNU build id (`.note.gnu.build-id`), lowercase hex.
    pub fn build_id(&self) -> Option<&str> {
        self.build_id.as_deref()
    }

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
#[derive(Debug, Default, Clone)]
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
    pub(crate) fn capture_text(&mut self, pid: u32, text: String) -> bool {
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
        let build_id = read_build_id(&open_path);
        let file = Arc::new(ModuleFile {
            path,
            open_path,
            _keep: keep,
            build_id,
        });
        self.files.insert(key, file.clone());
        Some(file)
    }

    /// Every executable mapping captured for `pid`, by start address
    /// (unmapped ones included: samples taken before still point there).
    pub fn mappings(&self, pid: u32) -> &[Mapping] {
        self.by_pid.get(&pid).map_or(&[], Vec::as_slice)
    }

    /// The mapping holding `addr` in `pid`.
    pub fn lookup(&self, pid: u32, addr: u64) -> Option<&Mapping> {
        let maps = self.by_pid.get(&pid)?;
        let i = maps.partition_point(|m| m.start <= addr);
        maps.get(i.checked_sub(1)?).filter(|m| addr < m.end)
    }
}

/// The GNU build id of an ELF file, lowercase hex; `None` when it has none
/// or cannot be read (the file is still symbolized).
fn read_build_id(path: &std::path::Path) -> Option<String> {
    match blazesym::helper::read_elf_build_id(path) {
        Ok(id) => id.map(|id| hex(&id)),
        Err(e) => {
            debug!(path = %path.display(), "no build id: {e}");
            None
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The running kernel's image, for the `[kernel.kallsyms]` pprof mapping.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelImage {
    /// GNU build id of the running kernel (from /sys/kernel/notes), hex.
    pub build_id: Option<String>,
    /// `_text` .. `_etext` from kallsyms; `None` when kallsyms hides
    /// addresses (it shows zeros to readers without CAP_SYSLOG).
    pub text: Option<(u64, u64)>,
}

/// Reads the running kernel's build id and text range.
pub fn kernel_image() -> KernelImage {
    let build_id = fs::read("/sys/kernel/notes")
        .ok()
        .and_then(|notes| gnu_build_id_note(&notes));
    let text = fs::read_to_string("/proc/kallsyms").ok().and_then(|text| {
        let (mut start, mut end) = (None, None);
        for line in text.lines() {
            let mut parts = line.split_ascii_whitespace();
            let (Some(addr), Some(_), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
                continue;
            };
            let slot = match name {
                "_text" => &mut start,
                "_etext" => &mut end,
                _ => continue,
            };
            *slot = u64::from_str_radix(addr, 16).ok();
            if start.is_some() && end.is_some() {
                break;
            }
        }
        Some((start?, end?)).filter(|&(s, e)| s != 0 && s < e)
    });
    KernelImage { build_id, text }
}

/// The GNU build id among ELF notes (the format of /sys/kernel/notes).
fn gnu_build_id_note(notes: &[u8]) -> Option<String> {
    use object::{elf, read::elf::NoteIterator, Endianness};
    let endian = Endianness::default();
    let mut iter = NoteIterator::<elf::FileHeader64<Endianness>>::new(endian, 4, notes).ok()?;
    while let Ok(Some(note)) = iter.next() {
        if note.name() == elf::ELF_NOTE_GNU && note.n_type(endian) == elf::NT_GNU_BUILD_ID {
            return Some(hex(note.desc()));
        }
    }
    None
}

/// The address to look up for a stack entry: return addresses point after
/// the call, so look at the call itself.
pub(crate) fn lookup_addr(ip: u64, is_leaf: bool) -> u64 {
    if is_leaf {
        ip
    } else {
        ip.saturating_sub(1)
    }
}

/// One function at an address, with its position in the source when the
/// debug info tells (pprof's `Line`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFrame {
    /// Function name, as in the flamegraph (kernel ones end in `_[k]`).
    pub name: FrameName,
    /// Source file of the position.
    pub file: Option<Arc<str>>,
    /// Line of the position within this function: where the address is for
    /// the innermost frame, where the next inlined call is for the others.
    pub line: Option<u32>,
}

/// Symbols of every address of a raw profile, looked up in batches.
#[derive(Debug, Default)]
pub struct SymbolTable {
    user: HashMap<(u32, u64), Arc<[FrameName]>>,
    kernel: HashMap<u64, Arc<[FrameName]>>,
    /// Frames of the addresses that resolved, outermost first, by lookup
    /// address (unresolved ones have none: pprof keeps just the address).
    user_source: HashMap<(u32, u64), Arc<[SourceFrame]>>,
    kernel_source: HashMap<u64, Arc<[SourceFrame]>>,
}

impl SymbolTable {
    /// Frames of the user address `addr` (a lookup address, see
    /// [`lookup_addr`]) of process `tgid`, outermost first; `None` when it
    /// did not resolve to a function.
    pub fn user_source(&self, tgid: u32, addr: u64) -> Option<&[SourceFrame]> {
        self.user_source.get(&(tgid, addr)).map(|f| &f[..])
    }

    /// Frames of the kernel address `addr` (a lookup address), outermost
    /// first; `None` when it did not resolve.
    pub fn kernel_source(&self, addr: u64) -> Option<&[SourceFrame]> {
        self.kernel_source.get(&addr).map(|f| &f[..])
    }

    /// Records what a user address resolved to (tests of the renderers).
    #[cfg(test)]
    pub(crate) fn insert_user(&mut self, tgid: u32, addr: u64, frames: Vec<SourceFrame>) {
        let names: Vec<FrameName> = frames.iter().map(|f| f.name.clone()).collect();
        self.user.insert((tgid, addr), names[..1].into());
        self.user_source.insert((tgid, addr), frames.into());
    }

    /// Records what a kernel address resolved to (tests of the renderers).
    #[cfg(test)]
    pub(crate) fn insert_kernel(&mut self, addr: u64, name: &str) {
        let frame = SourceFrame {
            name: FrameName::from(format!("{name}_[k]")),
            file: None,
            line: None,
        };
        self.kernel.insert(addr, [frame.name.clone()].into());
        self.kernel_source.insert(addr, [frame].into());
    }
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

/// The flamegraph's frames for a resolved address, outermost first: the
/// function holding it, then the functions inlined there (as `perf script`
/// and pprof show them): at -O2 the hot code is often an inlined helper,
/// and without them its time shows as its caller's.
fn frames_of(sym: &Symbolized<'_>) -> Option<Vec<FrameName>> {
    match sym {
        Symbolized::Sym(sym) => {
            let mut names: Vec<&str> = vec![sym.name.as_ref()];
            for f in &sym.inlined {
                // glibc's wrappers inline a function of the same name
                // (__libc_recv in __libc_recv): one frame, not two.
                if names.last() != Some(&f.name.as_ref()) {
                    names.push(f.name.as_ref());
                }
            }
            Some(names.into_iter().map(FrameName::from).collect())
        }
        Symbolized::Unknown(_) => None,
    }
}

/// Every frame at a resolved address, outermost first: the function, then
/// those inlined into it there, each with its source position. blazesym
/// gives each frame's `code_info` as the position within that frame's
/// function, which is what pprof's lines want.
fn source_frames_of(sym: &Sym<'_>, suffix: &str) -> Vec<SourceFrame> {
    let frame = |name: &str, info: Option<&CodeInfo<'_>>| SourceFrame {
        name: FrameName::from(format!("{name}{suffix}")),
        file: info.map(|c| Arc::from(c.to_path().to_string_lossy().as_ref())),
        line: info.and_then(|c| c.line),
    };
    let mut frames = vec![frame(&sym.name, sym.code_info.as_deref())];
    frames.extend(sym.inlined.iter().map(|f| frame(&f.name, f.code_info.as_ref())));
    frames
}

/// Where the functions of a file start (file offsets), from the unwind
/// tables' index, which stripping leaves in place: an address without a
/// symbol is named after the start of its function, so a stripped binary's
/// samples stay together per function instead of scattering per address.
#[derive(Debug, Default)]
struct FunctionStarts {
    offsets: Vec<u64>,
}

impl FunctionStarts {
    fn read(path: &std::path::Path) -> Self {
        let Ok(data) = crate::unwind::elf::UnwindData::read(path) else {
            return Self::default();
        };
        let Some((svma, hdr)) = &data.eh_frame_hdr else {
            return Self::default();
        };
        let mut offsets: Vec<u64> = crate::unwind::elf::function_starts(svma.start, hdr)
            .into_iter()
            .filter_map(|start| {
                let seg = data
                    .segments
                    .iter()
                    .find(|s| s.exec && start >= s.vaddr && start < s.vaddr + s.filesz)?;
                Some(seg.offset + (start - seg.vaddr))
            })
            .collect();
        offsets.sort_unstable();
        Self { offsets }
    }

    /// The start of the function holding file offset `off`.
    fn function_of(&self, off: u64) -> Option<u64> {
        let i = self.offsets.partition_point(|&s| s <= off);
        i.checked_sub(1).map(|i| self.offsets[i])
    }
}

/// A file and the (address, file offset) pairs to look up in it.
type FileBatch = (Arc<ModuleFile>, Vec<(u64, u64)>);

/// Looks up every address of `raw` (for the processes in `pids`): names,
/// the functions inlined at each address, and their files and lines from
/// the DWARF line tables (what the flamegraph's inlined frames and pprof's
/// lines need; it costs a few hundred ms on large binaries, once per session).
pub fn symbolize(raw: &RawProfile, maps: &MapsCache, pids: &[u32]) -> SymbolTable {
    let started = std::time::Instant::now();
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

    let symbolizer = Symbolizer::builder()
        .enable_code_info(true)
        .enable_inlined_fns(true)
        .build();
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
            // Read only when some address of the file has no symbol.
            let mut starts: Option<FunctionStarts> = None;
            for (i, &(addr, off)) in entries.iter().enumerate() {
                let frames = results.get(i).and_then(frames_of).unwrap_or_else(|| {
                    let starts = starts.get_or_insert_with(|| FunctionStarts::read(&file.open_path));
                    let at = starts.function_of(off).unwrap_or(off);
                    vec![FrameName::from(format!("{short}+{at:#x}"))]
                });
                table.user.insert((tgid, addr), frames.into());
                if let Some(Symbolized::Sym(sym)) = results.get(i) {
                    table
                        .user_source
                        .insert((tgid, addr), source_frames_of(sym, "").into());
                }
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
            if let Some(Symbolized::Sym(sym)) = results.get(i) {
                table
                    .kernel_source
                    .insert(addr, source_frames_of(sym, "_[k]").into());
            }
        }
    }
    demangle_leftovers(&mut table);
    debug!(
        user = table.user.len(),
        kernel = table.kernel.len(),
        "symbolized in {:.1} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    table
}

/// Itanium C++ names blazesym could not demangle, demangled by `c++filt`.
/// Without it they stay mangled (still the right function), with a warning.
fn demangle_leftovers(table: &mut SymbolTable) {
    let mangled = |n: &str| n.starts_with("_Z");
    let names: Vec<FrameName> = table
        .user
        .values()
        .flat_map(|f| f.iter())
        .filter(|n| mangled(n))
        .cloned()
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    if names.is_empty() {
        return;
    }
    let demangled = match cxxfilt(&names) {
        Ok(d) => d,
        Err(e) => {
            warn!(
                "{} C++ names left mangled: cpp_demangle cannot parse them and c++filt (binutils) failed: {e}",
                names.len()
            );
            return;
        }
    };
    let map: HashMap<FrameName, FrameName> = names
        .into_iter()
        .zip(demangled)
        .filter(|(m, d)| m.as_ref() != d)
        .map(|(m, d)| (m, FrameName::from(d)))
        .collect();
    let rename = |n: &FrameName| map.get(n).cloned().unwrap_or_else(|| n.clone());
    for frames in table.user.values_mut() {
        if frames.iter().any(|n| map.contains_key(n)) {
            *frames = frames.iter().map(rename).collect();
        }
    }
    for frames in table.user_source.values_mut() {
        if frames.iter().any(|f| map.contains_key(&f.name)) {
            *frames = frames
                .iter()
                .map(|f| SourceFrame {
                    name: rename(&f.name),
                    ..f.clone()
                })
                .collect();
        }
    }
}

/// Runs `c++filt` over `names` (one per line in, one per line out).
fn cxxfilt(names: &[FrameName]) -> std::io::Result<Vec<String>> {
    use std::io::Write as _;
    let mut child = std::process::Command::new("c++filt")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let input: String = names.iter().map(|n| format!("{n}\n")).collect();
    let mut stdin = child.stdin.take().expect("stdin is piped");
    // Written from another thread: c++filt answers line by line and would
    // block on a full stdout pipe while we block on its full stdin.
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output()?;
    writer.join().expect("c++filt writer")?;
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    if !out.status.success() || lines.len() != names.len() {
        return Err(std::io::Error::other(format!(
            "{} for {} names, {} lines back",
            out.status,
            names.len(),
            lines.len()
        )));
    }
    Ok(lines)
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

    /// Test that our own function's source frame has this file and a line,
    /// its flamegraph frame the same name, and that the captured mapping of
    /// our binary has its build id.
    #[test]
    fn code_info_keeps_flamegraph_names() {
        let pid = std::process::id();
        let mut maps = MapsCache::default();
        maps.capture(pid).expect("own maps");
        let addr = code_info_keeps_flamegraph_names as *const () as u64;
        let mut raw = RawProfile::default();
        raw.add(
            crate::aggregate::RawSampleKey {
                tgid: pid,
                tid: pid,
                user: StackSlot::Frames([addr].into()),
                kernel: StackSlot::Absent,
            },
            crate::aggregate::Weight {
                samples: 1,
                period_ns: 1,
            },
        );
        let detailed = symbolize(&raw, &maps, &[pid]);
        let frames = detailed.user_source(pid, addr).expect("resolved");
        let names = detailed.user(pid, addr, true);
        assert_eq!(
            names,
            frames.iter().map(|f| f.name.clone()).collect::<Vec<_>>(),
            "flamegraph and pprof frames agree"
        );
        let outer = &frames[0];
        assert!(
            outer.name.contains("code_info_keeps_flamegraph_names"),
            "{frames:?}"
        );
        assert!(
            outer.file.as_deref().is_some_and(|f| f.ends_with("symbolize.rs")),
            "{frames:?}"
        );
        assert!(outer.line.is_some_and(|l| l > 0), "{frames:?}");
        let MappingKind::File(file) = &maps.lookup(pid, addr).expect("mapped").kind else {
            panic!("our code is in a file");
        };
        assert!(file.build_id().is_some_and(|id| id.len() >= 16), "{file:?}");
    }

    /// Test that a GCC name cpp_demangle rejects (libstdc++'s vector
    /// relocation helper, seen in the game server) is demangled through
    /// c++filt in both the flamegraph's and pprof's frames.
    #[test]
    fn names_cpp_demangle_rejects_are_demangled() {
        let name = "_ZSt14__relocate_a_1IiiENSt9enable_ifIXsrSt24__is_bitwise_relocatableIT_vE5valueEPS2_E4typeES4_S4_S4_RSaIT0_E";
        let mut table = SymbolTable::default();
        let frame = |n: &str| SourceFrame {
            name: FrameName::from(n),
            file: None,
            line: Some(3),
        };
        table.insert_user(1, 0x10, vec![frame(name), frame("inlined")]);
        table.insert_user(1, 0x20, vec![frame("main")]);
        demangle_leftovers(&mut table);
        let want = "std::enable_if<std::__is_bitwise_relocatable<int, void>::value, int*>::type \
                    std::__relocate_a_1<int, int>(int*, int*, int*, std::allocator<int>&)";
        assert_eq!(table.user(1, 0x10, true)[0].as_ref(), want);
        let source = table.user_source(1, 0x10).unwrap();
        assert_eq!((source[0].name.as_ref(), source[0].line), (want, Some(3)));
        assert_eq!(source[1].name.as_ref(), "inlined");
        assert_eq!(table.user(1, 0x20, true)[0].as_ref(), "main");
    }

    /// Test that an offset is named after the start of its function, and
    /// that one before every function has none.
    #[test]
    fn function_of_offset() {
        let starts = FunctionStarts {
            offsets: vec![0x1000, 0x1040, 0x1100],
        };
        assert_eq!(starts.function_of(0x1000), Some(0x1000));
        assert_eq!(starts.function_of(0x103f), Some(0x1000));
        assert_eq!(starts.function_of(0x1041), Some(0x1040));
        assert_eq!(starts.function_of(0x5000), Some(0x1100));
        assert_eq!(starts.function_of(0x10), None);
        // Our own binary has an index with many functions.
        let own = FunctionStarts::read(&std::env::current_exe().unwrap());
        assert!(own.offsets.len() > 100, "{}", own.offsets.len());
    }

    /// Test that the GNU build id is found among ELF notes (the format of
    /// /sys/kernel/notes), past a note of another kind.
    #[test]
    fn build_id_from_notes() {
        let mut notes = Vec::new();
        let mut note = |name: &[u8], kind: u32, desc: &[u8]| {
            notes.extend((name.len() as u32 + 1).to_ne_bytes());
            notes.extend((desc.len() as u32).to_ne_bytes());
            notes.extend(kind.to_ne_bytes());
            notes.extend(name);
            notes.push(0);
            notes.resize(notes.len().next_multiple_of(4), 0);
            notes.extend(desc);
            notes.resize(notes.len().next_multiple_of(4), 0);
        };
        note(b"Xen", 1, &[1, 2, 3]);
        note(
            b"GNU",
            object::elf::NT_GNU_BUILD_ID,
            &[0xde, 0xad, 0xbe, 0xef, 0x01],
        );
        assert_eq!(gnu_build_id_note(&notes).as_deref(), Some("deadbeef01"));
        assert_eq!(gnu_build_id_note(&notes[..20]), None);
    }
}

//! Stack snapshots → return addresses, with the binaries' `.eh_frame`.
//!
//! For targets without frame pointers the kernel sends the user registers
//! and a window of the user stack ([`flamewatch_common::StackSample`]); here
//! framehop walks it with each binary's DWARF call frame information (and
//! falls back to frame pointers where a binary has none). Unwind data is
//! read once per file and shared by every process mapping it.

pub mod check;
pub mod consumer;
pub mod elf;
pub mod leaf;

use std::{
    collections::HashMap,
    ops::Range,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use framehop::{
    x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64},
    Error as FrameError, ExplicitModuleSectionInfo, Module, Unwinder as _,
};
use serde::Serialize;
use tracing::debug;

use self::elf::UnwindData;
use crate::symbolize::parse_maps;

/// Most frames one stack may have before it is cut (guards against loops).
pub const MAX_FRAMES: usize = 256;

/// How to unwind user stacks (`--unwind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UnwindMode {
    /// Per target: DWARF if its executable does not keep frame pointers.
    Auto,
    /// Frame pointers, walked in the kernel (cheapest).
    Fp,
    /// DWARF CFI, walked by the agent from a copy of the stack.
    Dwarf,
}

/// How one stack unwind ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Reached the outermost frame.
    Complete,
    /// Needed stack beyond the copied window.
    Window,
    /// No unwind rule worked (or the walk went wrong).
    Error,
}

/// Counters of the unwinder, reported in the summary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct UnwindStats {
    /// Samples unwound.
    pub samples: u64,
    /// Reached the outermost frame.
    pub complete: u64,
    /// Cut short because the stack window was too small.
    pub truncated_window: u64,
    /// Cut short by an unwinding failure.
    pub truncated_error: u64,
    /// No user stack at all (registers or stack unreadable).
    pub no_user_stack: u64,
}

/// One mapped executable region of a process.
struct MappedModule {
    range: Range<u64>,
}

/// The modules of one process, ready for framehop.
pub struct ProcessUnwinder {
    unwinder: UnwinderX86_64<Arc<[u8]>>,
    modules: Vec<MappedModule>,
    last_refresh: Option<Instant>,
}

/// Unwind data per file, shared by all processes.
#[derive(Default)]
pub struct FileCache {
    files: HashMap<(PathBuf, u64), Option<Arc<UnwindData>>>,
}

impl FileCache {
    /// Unwind data of the file at `path` with inode `inode`, read once. A
    /// file replaced since the process mapped it is read through
    /// /proc/PID/map_files.
    pub fn get(&mut self, pid: u32, path: &str, inode: u64, range: &Range<u64>) -> Option<Arc<UnwindData>> {
        let key = (PathBuf::from(path), inode);
        if let Some(v) = self.files.get(&key) {
            return v.clone();
        }
        use std::os::unix::fs::MetadataExt as _;
        let direct = PathBuf::from(path);
        let same = std::fs::metadata(&direct).is_ok_and(|m| m.ino() == inode);
        let via = if same {
            direct
        } else {
            PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", range.start, range.end))
        };
        let data = match UnwindData::read(&via) {
            Ok(d) => Some(Arc::new(d)),
            Err(e) => {
                debug!("no unwind data: {e}");
                None
            }
        };
        self.files.insert(key, data.clone());
        data
    }
}

impl Default for ProcessUnwinder {
    fn default() -> Self {
        Self {
            unwinder: UnwinderX86_64::new(),
            modules: Vec::new(),
            last_refresh: None,
        }
    }
}

impl ProcessUnwinder {
    /// Whether `addr` falls in a known module.
    pub fn knows(&self, addr: u64) -> bool {
        self.modules.iter().any(|m| m.range.contains(&addr))
    }

    /// Reads the process's executable mappings and adds the new ones.
    /// Rate-limited, since it is called when an address is not covered.
    pub fn refresh(&mut self, pid: u32, files: &mut FileCache) {
        if self
            .last_refresh
            .is_some_and(|t| t.elapsed() < Duration::from_millis(200))
        {
            return;
        }
        self.last_refresh = Some(Instant::now());
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
            return;
        };
        for line in parse_maps(&text) {
            if !line.perms.contains('x') || !line.path.starts_with('/') || line.inode == 0 {
                continue;
            }
            let range = line.start..line.end;
            if self.modules.iter().any(|m| m.range == range) {
                continue;
            }
            let Some(data) = files.get(pid, &line.path, line.inode, &range) else {
                continue;
            };
            let Some(bias) = data.bias(line.start, line.offset) else {
                continue;
            };
            let info = ExplicitModuleSectionInfo {
                base_svma: 0,
                text_svma: data.text.clone(),
                got_svma: data.got.clone(),
                eh_frame_svma: data.eh_frame.as_ref().map(|(r, _)| r.clone()),
                eh_frame: data.eh_frame.as_ref().map(|(_, d)| d.clone()),
                eh_frame_hdr_svma: data.eh_frame_hdr.as_ref().map(|(r, _)| r.clone()),
                eh_frame_hdr: data.eh_frame_hdr.as_ref().map(|(_, d)| d.clone()),
                debug_frame: data.debug_frame.clone(),
                ..Default::default()
            };
            // A region replaced by a new mapping (dlclose + dlopen) goes first.
            self.modules.retain(|m| {
                let overlaps = m.range.start < range.end && range.start < m.range.end;
                if overlaps {
                    self.unwinder.remove_module(m.range.start);
                }
                !overlaps
            });
            self.unwinder
                .add_module(Module::new(line.path.clone(), range.clone(), bias, info));
            self.modules.push(MappedModule { range });
        }
    }

    /// Unwinds from (ip, sp, bp) over `stack` (the bytes at `sp`…). Returns
    /// the addresses, leaf first (the first is the instruction pointer, the
    /// others return addresses), and how the walk ended.
    pub fn unwind(
        &self,
        cache: &mut CacheX86_64,
        ip: u64,
        sp: u64,
        bp: u64,
        stack: &[u8],
    ) -> (Vec<u64>, Ending) {
        let end = sp + stack.len() as u64;
        let mut read = |addr: u64| -> Result<u64, ()> {
            if addr < sp || addr + 8 > end {
                return Err(());
            }
            let at = (addr - sp) as usize;
            Ok(u64::from_le_bytes(stack[at..at + 8].try_into().map_err(|_| ())?))
        };
        let mut iter = self
            .unwinder
            .iter_frames(ip, UnwindRegsX86_64::new(ip, sp, bp), cache, &mut read);
        let mut ips = Vec::new();
        let ending = loop {
            match iter.next() {
                Ok(Some(frame)) => {
                    ips.push(frame.address());
                    if ips.len() >= MAX_FRAMES {
                        break Ending::Error;
                    }
                }
                Ok(None) => break Ending::Complete,
                Err(FrameError::CouldNotReadStack(addr)) if addr >= end => break Ending::Window,
                Err(_) => break Ending::Error,
            }
        };
        (ips, ending)
    }
}

/// The unwinding chosen for one target.
#[derive(Debug, Clone)]
pub struct Choice {
    /// Unwind from stack copies with DWARF CFI.
    pub dwarf: bool,
    /// Frame pointers picked by `auto`: check them against DWARF copies of
    /// some samples (see [`check`]), and switch if they disagree.
    pub check: bool,
    /// Why, for the summary.
    pub reason: String,
    /// The executable's frame pointer check, when made.
    pub executable: Option<crate::render::summary::ExecutableCheck>,
}

/// Picks the unwinding for process `pid` under `mode`: in `auto`, DWARF
/// when its executable does not keep frame pointers (the code where most
/// samples land decides; a library without them still loses at most the
/// caller of its own leaf functions in fp mode). The prologue count can be
/// fooled (framed cold code, frameless hot code): when `auto` picks frame
/// pointers, the choice is checked while sampling ([`check`]).
pub fn choose(mode: UnwindMode, pid: u32) -> Choice {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
    let check = UnwindData::read(std::path::Path::new(&format!("/proc/{pid}/exe")))
        .ok()
        .map(|d| crate::render::summary::ExecutableCheck {
            path: exe.display().to_string(),
            frame_pointers: d.frame_pointers.has_frame_pointers(),
            functions_checked: d.frame_pointers.checked,
            with_frame_pointer: d.frame_pointers.with_frame_pointer,
        });
    let (dwarf, reason) = match (mode, &check) {
        (UnwindMode::Fp, _) => (false, "frame pointers requested (--unwind fp)".to_owned()),
        (UnwindMode::Dwarf, _) => (true, "DWARF requested (--unwind dwarf)".to_owned()),
        (UnwindMode::Auto, Some(c)) if c.frame_pointers => (
            false,
            format!(
                "{} keeps frame pointers ({} of {} functions checked)",
                c.path, c.with_frame_pointer, c.functions_checked
            ),
        ),
        (UnwindMode::Auto, Some(c)) => (
            true,
            format!(
                "{} has no frame pointers ({} of {} functions checked set one up)",
                c.path, c.with_frame_pointer, c.functions_checked
            ),
        ),
        (UnwindMode::Auto, None) => (false, "executable unreadable: walking frame pointers".to_owned()),
    };
    let fp_check = mode == UnwindMode::Auto && !dwarf;
    let reason = if fp_check {
        format!(
            "{reason}; checked against DWARF on 1 sample in {}",
            flamewatch_common::FP_CHECK_EVERY
        )
    } else {
        reason
    };
    Choice {
        dwarf,
        check: fp_check,
        reason,
        executable: check,
    }
}

//! The report side of memory and heap profiles: which raw profile is the
//! flamegraph, the extra views (heap extensions; allocated and probably
//! leaked bytes), and the summary's `memory` section.

use std::path::Path;

use serde::Serialize;

use super::{LiveAlloc, MemCollected, MemKind};
use crate::{
    aggregate::{frames_for, BuildOptions, FunctionShare, Profile, RawProfile, Weight},
    render::{self, flamegraph, folded},
    symbolize::SymbolTable,
};

/// The raw profiles of a memory window.
pub struct Views {
    /// What was recorded.
    pub kind: MemKind,
    /// Growth: new pages. Heap: allocations (alloc_space).
    pub primary: RawProfile,
    /// Heap: live allocations (inuse_space). Growth: empty.
    pub inuse: RawProfile,
    /// Growth: brk/mmap extensions. Heap: live allocations older than
    /// the leak age.
    pub secondary: RawProfile,
    /// Heap: the live allocations.
    pub live: Vec<LiveAlloc>,
}

impl Views {
    /// The views of `mem` (and of `live`, the allocations still live at the
    /// window's end); allocations at least `leak_age_s` old are "probably
    /// leaked".
    pub fn of(kind: MemKind, mem: &MemCollected, live: &[LiveAlloc], leak_age_s: f64) -> Self {
        match kind {
            MemKind::Growth => Self {
                kind,
                primary: mem.faults.clone(),
                inuse: RawProfile::default(),
                secondary: mem.extends.clone(),
                live: Vec::new(),
            },
            MemKind::Heap => {
                let mut inuse = RawProfile::default();
                let mut leaked = RawProfile::default();
                for a in live {
                    let w = Weight {
                        samples: a.weight * 1000 / a.size.max(1),
                        period_ns: a.weight,
                    };
                    inuse.add(a.key.clone(), w);
                    if a.age_s >= leak_age_s {
                        leaked.add(a.key.clone(), w);
                    }
                }
                Self {
                    kind,
                    primary: mem.allocs.clone(),
                    inuse,
                    secondary: leaked,
                    live: live.to_vec(),
                }
            }
        }
    }

    /// The flamegraph's profile: new pages, or in-use bytes.
    pub fn shown(&self) -> &RawProfile {
        match self.kind {
            MemKind::Growth => &self.primary,
            MemKind::Heap => &self.inuse,
        }
    }

    /// Every raw profile, for one symbolization.
    pub fn all(&self) -> RawProfile {
        let mut all = self.primary.clone();
        all.merge(self.inuse.clone());
        all.merge(self.secondary.clone());
        all
    }
}

/// Live allocations of one stack at the end of the window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LiveStack {
    /// The stack, root first (process frame left out).
    pub stack: Vec<String>,
    /// In-use bytes it stands for.
    pub bytes: u64,
    /// Allocations it stands for.
    pub objects: u64,
    /// Sampled allocations.
    pub sampled: u64,
    /// Age of the oldest, seconds.
    pub oldest_s: f64,
    /// Age of the youngest, seconds.
    pub youngest_s: f64,
    /// All of them are older than the leak age.
    pub probably_leaked: bool,
}

/// Duty cycle of the heap probes (the governor detaches them when they
/// cost more than the budget).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Observation {
    /// Seconds the probes were attached.
    pub observed_s: f64,
    /// Seconds they were detached.
    pub unobserved_s: f64,
    /// The detached spans, RFC 3339.
    pub unobserved: Vec<(String, String)>,
    /// What the spans mean for the numbers.
    pub note: String,
}

/// The summary's `memory` section.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct MemoryInfo {
    /// `growth` or `heap`.
    pub kind: String,
    /// Bytes the flamegraph counts (growth bytes, or in-use bytes).
    pub bytes: u64,
    /// Growth: new anonymous pages (as counted, weights included).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_pages: Option<u64>,
    /// Growth: page size, bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page_size: Option<u64>,
    /// Growth: 1 new page in N recorded (N at the end).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample_every: Option<u64>,
    /// Growth: faults of the target seen (all kinds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub faults_seen: Option<u64>,
    /// Growth: faults in shared mappings (file pages, not counted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared_faults: Option<u64>,
    /// Growth: bytes asked for by brk and anonymous mmap.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extend_bytes: Option<u64>,
    /// Growth: top functions of brk/mmap bytes (the second view).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub extend_top_functions: Vec<FunctionShare>,
    /// Heap: the allocator probed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocator: Option<String>,
    /// Heap: its file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocator_path: Option<String>,
    /// Heap: mean bytes between samples.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample_mean_bytes: Option<u64>,
    /// Heap: allocator calls seen.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calls: Option<u64>,
    /// Heap: allocations sampled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sampled: Option<u64>,
    /// Heap: frees seen.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frees: Option<u64>,
    /// Heap: in-use bytes and objects (estimates).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inuse_bytes: Option<u64>,
    /// See `inuse_bytes`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inuse_objects: Option<u64>,
    /// Heap: bytes and objects allocated in the window (estimates).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alloc_bytes: Option<u64>,
    /// See `alloc_bytes`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alloc_objects: Option<u64>,
    /// Heap: `--leak-age`, seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leak_age_s: Option<f64>,
    /// Heap: in-use bytes older than the leak age.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leaked_bytes: Option<u64>,
    /// Heap: top functions of in-use bytes older than the leak age.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub leaked_top_functions: Vec<FunctionShare>,
    /// Heap: top functions of allocated bytes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub alloc_top_functions: Vec<FunctionShare>,
    /// Heap: live allocations by stack, most bytes first (at most 20).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub live: Vec<LiveStack>,
    /// Heap: per-hit probe costs measured on this machine, ns.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe_costs: Option<super::ProbeCosts>,
    /// Heap: the probes' duty cycle.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observation: Option<Observation>,
    /// Records lost (full tables, or a full ring for DWARF copies).
    pub lost: u64,
    /// Memory events sent as DWARF stack copies (a target without frame
    /// pointers): recorded faults and extensions, or sampled allocations.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dwarf_copies: Option<u64>,
    /// Growth: run time of the growth programs on the target per fault
    /// seen, ns (mmap/brk included; a DWARF copy's cost is in it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bpf_ns_per_fault: Option<f64>,
    /// Extra files: role → path.
    pub files: std::collections::BTreeMap<String, String>,
}

/// The flamegraph subtitle's part for memory.
pub fn subtitle(m: &MemoryInfo) -> String {
    let mib = m.bytes as f64 / (1024.0 * 1024.0);
    match m.kind.as_str() {
        "heap" => format!(
            ", {mib:.1} MiB in use (sampled every {} KiB on average)",
            m.sample_mean_bytes.unwrap_or(0) / 1024
        ),
        _ => format!(", {mib:.1} MiB of new anonymous pages"),
    }
}

/// What [`write_views`] needs besides the views.
pub struct Context<'a> {
    /// Process.
    pub pid: u32,
    /// Symbols of every view.
    pub symbols: &'a SymbolTable,
    /// Stack labels.
    pub opts: &'a BuildOptions,
    /// Output folder.
    pub dir: &'a Path,
    /// File stem.
    pub stem: &'a str,
    /// Files to write.
    pub svg: bool,
    /// See `svg`.
    pub folded: bool,
    /// Functions in each top list.
    pub top_n: usize,
    /// Flamegraph title prefix: `comm (pid N)`.
    pub who: String,
}

/// Writes the extra views' files and fills `info`'s top lists.
pub fn write_views(views: &Views, ctx: &Context<'_>, info: &mut MemoryInfo) {
    let (role, raw, what) = match views.kind {
        MemKind::Growth => (
            "extend",
            &views.secondary,
            "heap extensions (brk, anonymous mmap)",
        ),
        MemKind::Heap => (
            "leaked",
            &views.secondary,
            "probably leaked (live, older than --leak-age)",
        ),
    };
    let p = Profile::build(raw, ctx.pid, ctx.symbols, ctx.opts);
    let top = p.top_functions(ctx.top_n);
    match views.kind {
        MemKind::Growth => info.extend_top_functions = top,
        MemKind::Heap => info.leaked_top_functions = top,
    }
    write_one(ctx, role, &p, what, info);
    if views.kind == MemKind::Heap {
        let a = Profile::build(&views.primary, ctx.pid, ctx.symbols, ctx.opts);
        info.alloc_top_functions = a.top_functions(ctx.top_n);
        write_one(ctx, "alloc", &a, "allocated bytes", info);
        info.live = live_stacks(&views.live, ctx, info.leak_age_s.unwrap_or(f64::MAX));
    }
}

fn write_one(ctx: &Context<'_>, role: &str, p: &Profile, what: &str, info: &mut MemoryInfo) {
    if p.total().period_ns == 0 {
        return;
    }
    let text = folded::render(p, 1);
    if ctx.folded {
        let path = ctx.dir.join(format!("{}.{role}.folded", ctx.stem));
        match render::write_file(&path, text.as_bytes()) {
            Ok(()) => {
                info.files
                    .insert(format!("{role}_folded"), path.display().to_string());
            }
            Err(e) => tracing::warn!("{}: {e}", path.display()),
        }
    }
    if ctx.svg {
        let title = flamegraph::Title {
            title: format!("{}: {what}", ctx.who),
            subtitle: format!("{:.1} MiB", p.total().period_ns as f64 / (1024.0 * 1024.0)),
            count_name: "bytes".into(),
        };
        let path = ctx.dir.join(format!("{}.{role}.svg", ctx.stem));
        match flamegraph::render(&text, &title, false).and_then(|svg| render::write_file(&path, &svg)) {
            Ok(()) => {
                info.files
                    .insert(format!("{role}_svg"), path.display().to_string());
            }
            Err(e) => tracing::warn!("{}: {e}", path.display()),
        }
    }
}

/// Live allocations grouped by stack, most bytes first.
fn live_stacks(live: &[LiveAlloc], ctx: &Context<'_>, leak_age_s: f64) -> Vec<LiveStack> {
    let flat = BuildOptions {
        per_thread: false,
        ..ctx.opts.clone()
    };
    let mut by: std::collections::HashMap<Vec<String>, LiveStack> = std::collections::HashMap::new();
    for a in live {
        let stack: Vec<String> = frames_for(&a.key, ctx.symbols, &flat)
            .iter()
            .skip(1)
            .map(|f| f.to_string())
            .collect();
        let e = by.entry(stack.clone()).or_insert_with(|| LiveStack {
            stack,
            bytes: 0,
            objects: 0,
            sampled: 0,
            oldest_s: 0.0,
            youngest_s: f64::MAX,
            probably_leaked: true,
        });
        e.bytes += a.weight;
        e.objects += (a.weight + a.size / 2) / a.size.max(1);
        e.sampled += 1;
        e.oldest_s = e.oldest_s.max(round3(a.age_s));
        e.youngest_s = e.youngest_s.min(round3(a.age_s));
        e.probably_leaked &= a.age_s >= leak_age_s;
    }
    let mut out: Vec<LiveStack> = by.into_values().collect();
    out.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.stack.cmp(&b.stack)));
    out.truncate(20);
    out
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::{RawSampleKey, StackSlot};

    fn alloc(ip: u64, size: u64, weight: u64, age_s: f64) -> LiveAlloc {
        LiveAlloc {
            key: RawSampleKey {
                tgid: 1,
                tid: 1,
                user: StackSlot::Frames([ip].into()),
                kernel: StackSlot::Absent,
            },
            size,
            weight,
            age_s,
        }
    }

    /// Test that heap views weigh live allocations by their unbiased bytes
    /// and put only those past the leak age in the leaked view.
    #[test]
    fn heap_views_split_by_age() {
        let live = [alloc(0x10, 100, 1000, 40.0), alloc(0x20, 100, 3000, 5.0)];
        let v = Views::of(MemKind::Heap, &MemCollected::default(), &live, 30.0);
        let bytes = |r: &RawProfile| r.samples.values().map(|w| w.period_ns).sum::<u64>();
        assert_eq!(bytes(&v.inuse), 4000);
        assert_eq!(bytes(&v.secondary), 1000);
        assert_eq!(v.inuse.samples.values().map(|w| w.samples).sum::<u64>(), 40_000);
        assert_eq!(bytes(v.shown()), 4000);
    }
}

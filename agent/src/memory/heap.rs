//! Heap mode's userspace pieces that need no kernel: which allocator a
//! target maps, and the sampling tables handed to the probes.

use std::path::{Path, PathBuf};

use flamewatch_common::memory::{HEAP_BINS_PER_MEAN, HEAP_TABLE};
use object::{Object as _, ObjectSymbol as _};

use crate::symbolize::parse_maps;

/// The allocator functions probed, with the entry program of each (its
/// arguments' shape) and whether it returns a pointer (return probe).
pub const FUNCTIONS: &[(&str, &str, bool)] = &[
    ("malloc", "flamewatch_heap_malloc", true),
    ("calloc", "flamewatch_heap_calloc", true),
    ("realloc", "flamewatch_heap_realloc", true),
    ("free", "flamewatch_heap_free", false),
    ("posix_memalign", "flamewatch_heap_posix_memalign", true),
    ("aligned_alloc", "flamewatch_heap_memalign", true),
    ("memalign", "flamewatch_heap_memalign", true),
];

/// Allocator families, in the order a dynamically linked program's calls
/// resolve to them when several are mapped: the executable itself, then a
/// preloaded or linked jemalloc/tcmalloc, then glibc.
const FAMILIES: &[(&str, &str)] = &[
    ("libjemalloc", "jemalloc"),
    ("libtcmalloc", "tcmalloc"),
    ("libc.so", "glibc"),
];

/// The allocator a target's calls go to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocator {
    /// Which one (`glibc`, `jemalloc`, `tcmalloc`, `executable`).
    pub name: String,
    /// The file as the target maps it (path inside its mount namespace).
    pub path: String,
    /// The same file reached through /proc/PID/root (what the probes attach to).
    pub open_path: PathBuf,
    /// The probed functions it defines (dynamic symbols).
    pub functions: Vec<&'static str>,
}

/// Functions of [`FUNCTIONS`] that `file` defines as dynamic symbols.
pub fn defined_functions(file: &Path) -> Vec<&'static str> {
    let Ok(data) = std::fs::read(file) else {
        return Vec::new();
    };
    let Ok(obj) = object::File::parse(&*data) else {
        return Vec::new();
    };
    let names: std::collections::HashSet<&str> = obj
        .dynamic_symbols()
        .filter(|s| s.is_definition())
        .filter_map(|s| s.name().ok())
        .collect();
    FUNCTIONS
        .iter()
        .map(|(f, _, _)| *f)
        .filter(|f| names.contains(f))
        .collect()
}

/// The allocator `pid` maps: the first of its executable, jemalloc,
/// tcmalloc and glibc that defines `malloc` and `free`.
pub fn find_allocator(pid: u32) -> Option<Allocator> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    let mut files: Vec<String> = Vec::new();
    for line in parse_maps(&maps) {
        if line.path.starts_with('/') && line.inode != 0 && !files.contains(&line.path) {
            files.push(line.path);
        }
    }
    let candidates = std::iter::once(
        exe.as_ref()
            .map(|e| (e.display().to_string(), "executable".to_owned())),
    )
    .flatten()
    .chain(FAMILIES.iter().flat_map(|(prefix, name)| {
        files
            .iter()
            .filter(move |f| f.rsplit('/').next().is_some_and(|b| b.starts_with(prefix)))
            .map(move |f| (f.clone(), (*name).to_owned()))
    }));
    for (path, name) in candidates {
        let open_path = PathBuf::from(format!("/proc/{pid}/root{path}"));
        let functions = defined_functions(&open_path);
        if functions.contains(&"malloc") && functions.contains(&"free") {
            return Some(Allocator {
                name,
                path,
                open_path,
                functions,
            });
        }
    }
    None
}

/// `HEAP_RAND`: quantiles of the exponential distribution of mean `mean`
/// (bytes to the next sample), scaled so that their average is `mean`.
pub fn exponential_table(mean: u64) -> Vec<u64> {
    let n = HEAP_TABLE as usize;
    let raw: Vec<f64> = (0..n)
        .map(|i| -(1.0 - (i as f64 + 0.5) / n as f64).ln())
        .collect();
    let avg = raw.iter().sum::<f64>() / n as f64;
    raw.iter()
        .map(|x| ((x / avg) * mean as f64).round().max(1.0) as u64)
        .collect()
}

/// What a sampled allocation of `size` bytes stands for, in bytes: it was
/// sampled with probability `1 - exp(-size / mean)`.
pub fn unbiased_bytes(size: f64, mean: f64) -> f64 {
    if size <= 0.0 {
        return mean;
    }
    let p = -(-size / mean).exp_m1();
    size / p
}

/// `HEAP_WEIGHTS`: [`unbiased_bytes`] at the middle of each size bin.
pub fn weight_table(mean: u64) -> Vec<u64> {
    let bin = mean as f64 / HEAP_BINS_PER_MEAN as f64;
    (0..HEAP_TABLE)
        .map(|i| unbiased_bytes((f64::from(i) + 0.5) * bin, mean as f64).round() as u64)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test that the exponential table averages to the mean and is spread
    /// like an exponential (median ln 2 of the mean).
    #[test]
    fn exponential_table_has_the_mean() {
        let t = exponential_table(512 * 1024);
        let avg = t.iter().sum::<u64>() as f64 / t.len() as f64;
        assert!((avg / (512.0 * 1024.0) - 1.0).abs() < 0.001, "{avg}");
        let mut s = t.clone();
        s.sort_unstable();
        let median = s[s.len() / 2] as f64 / (512.0 * 1024.0);
        assert!((median - 2f64.ln()).abs() < 0.05, "{median}");
    }

    /// Test that small allocations weigh about the mean and large ones
    /// their size.
    #[test]
    fn unbiased_weights() {
        let m = 512.0 * 1024.0;
        assert!((unbiased_bytes(16.0, m) / m - 1.0).abs() < 0.001);
        assert!((unbiased_bytes(64.0 * m, m) / (64.0 * m) - 1.0).abs() < 1e-9);
        let w = weight_table(512 * 1024);
        assert!(w.windows(2).all(|p| p[0] <= p[1]), "weights grow with size");
    }

    /// Test that this process's allocator is found as glibc's, with malloc
    /// and free among its functions.
    #[test]
    fn finds_glibc_in_this_process() {
        let a = find_allocator(std::process::id()).expect("an allocator");
        assert_eq!(a.name, "glibc", "{a:?}");
        assert!(a.functions.contains(&"malloc") && a.functions.contains(&"free"));
    }
}

// Builds the C/C++ target programs. Included (with `include!`) by both
// tests/build.rs and xtask, so the test suite, the demo and the benchmarks
// run the very same binaries, built with the system gcc/g++.
//
// Every program comes in variants:
// - `<name>`: production-like, `-O2 -g`, no frame pointers (as shipped);
// - `<name>-fp`: `-O2 -g -fno-omit-frame-pointer`;
// - `<name>-stripped`: the production-like binary without symbols or debug info.

/// One program to build.
pub struct TargetSpec {
    /// Base name of the binaries.
    pub name: &'static str,
    /// Sources, relative to tests/targets.
    pub sources: &'static [&'static str],
    /// C++ (g++) rather than C (gcc).
    pub cxx: bool,
    /// Build the -fp and -stripped variants too.
    pub variants: bool,
}

/// Every target program.
pub const TARGETS: &[TargetSpec] = &[
    TargetSpec { name: "hotpaths", sources: &["hotpaths.c"], cxx: false, variants: true },
    TargetSpec { name: "throughput", sources: &["throughput.c"], cxx: false, variants: true },
    TargetSpec { name: "sleepspin", sources: &["sleepspin.c"], cxx: false, variants: true },
    TargetSpec { name: "leafcall", sources: &["leafcall.c"], cxx: false, variants: true },
    TargetSpec { name: "memshape", sources: &["memshape.c"], cxx: false, variants: false },
    TargetSpec { name: "manythreads", sources: &["manythreads.c"], cxx: false, variants: false },
    // Production flags only: its point is framed cold code around a frameless hot path.
    TargetSpec { name: "fpdecoy", sources: &["fpdecoy.c"], cxx: false, variants: false },
    TargetSpec { name: "memleak", sources: &["memleak.c"], cxx: false, variants: true },
    TargetSpec { name: "mallocloop", sources: &["mallocloop.c"], cxx: false, variants: true },
    TargetSpec { name: "logcaster", sources: &["logcaster/logcaster.c"], cxx: false, variants: true },
    TargetSpec { name: "logcaster-load", sources: &["logcaster/logcaster-load.c"], cxx: false, variants: false },
    TargetSpec { name: "game-server", sources: &["game-server/game-server.cpp"], cxx: true, variants: true },
    TargetSpec { name: "leaker", sources: &["leaker.c"], cxx: false, variants: false },
    TargetSpec { name: "framelat", sources: &["framelat.c"], cxx: false, variants: true },
    TargetSpec { name: "callrate", sources: &["callrate.c"], cxx: false, variants: false },
];

/// Builds every target of [`TARGETS`] from `src_dir` into `out_dir`. Returns
/// the source files read (for rerun-if-changed).
pub fn build_targets(
    src_dir: &std::path::Path,
    out_dir: &std::path::Path,
) -> Result<Vec<std::path::PathBuf>, String> {
    use std::process::Command;
    std::fs::create_dir_all(out_dir).map_err(|e| format!("{}: {e}", out_dir.display()))?;
    let mut inputs = Vec::new();
    for spec in TARGETS {
        let sources: Vec<std::path::PathBuf> = spec.sources.iter().map(|s| src_dir.join(s)).collect();
        inputs.extend(sources.iter().cloned());
        let compiler = if spec.cxx { "g++" } else { "gcc" };
        let lang: &[&str] = if spec.cxx { &["-std=c++17"] } else { &["-std=gnu11"] };
        let mut variants: Vec<(String, &[&str])> =
            vec![(spec.name.to_owned(), &["-O2", "-g", "-fomit-frame-pointer"])];
        if spec.variants {
            variants.push((format!("{}-fp", spec.name), &["-O2", "-g", "-fno-omit-frame-pointer"]));
        }
        for (bin, flags) in &variants {
            let out = out_dir.join(bin);
            let status = Command::new(compiler)
                .args(lang)
                .args(*flags)
                .args(["-Wall", "-pthread", "-o"])
                .arg(&out)
                .args(&sources)
                .status()
                .map_err(|e| format!("running {compiler}: {e} (install gcc/g++: `cargo xtask setup`)"))?;
            if !status.success() {
                return Err(format!("{compiler} failed building {bin} ({status})"));
            }
        }
        if spec.variants {
            let prod = out_dir.join(spec.name);
            let stripped = out_dir.join(format!("{}-stripped", spec.name));
            let status = Command::new("strip")
                .arg("--strip-all")
                .arg("-o")
                .arg(&stripped)
                .arg(&prod)
                .status()
                .map_err(|e| format!("running strip: {e}"))?;
            if !status.success() {
                return Err(format!("strip failed on {}", prod.display()));
            }
        }
    }
    Ok(inputs)
}

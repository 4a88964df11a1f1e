//! Builds the eBPF object (ebpf/) with the pinned nightly, through aya-build.
//! This is the only place the kernel side is compiled; the object is embedded
//! in the agent with `include_bytes_aligned!`.
//!
//! It also generates the pprof types (`perftools.profiles`) from the vendored
//! proto/profile.proto with prost-build, parsing the .proto with protox
//! (pure Rust), so no `protoc` has to be installed.

use std::{fs, path::Path};

use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    compile_profile_proto(manifest_dir)?;
    let ebpf_dir = manifest_dir.join("../ebpf");
    let common_dir = manifest_dir.join("../common");
    // aya-build watches the eBPF package; the shared ABI crate matters too.
    println!("cargo:rerun-if-changed={}", common_dir.display());
    let toolchain_file = ebpf_dir.join("rust-toolchain.toml");
    println!("cargo:rerun-if-changed={}", toolchain_file.display());
    let channel = read_channel(&toolchain_file)?;

    let root_dir = ebpf_dir
        .canonicalize()
        .with_context(|| format!("{}", ebpf_dir.display()))?;
    let root_dir = root_dir.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?;
    aya_build::build_ebpf(
        [Package {
            name: "flamewatch-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::Custom(&channel),
    )
    .context(
        "building the eBPF object failed; run `cargo xtask setup` (pinned nightly with rust-src, bpf-linker)",
    )
}

/// Generates `$OUT_DIR/perftools.profiles.rs` from proto/profile.proto.
fn compile_profile_proto(manifest_dir: &Path) -> anyhow::Result<()> {
    let proto_dir = manifest_dir.join("proto");
    let proto = proto_dir.join("profile.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    let descriptors =
        protox::compile([&proto], [&proto_dir]).with_context(|| format!("parsing {}", proto.display()))?;
    prost_build::Config::new()
        .compile_fds(descriptors)
        .context("generating the pprof types")
}

/// The `channel = "..."` line of ebpf/rust-toolchain.toml.
fn read_channel(path: &Path) -> anyhow::Result<String> {
    let text = fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("channel"))
        .filter_map(|rest| rest.trim().strip_prefix('='))
        .map(|value| value.trim().trim_matches('"').to_owned())
        .next()
        .ok_or_else(|| anyhow!("no channel in {}", path.display()))
}

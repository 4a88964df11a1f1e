//! `cargo xtask setup`: the pinned nightly with rust-src, a bpf-linker that
//! really runs against that nightly's LLVM, Debian packages, and tracefs.

use std::{
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use crate::{is_root, root, run};

/// Commands the build and tests need, and the Debian package of each.
const PACKAGES: &[(&str, &str)] = &[
    ("gcc", "gcc"),
    ("g++", "g++"),
    ("strip", "binutils"),
    // The agent's fallback demangler for names cpp_demangle cannot parse.
    ("c++filt", "binutils"),
    ("ss", "iproute2"),
    ("setpriv", "util-linux"),
    ("mount", "mount"),
    // The unwinding tests profile the distribution's python (no frame pointers).
    ("/usr/bin/python3", "python3"),
    // The pprof test reads our profiles with `go tool pprof`.
    ("go", "golang-go"),
    // The ecosystem tests run a real Prometheus (and promtool) and Alertmanager.
    ("promtool", "prometheus"),
    ("prometheus-alertmanager", "prometheus-alertmanager"),
    // The HTML index test drives a headless Chromium through chromedriver.
    ("chromium", "chromium"),
    ("chromedriver", "chromium-driver"),
    // The kernel matrix boots Debian's kernels under qemu (virtme-ng).
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("busybox", "busybox-static"),
    // The targets test watches a pre-fork server (master + workers) by name.
    ("/usr/sbin/nginx", "nginx-light"),
];

/// Runs every setup step.
pub fn all() -> Result<()> {
    packages(PACKAGES)?;
    let channel = nightly_channel()?;
    toolchain(&channel)?;
    bpf_linker(&channel)?;
    tracefs()?;
    kernels()?;
    Ok(())
}

/// The kernels of the matrix (crate::matrix::KERNELS) in /boot, and
/// virtme-ng to boot them; only what is missing is installed.
pub fn kernels() -> Result<()> {
    let missing: Vec<String> = crate::matrix::KERNELS
        .iter()
        .filter(|k| !Path::new(&format!("/boot/vmlinuz-{k}")).exists())
        .map(|k| format!("linux-image-{k}"))
        .collect();
    if !missing.is_empty() {
        let names: Vec<&str> = missing.iter().map(String::as_str).collect();
        // No command to look for: a kernel is missing by its /boot file.
        let wanted: Vec<(&str, &str)> = names.iter().map(|n| ("/nonexistent-kernel", *n)).collect();
        packages(&wanted)?;
    }
    if !have("vng") {
        eprintln!("xtask: installing virtme-ng (pip)");
        let pip = |extra: &[&str]| {
            Command::new("pip")
                .args(["install", "-q"])
                .args(extra)
                .arg("virtme-ng")
                .status()
                .is_ok_and(|s| s.success())
        };
        // Debian's pip refuses system-wide installs unless told.
        if !pip(&[]) && !pip(&["--break-system-packages"]) {
            bail!("pip install virtme-ng failed");
        }
    }
    Ok(())
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Installs the Debian packages whose commands are missing.
pub fn packages(wanted: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(cmd, _)| !have(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {missing:?}: run `sudo apt-get install {}`",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {missing:?}");
    let install = |update: bool| -> Result<()> {
        if update {
            run(Command::new("apt-get").args(["update", "-q"]))?;
        }
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))
    };
    // Services the packages bring (nginx, prometheus) must not start: the
    // tests run their own instances, and a system nginx would be one more
    // process of that name.
    let _no_services = NoServices::install();
    // Package lists may be stale on a fresh machine: update once on failure.
    install(false).or_else(|_| install(true))
}

/// A `policy-rc.d` that forbids starting services while packages install
/// (the Debian convention, exit 101), removed afterwards; an existing one
/// is left as it is.
struct NoServices(Option<std::path::PathBuf>);

impl NoServices {
    fn install() -> Self {
        let path = std::path::PathBuf::from("/usr/sbin/policy-rc.d");
        let created = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o755)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"#!/bin/sh\nexit 101\n"));
        Self(created.is_ok().then_some(path))
    }
}

impl Drop for NoServices {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The pinned nightly, from ebpf/rust-toolchain.toml.
pub fn nightly_channel() -> Result<String> {
    let path = root().join("ebpf/rust-toolchain.toml");
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("channel"))
        .filter_map(|r| r.trim().strip_prefix('='))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .next()
        .with_context(|| format!("no channel in {}", path.display()))
}

fn toolchain(channel: &str) -> Result<()> {
    let installed = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", channel])
        .output()
        .context("rustup is required")?;
    let list = String::from_utf8_lossy(&installed.stdout);
    if installed.status.success() && list.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    run(Command::new("rustup").args([
        "toolchain",
        "install",
        channel,
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ]))
}

fn rustup_home() -> PathBuf {
    std::env::var_os("RUSTUP_HOME").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".rustup"),
        PathBuf::from,
    )
}

/// The nightly's own libLLVM (e.g. libLLVM.so.22.1-rust-1.97.0-nightly).
fn nightly_libllvm(channel: &str) -> Result<PathBuf> {
    let out = Command::new("rustc")
        .arg(format!("+{channel}"))
        .args(["--print", "sysroot"])
        .output()?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let sysroot = if sysroot.as_os_str().is_empty() {
        rustup_home()
            .join("toolchains")
            .join(format!("{channel}-x86_64-unknown-linux-gnu"))
    } else {
        sysroot
    };
    let lib = sysroot.join("lib");
    std::fs::read_dir(&lib)
        .with_context(|| lib.display().to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))
}

/// Whether the installed bpf-linker runs and uses `soname`.
fn bpf_linker_ok(soname: &str) -> bool {
    let Ok(out) = Command::new("bpf-linker").arg("--version").output() else {
        return false;
    };
    if !out.status.success() {
        return false;
    }
    let Ok(path) = Command::new("sh").args(["-c", "command -v bpf-linker"]).output() else {
        return false;
    };
    let path = String::from_utf8_lossy(&path.stdout).trim().to_owned();
    let Ok(ldd) = Command::new("ldd").arg(&path).output() else {
        return true;
    };
    let ldd = String::from_utf8_lossy(&ldd.stdout);
    // Linked against some other LLVM: it runs, but cannot read the
    // nightly's bitcode. A statically linked one is taken as it is.
    !ldd.contains("libLLVM")
        || ldd
            .lines()
            .any(|l| l.contains(soname) && !l.contains("not found"))
}

fn bpf_linker(channel: &str) -> Result<()> {
    let libllvm = nightly_libllvm(channel)?;
    let soname = libllvm
        .file_name()
        .and_then(|n| n.to_str())
        .context("libLLVM name")?
        .to_owned();
    if bpf_linker_ok(&soname) {
        return Ok(());
    }
    let major = soname
        .strip_prefix("libLLVM.so.")
        .and_then(|v| v.split('.').next())
        .context("LLVM version from soname")?
        .to_owned();
    // A stable prefix (not /tmp): bpf-linker's RUNPATH points into it.
    let prefix = PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
        .join(".local/share/flamewatch")
        .join(format!("llvm-{major}-rust-{channel}"));
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib)?;
    for name in ["libLLVM.so", soname.as_str()] {
        let link = lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link).with_context(|| link.display().to_string())?;
    }
    eprintln!("xtask: building bpf-linker against {}", libllvm.display());
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--force",
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{major}"))
        .env("LLVM_PREFIX", &prefix)
        .current_dir(std::env::temp_dir()))?;
    if !bpf_linker_ok(&soname) {
        bail!("bpf-linker was installed but does not run; check ~/.cargo/bin is on PATH");
    }
    Ok(())
}

fn tracefs() -> Result<()> {
    if Path::new("/sys/kernel/tracing/events").is_dir() {
        return Ok(());
    }
    if !is_root() {
        eprintln!("xtask: tracefs is not mounted; the agent mounts it when run as root");
        return Ok(());
    }
    run(Command::new("mount").args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"]))
}

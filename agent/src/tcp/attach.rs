//! Attaching the TCP programs to their tracepoints: tracefs mounted, the
//! programs loaded (with this kernel's record layouts, crate::layout) and
//! attached. State tracking is required; a reset tracepoint this kernel
//! cannot serve is skipped with one warning.

use std::{
    collections::HashMap,
    ffi::CString,
    path::{Path, PathBuf},
};

use aya::{
    programs::{trace_point::TracePointLinkId, TracePoint},
    Ebpf,
};
use tracing::info;

use super::TcpError;
use crate::{
    bpf::BpfError,
    layout::{layouts, warn_missing_once, Feature},
};

/// The TCP programs and their tracepoints (category, name).
pub const PROGRAMS: [(&str, &str, &str); 3] = [
    ("flamewatch_tcp_state", "sock", "inet_sock_set_state"),
    ("flamewatch_tcp_rst_in", "tcp", "tcp_receive_reset"),
    ("flamewatch_tcp_rst_out", "tcp", "tcp_send_reset"),
];

/// The feature each of [`PROGRAMS`] serves.
const FEATURES: [Feature; 3] = [
    Feature::TcpStates,
    Feature::TcpResetsReceived,
    Feature::TcpResetsSent,
];

/// Where tracefs is expected (aya looks there first).
const TRACEFS: &str = "/sys/kernel/tracing";

/// Mounts tracefs at /sys/kernel/tracing unless it is there: tracepoints are
/// attached by their id, read from tracefs, and it is not mounted by default
/// on every machine. Must run before aya first looks for it (it caches the
/// answer).
pub fn ensure_tracefs() -> Result<PathBuf, TcpError> {
    let root = Path::new(TRACEFS);
    if root.join("events").is_dir() {
        return Ok(root.to_owned());
    }
    let legacy = Path::new("/sys/kernel/debug/tracing");
    if legacy.join("events").is_dir() {
        return Ok(legacy.to_owned());
    }
    let target = CString::new(TRACEFS).expect("no NUL");
    let fstype = CString::new("tracefs").expect("no NUL");
    let source = CString::new("nodev").expect("no NUL");
    // SAFETY: valid NUL-terminated strings; no data argument.
    let ret = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if ret != 0 {
        return Err(TcpError::Tracefs(std::io::Error::last_os_error()));
    }
    info!("mounted tracefs at {TRACEFS}");
    Ok(root.to_owned())
}

/// Fields of a tracepoint `format` file: name → (offset, size).
pub type Format = HashMap<String, (usize, usize)>;

/// Parses a tracepoint `format` file.
pub fn parse_format(text: &str) -> Format {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let decl = line.strip_prefix("field:")?.split(';').next()?;
            let name = decl.split_whitespace().last()?;
            let name = name.split('[').next()?.to_owned();
            let num = |key: &str| -> Option<usize> {
                line.split(';')
                    .find_map(|part| part.trim().strip_prefix(key))
                    .and_then(|v| v.trim().parse().ok())
            };
            Some((name, (num("offset:")?, num("size:")?)))
        })
        .collect()
}

/// Loads and attaches the programs this kernel can run; without state
/// tracking there is nothing to do, which is an error.
pub fn attach(ebpf: &mut Ebpf) -> Result<Vec<(&'static str, TracePointLinkId)>, TcpError> {
    ensure_tracefs()?;
    let layouts = layouts();
    if let Some(why) = layouts.missing(Feature::TcpStates) {
        return Err(TcpError::Unsupported {
            kernel: crate::layout::kernel_release(),
            detail: why.to_owned(),
        });
    }
    let mut links = Vec::new();
    for ((name, category, event), feature) in PROGRAMS.into_iter().zip(FEATURES) {
        if let Some(why) = layouts.missing(feature) {
            warn_missing_once(feature, why);
            continue;
        }
        let prog = ebpf.program_mut(name).ok_or(TcpError::MissingProgram(name))?;
        let prog: &mut TracePoint = prog
            .try_into()
            .map_err(|source| BpfError::Program { name, source })?;
        prog.load().map_err(|source| BpfError::Program { name, source })?;
        let link = prog
            .attach(category, event)
            .map_err(|source| BpfError::Program { name, source })?;
        links.push((name, link));
    }
    Ok(links)
}

/// Detaches the programs (what dropping the `Ebpf` also does).
pub fn detach(ebpf: &mut Ebpf, links: Vec<(&'static str, TracePointLinkId)>) {
    for (name, link) in links {
        if let Some(prog) = ebpf.program_mut(name) {
            if let Ok(tp) = <&mut TracePoint>::try_from(prog) {
                let _ = tp.detach(link);
            }
        }
    }
}

/// `recursion_misses:\tN` of a BPF program's fdinfo.
pub fn parse_recursion_misses(fdinfo: &str) -> Option<u64> {
    fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("recursion_misses:"))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SET_STATE: &str = "name: inet_sock_set_state
ID: 2287
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;

print fmt: \"family=%s\"";

    /// Test that format files are parsed into name → (offset, size),
    /// pointers and arrays included.
    #[test]
    fn format_parsing() {
        let f = parse_format(SET_STATE);
        assert_eq!(f["skaddr"], (8, 8));
        assert_eq!(f["oldstate"], (16, 4));
        assert_eq!(f["saddr_v6"], (40, 16));
        assert_eq!(f["common_pid"], (4, 4));
        assert!(!f.contains_key("family"));
    }

    /// Test that skipped runs are read from fdinfo.
    #[test]
    fn recursion_misses() {
        let info = "prog_type:\t5\nrun_time_ns:\t10\nrun_cnt:\t2\nrecursion_misses:\t3\n";
        assert_eq!(parse_recursion_misses(info), Some(3));
        assert_eq!(parse_recursion_misses("prog_type:\t5\n"), None);
    }
}

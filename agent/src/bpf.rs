//! Loading the embedded eBPF object, once per agent process.

use aya::{Ebpf, EbpfLoader};
use tracing::{debug, warn};

/// The eBPF object built by `build.rs` from `ebpf/`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/flamewatch"));

/// Errors of the loading layer.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// The object could not be loaded (verifier, missing kernel feature…).
    #[error("loading the eBPF object failed: {0}")]
    Load(#[from] aya::EbpfError),
    /// A program could not be loaded or attached.
    #[error("eBPF program {name}: {source}")]
    Program {
        /// Program name.
        name: &'static str,
        /// Cause.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// A map is missing or has the wrong type.
    #[error("eBPF map {name}: {source}")]
    Map {
        /// Map name.
        name: &'static str,
        /// Cause.
        #[source]
        source: aya::maps::MapError,
    },
    /// A map the agent expects is not in the object.
    #[error("eBPF map {0} is missing from the object")]
    MissingMap(&'static str),
}

/// Takes map `name` out of `ebpf` as a `T` (each part of the agent owns
/// the maps it takes).
pub fn take_map<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut aya::Ebpf,
    name: &'static str,
) -> Result<T, BpfError> {
    let map = ebpf.take_map(name).ok_or(BpfError::MissingMap(name))?;
    T::try_from(map).map_err(|source| BpfError::Map { name, source })
}

/// Ring buffer of DWARF samples when a target needs it: ~0.5 s of 16 KiB
/// samples at 999 Hz from one busy thread. A page otherwise.
pub const STACK_RING_BYTES: u32 = 8 << 20;

/// Loads the object and starts forwarding aya-log records to `tracing`.
/// `dwarf`: whether any target will be unwound from stack copies.
pub fn load(dwarf: bool) -> Result<Ebpf, BpfError> {
    load_for(dwarf, true, None)
}

/// [`load`], with the off-CPU tables shrunk to one entry when `off_cpu` is
/// false, and the aggregation maps sized for `max_hz` when it is known:
/// preallocating a 16384-entry per-CPU hash costs ~30 ms of start-up here.
pub fn load_for(dwarf: bool, off_cpu: bool, max_hz: Option<u64>) -> Result<Ebpf, BpfError> {
    load_with(dwarf, off_cpu, max_hz, None)
}

/// [`load_for`], with the memory maps sized for `memory` (one entry each
/// when `None`: see [`crate::memory::size_maps`]).
pub fn load_with(
    dwarf: bool,
    off_cpu: bool,
    max_hz: Option<u64>,
    memory: Option<&crate::memory::MemoryOptions>,
) -> Result<Ebpf, BpfError> {
    raise_memlock();
    let ring = if dwarf { STACK_RING_BYTES } else { 4096 };
    let layouts = crate::layout::layouts();
    let mut loader = EbpfLoader::new();
    // The programs need no CO-RE relocation (tracepoint offsets come from
    // tracefs, below): skip parsing the kernel's BTF on every start.
    loader
        .btf(None)
        .map_max_entries("STACK_SAMPLES", ring)
        // This kernel's tracepoint record offsets (read-only globals).
        .override_global("TCP_LAYOUT", &layouts.tcp, true)
        .override_global("SCHED_LAYOUT", &layouts.sched, true)
        .override_global("CRASH_LAYOUT", &layouts.crash, true);
    if !off_cpu {
        for map in ["OFFCPU_COUNTS", "OFFCPU_STACKS", "OFFCPU_START", "OFFCPU_SLOW"] {
            loader.map_max_entries(map, 1);
        }
    }
    if let Some(hz) = max_hz {
        let entries = aggregation_entries(hz, std::thread::available_parallelism().map_or(1, usize::from));
        loader.map_max_entries("COUNTS_0", entries);
        loader.map_max_entries("COUNTS_1", entries);
    }
    crate::memory::size_maps(&mut loader, memory);
    let mut ebpf = loader.load(OBJECT)?;
    // The programs, loaded later, refer to the log map by its descriptor:
    // the logger that owns it must live as long as they do, so it is only
    // taken when a runtime will keep forwarding (not in plain unit tests).
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => spawn_log_forwarder(&handle, logger),
            Err(e) => warn!("eBPF logs will not be shown: {e}"),
        }
    }
    Ok(ebpf)
}

/// Entries of each aggregation generation for sampling at `hz`: a drain
/// interval (1 s) cannot hold more distinct (thread, stacks) keys than
/// samples, and cpu-clock samples are bounded by CPU time (`cpus` x `hz`
/// per second); twice that, between 4096 and the object's 16384.
pub fn aggregation_entries(hz: u64, cpus: usize) -> u32 {
    let need = hz.saturating_mul(cpus as u64).saturating_mul(2);
    need.next_power_of_two().clamp(4096, 16384) as u32
}

/// The object with both generations of the aggregation map shrunk to
/// `entries`, and no logger started (tests drive their own).
#[cfg(test)]
pub fn load_with_aggregation_entries(entries: u32) -> Result<Ebpf, BpfError> {
    raise_memlock();
    let layouts = crate::layout::layouts();
    Ok(EbpfLoader::new()
        .map_max_entries("STACK_SAMPLES", 4096)
        .override_global("TCP_LAYOUT", &layouts.tcp, true)
        .override_global("SCHED_LAYOUT", &layouts.sched, true)
        .override_global("CRASH_LAYOUT", &layouts.crash, true)
        .override_global("MEM_LAYOUT", &layouts.memory, true)
        .map_max_entries("COUNTS_0", entries)
        .map_max_entries("COUNTS_1", entries)
        .load(OBJECT)?)
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; newer ones (and
/// this platform, where raising it is refused) account it by memcg.
fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a valid rlimit struct.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
    if ret != 0 {
        debug!(
            "cannot raise RLIMIT_MEMLOCK ({}); relying on memcg accounting of BPF memory",
            std::io::Error::last_os_error()
        );
    }
}

/// aya-log records arrive in a ring buffer; poll it from the runtime.
fn spawn_log_forwarder(handle: &tokio::runtime::Handle, logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    handle.spawn(async move {
        // SAFETY: the logger owns its ring buffer's fd for as long as the
        // AsyncFd owns the logger, and as_raw_fd always returns that fd.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        };
        let mut fd = match registered {
            Ok(fd) => fd,
            Err(e) => {
                warn!("cannot poll eBPF logs: {e}");
                return;
            }
        };
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

#[cfg(test)]
mod tests {
    /// Test that the aggregation maps are sized by rate and CPUs, within
    /// the object's bounds.
    #[test]
    fn aggregation_sizes() {
        assert_eq!(super::aggregation_entries(99, 2), 4096);
        assert_eq!(super::aggregation_entries(999, 2), 4096);
        assert_eq!(super::aggregation_entries(2_999, 2), 16384);
        assert_eq!(super::aggregation_entries(20_000, 64), 16384);
    }
}

//! Per-thread software cpu-clock events with our BPF program attached.
//!
//! aya's `PerfEvent::attach` hides the perf fd inside a BPF link; we need the
//! fd itself to change the sampling period in place (PERF_EVENT_IOC_PERIOD),
//! so the event is opened here and the program attached with
//! PERF_EVENT_IOC_SET_BPF.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
};

use perf_event_open_sys as sys;

/// One perf event on one thread. Closing it (drop) detaches the program from
/// the thread and from every thread that inherited it.
#[derive(Debug)]
pub struct ThreadEvent {
    fd: OwnedFd,
    /// The thread it was opened on.
    pub tid: u32,
}

impl ThreadEvent {
    /// Opens a cpu-clock event on `tid` that samples every `period_ns` of the
    /// thread's CPU time, inherited by threads and children it creates later
    /// (as `perf record -p` does), with `prog_fd` as its overflow handler.
    pub fn open(tid: u32, period_ns: u64, prog_fd: RawFd) -> io::Result<Self> {
        let mut attr = sys::bindings::perf_event_attr {
            type_: sys::bindings::PERF_TYPE_SOFTWARE,
            size: std::mem::size_of::<sys::bindings::perf_event_attr>() as u32,
            config: u64::from(sys::bindings::PERF_COUNT_SW_CPU_CLOCK),
            ..Default::default()
        };
        attr.__bindgen_anon_1.sample_period = period_ns;
        attr.set_disabled(1);
        attr.set_inherit(1);
        // SAFETY: attr is a fully initialised perf_event_attr of the right size.
        let fd = unsafe {
            sys::perf_event_open(
                &mut attr,
                tid as libc::pid_t,
                -1,
                -1,
                u64::from(sys::bindings::PERF_FLAG_FD_CLOEXEC) as libc::c_ulong,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by the kernel and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let raw = fd.as_raw_fd();
        // SAFETY: raw is a valid perf fd; prog_fd a loaded BPF_PROG_TYPE_PERF_EVENT.
        if unsafe { sys::ioctls::SET_BPF(raw, prog_fd as u32) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: valid perf fd.
        if unsafe { sys::ioctls::ENABLE(raw, 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd, tid })
    }

    /// Changes the sampling period in place. Only this event and threads it
    /// is inherited by *later* see the new period (the kernel does not
    /// propagate PERF_EVENT_IOC_PERIOD to existing inherited children).
    pub fn set_period(&self, period_ns: u64) -> io::Result<()> {
        let value: u64 = period_ns;
        // SAFETY: PERIOD takes a pointer to a u64 (the binding types it as the
        // integer value of that pointer).
        let ret = unsafe { sys::ioctls::PERIOD(self.fd.as_raw_fd(), &value as *const u64 as u64) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl ThreadEvent {
    /// CPU time counted so far, ns: this thread's, plus that of every thread
    /// (live or exited) that inherited the event.
    pub fn read_count(&self) -> io::Result<u64> {
        let mut buf = [0u8; 8];
        // SAFETY: reading 8 bytes into our buffer from a perf fd whose
        // read_format is 0 (a single u64 count).
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n != 8 {
            return Err(io::Error::last_os_error());
        }
        Ok(u64::from_ne_bytes(buf))
    }

    /// Stops sampling (and counting); inherited events follow.
    pub fn disable(&self) -> io::Result<()> {
        // SAFETY: valid perf fd.
        if unsafe { sys::ioctls::DISABLE(self.fd.as_raw_fd(), 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Restarts sampling; inherited events follow.
    pub fn enable(&self) -> io::Result<()> {
        // SAFETY: valid perf fd.
        if unsafe { sys::ioctls::ENABLE(self.fd.as_raw_fd(), 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Period in nanoseconds of CPU time for a frequency in Hz.
pub fn period_for(freq_hz: u64) -> u64 {
    1_000_000_000 / freq_hz.max(1)
}

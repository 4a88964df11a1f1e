//! Threads that are blocked right now, read from /proc without stopping
//! them: their state and wait channel, their kernel stack
//! (/proc/PID/task/TID/stack), and their user stack, unwound from the stack
//! pointer and program counter the kernel saved at the blocking syscall
//! (/proc/PID/task/TID/syscall) over a copy of their stack memory
//! (/proc/PID/mem). This is how a session that starts after a deadlock
//! still shows where the threads are stuck.

use std::{fs, os::unix::fs::FileExt as _};

use framehop::x86_64::CacheX86_64;

use crate::unwind::{FileCache, ProcessUnwinder};

/// A blocked thread, as /proc shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockedThread {
    /// Thread id.
    pub tid: u32,
    /// Thread name.
    pub comm: String,
    /// State letter (S: sleeping, D: uninterruptible).
    pub state: char,
    /// Kernel function it waits in.
    pub wchan: String,
    /// Kernel frames, outermost last (as /proc lists them: leaf first).
    pub kernel_frames: Vec<String>,
    /// User return addresses, leaf first (empty when not readable).
    pub user_ips: Vec<u64>,
    /// How long since it last ran, ms (an estimate from scheduler clocks).
    pub idle_ms: Option<f64>,
}

impl BlockedThread {
    /// Its user stack, for a profile.
    pub fn user_slot(&self) -> crate::aggregate::StackSlot {
        use crate::aggregate::{LostReason, StackSlot};
        if self.user_ips.is_empty() {
            StackSlot::Lost(LostReason::NoUserStack)
        } else {
            StackSlot::Frames(self.user_ips.clone().into())
        }
    }

    /// Its kernel stack (by name: /proc does not show addresses).
    pub fn kernel_slot(&self) -> crate::aggregate::StackSlot {
        let names: Vec<crate::aggregate::FrameName> = self
            .kernel_frames
            .iter()
            .map(|f| format!("{f}_[k]").into())
            .collect();
        if names.is_empty() {
            crate::aggregate::StackSlot::Absent
        } else {
            crate::aggregate::StackSlot::Named(names.into())
        }
    }
}

/// `se.exec_start` of a task, ms (the scheduler clock when it last ran).
/// None when unknown: the scheduler zeroes it when it moves a sleeping task
/// to another CPU (migrate_task_rq_fair), and "now − 0" would be the
/// machine's uptime (seen here: 6 reads in 2000 of a 1 ms sleeper).
fn exec_start(path: &str) -> Option<f64> {
    let ms: f64 = fs::read_to_string(path)
        .ok()?
        .lines()
        .find(|l| l.starts_with("se.exec_start"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    (ms > 0.0).then_some(ms)
}

/// Each CPU's scheduler task clock now, ms, by CPU number (None where it
/// could not be read).
///
/// `se.exec_start` is the task clock of the CPU the task last ran on, and
/// the CPUs' task clocks (which leave out interrupt and steal time) drift
/// apart: 2.2 s between the two CPUs of this VM after 6 h. So the calling
/// thread runs once on each CPU and reads its own `se.exec_start`, set when
/// it was scheduled there; its affinity is restored afterwards.
fn cpu_clocks() -> Vec<Option<f64>> {
    // SAFETY: plain libc calls on a zeroed cpu_set_t of the calling thread.
    unsafe {
        let mut old: libc::cpu_set_t = std::mem::zeroed();
        let size = std::mem::size_of::<libc::cpu_set_t>();
        if libc::sched_getaffinity(0, size, &mut old) != 0 {
            return Vec::new();
        }
        let ncpus = aya::util::online_cpus().map_or(0, |c| c.iter().max().map_or(0, |m| m + 1));
        let mut out = vec![None; ncpus as usize];
        for (cpu, slot) in out.iter_mut().enumerate() {
            let mut one: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut one);
            if libc::sched_setaffinity(0, size, &one) == 0 {
                // Moved (or already there): scheduled on `cpu` since.
                *slot = exec_start("/proc/thread-self/sched");
            }
        }
        libc::sched_setaffinity(0, size, &old);
        out
    }
}

/// Parses /proc/PID/task/TID/syscall: `nr a1 … a6 sp pc` in a syscall,
/// `-1 sp pc` when blocked outside one; returns (sp, pc).
pub fn parse_syscall(text: &str) -> Option<(u64, u64)> {
    let fields: Vec<&str> = text.split_whitespace().collect();
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
    match fields.as_slice() {
        [.., sp, pc] if fields.len() == 9 || fields.len() == 3 => Some((hex(sp)?, hex(pc)?)),
        _ => None,
    }
}

/// Kernel function name of a /proc stack line: `[<0>] futex_wait+0x1/0x2`.
pub fn parse_stack_line(line: &str) -> Option<String> {
    let name = line.split_whitespace().nth(1)?;
    Some(name.split('+').next()?.to_owned())
}

/// Blocked threads (state S or D) of `pid`; `window` bytes of user stack
/// are read for unwinding.
pub fn snapshot(pid: u32, window: usize) -> Vec<BlockedThread> {
    let Ok(tids) = crate::target::threads(pid) else {
        return Vec::new();
    };
    let now = cpu_clocks();
    let mem = fs::File::open(format!("/proc/{pid}/mem")).ok();
    let mut unwinder = ProcessUnwinder::default();
    let mut files = FileCache::default();
    unwinder.refresh(pid, &mut files);
    let mut cache = CacheX86_64::new();
    let mut out = Vec::new();
    for tid in tids {
        let base = format!("/proc/{pid}/task/{tid}");
        let Ok(stat) = crate::target::ProcStat::read_path(&format!("{base}/stat")) else {
            continue;
        };
        if !matches!(stat.state, 'S' | 'D') {
            continue;
        }
        let kernel_frames: Vec<String> = fs::read_to_string(format!("{base}/stack"))
            .unwrap_or_default()
            .lines()
            .filter_map(parse_stack_line)
            .collect();
        let wchan = fs::read_to_string(format!("{base}/wchan")).unwrap_or_default();
        let mut user_ips = Vec::new();
        if let (Some((sp, pc)), Some(mem)) = (
            parse_syscall(&fs::read_to_string(format!("{base}/syscall")).unwrap_or_default()),
            &mem,
        ) {
            let mut buf = vec![0u8; window];
            let mut len = window;
            // Shrink until the read stays inside the thread's stack mapping.
            while len >= 512 && mem.read_exact_at(&mut buf[..len], sp).is_err() {
                len /= 2;
            }
            if len >= 512 {
                if !unwinder.knows(pc) {
                    unwinder.refresh(pid, &mut files);
                }
                // rbp is not saved by /proc: frames that need it end the walk.
                user_ips = unwinder.unwind(&mut cache, pc, sp, 0, &buf[..len]).0;
            } else {
                user_ips.push(pc);
            }
        }
        // Its CPU's clock: the CPUs' task clocks differ by seconds here.
        let idle_ms = now
            .get(stat.processor as usize)
            .copied()
            .flatten()
            .zip(exec_start(&format!("{base}/sched")))
            .map(|(n, t)| (n - t).max(0.0));
        out.push(BlockedThread {
            tid,
            comm: stat.comm,
            state: stat.state,
            wchan,
            kernel_frames,
            user_ips,
            idle_ms,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test the /proc syscall and stack line formats.
    #[test]
    fn proc_formats() {
        let s = "230 0x0 0x0 0x7ffed3a7fe70 0x7ffed3a7feb0 0x0 0x0 0x7ffed3a7fe58 0x7f8ea6700503\n";
        assert_eq!(parse_syscall(s), Some((0x7ffed3a7fe58, 0x7f8ea6700503)));
        assert_eq!(parse_syscall("-1 0x7ffe00 0x401000"), Some((0x7ffe00, 0x401000)));
        assert_eq!(parse_syscall("running"), None);
        assert_eq!(
            parse_stack_line("[<0>] futex_wait_queue+0x60/0x90").as_deref(),
            Some("futex_wait_queue")
        );
    }

    /// Test that a zeroed `se.exec_start` (a sleeping task the scheduler
    /// moved) is no estimate, not an idle time as long as the uptime.
    #[test]
    fn zeroed_exec_start_is_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sched");
        let line =
            |v: &str| format!("x (1, #threads: 1)\n---\nse.exec_start                                :{v}\n");
        std::fs::write(&path, line("         0.000000")).unwrap();
        assert_eq!(exec_start(path.to_str().unwrap()), None);
        std::fs::write(&path, line("  23139512.250000")).unwrap();
        assert_eq!(exec_start(path.to_str().unwrap()), Some(23139512.25));
    }

    /// Test that a thread sleeping in nanosleep is seen blocked, in the
    /// kernel's nanosleep, with a user stack that reaches its caller.
    #[test]
    fn sees_a_sleeping_thread() {
        if !crate::testutil::privileged(
            "sees_a_sleeping_thread",
            "reading other processes' /proc files needs root",
        ) {
            return;
        }
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        std::thread::sleep(std::time::Duration::from_millis(300));
        let threads = snapshot(child.id(), 16 * 1024);
        let _ = child.kill();
        let _ = child.wait();
        let t = threads.first().expect("one blocked thread");
        assert_eq!(t.state, 'S');
        assert!(t.kernel_frames.iter().any(|f| f.contains("nanosleep")), "{t:?}");
        assert!(t.user_ips.len() >= 2, "unwound past the syscall wrapper: {t:?}");
        // At most the test's own delays: not another CPU's clock (seconds off).
        assert!(t.idle_ms.is_some_and(|ms| (200.0..1500.0).contains(&ms)), "{t:?}");
    }
}

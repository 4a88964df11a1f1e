//! flamewatch's kernel side. Entry points only: each calls a `try_*` function
//! and maps its result to the program's return value.
#![no_std]
#![no_main]

mod crash;
mod heap;
mod leaf;
mod maps;
mod memory;
mod offcpu;
mod probe;
mod sampling;
mod tcp;

use aya_ebpf::{macros::perf_event, programs::PerfEventContext};

/// Sampling program, attached by the agent to per-thread cpu-clock events.
#[perf_event]
pub fn flamewatch_sample(ctx: PerfEventContext) -> u32 {
    let _ = sampling::try_sample(&ctx);
    // 0: the perf core does not write the sample to a ring buffer (we have none).
    0
}

/// TCP state changes (`sock/inet_sock_set_state`), attached by the agent's
/// TCP tracker.
#[aya_ebpf::macros::tracepoint]
pub fn flamewatch_tcp_state(ctx: aya_ebpf::programs::TracePointContext) -> u32 {
    let _ = tcp::try_set_state(&ctx);
    // A tracepoint program's return value is ignored.
    0
}

/// Resets received (`tcp/tcp_receive_reset`).
#[aya_ebpf::macros::tracepoint]
pub fn flamewatch_tcp_rst_in(ctx: aya_ebpf::programs::TracePointContext) -> u32 {
    let _ = tcp::try_receive_reset(&ctx);
    0
}

/// Resets sent (`tcp/tcp_send_reset`).
#[aya_ebpf::macros::tracepoint]
pub fn flamewatch_tcp_rst_out(ctx: aya_ebpf::programs::TracePointContext) -> u32 {
    let _ = tcp::try_send_reset(&ctx);
    0
}

/// Context switches (`sched/sched_switch`), attached for off-CPU and wall
/// profiles.
#[aya_ebpf::macros::tracepoint]
pub fn flamewatch_offcpu(ctx: aya_ebpf::programs::TracePointContext) -> u32 {
    let _ = offcpu::try_sched_switch(&ctx);
    0
}

/// Fatal signals of target threads (`signal/signal_generate`).
#[aya_ebpf::macros::tracepoint]
pub fn flamewatch_crash_signal(ctx: aya_ebpf::programs::TracePointContext) -> u32 {
    let _ = crash::try_signal_generate(&ctx);
    0
}

/// Target threads' last user page fault (`exceptions/page_fault_user`).
#[aya_ebpf::macros::tracepoint]
pub fn flamewatch_crash_fault(ctx: aya_ebpf::programs::TracePointContext) -> u32 {
    let _ = crash::try_page_fault_user(&ctx);
    0
}

/// OOM kills of targets (`oom/mark_victim`).
#[aya_ebpf::macros::tracepoint]
pub fn flamewatch_crash_oom(ctx: aya_ebpf::programs::TracePointContext) -> u32 {
    let _ = crash::try_mark_victim(&ctx);
    0
}

/// Exit statuses of targets (`syscalls/sys_enter_exit_group`).
#[aya_ebpf::macros::tracepoint]
pub fn flamewatch_crash_exit_group(ctx: aya_ebpf::programs::TracePointContext) -> u32 {
    let _ = crash::try_exit_group(&ctx);
    0
}

/// Exits of targets' last threads (`sched/sched_process_exit`).
#[aya_ebpf::macros::tracepoint]
pub fn flamewatch_crash_exit(ctx: aya_ebpf::programs::TracePointContext) -> u32 {
    let _ = crash::try_process_exit(&ctx);
    0
}

// ---- Memory profiles (ebpf/src/memory.rs, ebpf/src/heap.rs) ----

/// New anonymous pages (`exceptions/page_fault_user`), memory mode.
#[aya_ebpf::macros::tracepoint]
pub fn flamewatch_mem_fault(ctx: aya_ebpf::programs::TracePointContext) -> u32 {
    let _ = memory::try_page_fault(&ctx);
    0
}

/// Anonymous mmap (`syscalls/sys_enter_mmap`), memory mode.
#[aya_ebpf::macros::tracepoint]
pub fn flamewatch_mem_mmap(ctx: aya_ebpf::programs::TracePointContext) -> u32 {
    let _ = memory::try_mmap(&ctx);
    0
}

/// Heap extension (`syscalls/sys_enter_brk`), memory mode.
#[aya_ebpf::macros::tracepoint]
pub fn flamewatch_mem_brk(ctx: aya_ebpf::programs::TracePointContext) -> u32 {
    let _ = memory::try_brk(&ctx);
    0
}

/// malloc(size), and jemalloc's/tcmalloc's; also valloc, pvalloc.
#[aya_ebpf::macros::uprobe]
pub fn flamewatch_heap_malloc(ctx: aya_ebpf::programs::ProbeContext) -> u32 {
    let size: u64 = ctx.arg(0).unwrap_or(0);
    let _ = heap::on_alloc(&ctx, size, 0);
    0
}

/// calloc(n, size).
#[aya_ebpf::macros::uprobe]
pub fn flamewatch_heap_calloc(ctx: aya_ebpf::programs::ProbeContext) -> u32 {
    let n: u64 = ctx.arg(0).unwrap_or(0);
    let size: u64 = ctx.arg(1).unwrap_or(0);
    let _ = heap::on_alloc(&ctx, n.wrapping_mul(size), 0);
    0
}

/// realloc(ptr, size): a free of `ptr` and an allocation of `size`.
#[aya_ebpf::macros::uprobe]
pub fn flamewatch_heap_realloc(ctx: aya_ebpf::programs::ProbeContext) -> u32 {
    let ptr: u64 = ctx.arg(0).unwrap_or(0);
    let size: u64 = ctx.arg(1).unwrap_or(0);
    let _ = heap::on_free(ptr);
    let _ = heap::on_alloc(&ctx, size, 0);
    0
}

/// memalign(align, size) and aligned_alloc(align, size).
#[aya_ebpf::macros::uprobe]
pub fn flamewatch_heap_memalign(ctx: aya_ebpf::programs::ProbeContext) -> u32 {
    let size: u64 = ctx.arg(1).unwrap_or(0);
    let _ = heap::on_alloc(&ctx, size, 0);
    0
}

/// posix_memalign(memptr, align, size): the pointer is written to *memptr.
#[aya_ebpf::macros::uprobe]
pub fn flamewatch_heap_posix_memalign(ctx: aya_ebpf::programs::ProbeContext) -> u32 {
    let memptr: u64 = ctx.arg(0).unwrap_or(0);
    let size: u64 = ctx.arg(2).unwrap_or(0);
    let _ = heap::on_alloc(&ctx, size, memptr);
    0
}

/// free(ptr).
#[aya_ebpf::macros::uprobe]
pub fn flamewatch_heap_free(ctx: aya_ebpf::programs::ProbeContext) -> u32 {
    let ptr: u64 = ctx.arg(0).unwrap_or(0);
    let _ = heap::on_free(ptr);
    0
}

/// Return of every allocating function above.
#[aya_ebpf::macros::uretprobe]
pub fn flamewatch_heap_ret(ctx: aya_ebpf::programs::RetProbeContext) -> u32 {
    let _ = heap::on_return(&ctx);
    0
}

/// Function entry of a latency probe (the cookie is its slot).
#[aya_ebpf::macros::uprobe]
pub fn flamewatch_probe_entry(ctx: aya_ebpf::programs::ProbeContext) -> u32 {
    let _ = probe::try_enter(&ctx);
    0
}

/// Function return of a latency probe.
#[aya_ebpf::macros::uretprobe]
pub fn flamewatch_probe_return(ctx: aya_ebpf::programs::RetProbeContext) -> u32 {
    let _ = probe::try_return(&ctx);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

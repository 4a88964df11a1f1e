//! flamewatch's kernel side. Entry points only: each calls a `try_*` function
//! and maps its result to the program's return value.
#![no_std]
#![no_main]

mod leaf;
mod maps;
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

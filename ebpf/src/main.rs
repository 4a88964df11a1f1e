//! flamewatch's kernel side. Entry points only: each calls a `try_*` function
//! and maps its result to the program's return value.
#![no_std]
#![no_main]

mod maps;
mod sampling;

use aya_ebpf::{macros::perf_event, programs::PerfEventContext};

/// Sampling program, attached by the agent to per-thread cpu-clock events.
#[perf_event]
pub fn flamewatch_sample(ctx: PerfEventContext) -> u32 {
    let _ = sampling::try_sample(&ctx);
    // 0: the perf core does not write the sample to a ring buffer (we have none).
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

//! TCP state tracking: the `sock/inet_sock_set_state` tracepoint (every TCP
//! state change of the machine) and the `tcp/tcp_receive_reset` /
//! `tcp/tcp_send_reset` tracepoints, kept per target process.
//!
//! **Attribution.** The tracepoint runs in whatever context changed the
//! state: the owner's system call for connect/listen/close, but softirq (the
//! *peer's* process, or nobody's) for everything driven by incoming segments.
//! So the current pid is trusted only for transitions that only happen in
//! the owner's system call ([`owner_context`]); they record socket → tgid in
//! `TCP_SOCKS`. Every other transition looks the socket up there. A
//! connection arriving on a target's listening port (`TCP_LISTEN`) is the
//! target's from its first transition (LISTEN → SYN_RECV of the child
//! socket). The entry is forgotten at CLOSE: socket memory is reused at once.
//!
//! **TIME_WAIT.** A socket entering TIME_WAIT is replaced by an
//! `inet_timewait_sock` and the full socket is closed: the tracepoint shows
//! FIN_WAIT2 → CLOSE (or CLOSING → CLOSE), never `newstate` TIME_WAIT
//! (tcp_time_wait() then tcp_done(), net/ipv4/tcp_minisocks.c). The same
//! transitions also happen when a reset kills the socket: a reset received
//! marks the socket first (tcp_reset() traces before tcp_done(),
//! net/ipv4/tcp_input.c); a reset *sent* on an abortive close comes after
//! the kernel set CLOSE (tcp_disconnect(), net/ipv4/tcp.c), so closes are
//! remembered briefly in `TCP_RECENT_CLOSE` and such a TIME_WAIT entry is
//! withdrawn (`time_wait_reset_after`).
//!
//! Field offsets are the running kernel's: the agent reads them from the
//! format files (/sys/kernel/tracing/events/<category>/<name>/format) and
//! sets them in `TCP_LAYOUT` at load. Tracepoint programs may load from
//! their record directly only at constant offsets, and not the first 8
//! bytes (the `common_*` header: tp_prog_is_valid_access(),
//! kernel/trace/bpf_trace.c); a read-only global is such a constant, and
//! [`field_at`] falls back to a helper copy where the kernel's offset is not
//! the one compiled in.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    programs::TracePointContext,
};
use flamewatch_common::tcp::{
    event_kind,
    layout::{receive_reset, send_reset, set_state},
    send_reset_form, sock_flags, state, tcp_config_index, tcp_events, TcpEvent, TcpLayout, TcpRecentClose,
    TcpSock, TcpStats, TCP_STATES,
};

use crate::maps::{
    field_at, layout_offset, TCP_CONFIG, TCP_EVENTS, TCP_EVENTS_BYTES, TCP_GLOBAL, TCP_LISTEN,
    TCP_RECENT_CLOSE, TCP_SOCKS, TCP_STATS, TCP_TARGETS,
};

const IPPROTO_TCP: u16 = 6;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// A reset sent after CLOSE belongs to that close only if it follows within
/// this window (it is sent by the same function a few µs later; the ports
/// must match too).
const RESET_AFTER_CLOSE_NS: u64 = 1_000_000_000;

/// This kernel's offsets of the TCP tracepoints' fields, set by the agent at
/// load (read-only: constants to the verifier).
#[unsafe(no_mangle)]
static TCP_LAYOUT: TcpLayout = TcpLayout::DEFAULT;

/// A field of `TCP_LAYOUT` read at its offset, `compiled` being the offset
/// the direct load is built for.
macro_rules! tp {
    ($ctx:expr, $t:ty, $field:ident, $compiled:expr) => {{
        let offset = layout_offset!(TCP_LAYOUT.$field);
        // SAFETY: the offset is this kernel's for a field of type $t (the
        // agent read it from the format file); $compiled is the 6.18 one.
        unsafe { field_at::<$t>($ctx, offset, $compiled) }
    }};
}

/// Reads 16 address bytes at `offset` (two direct loads at the 8-byte
/// aligned offset compiled for).
#[inline(always)]
unsafe fn addr16(ctx: &TracePointContext, offset: usize, compiled: usize) -> [u8; 16] {
    // SAFETY: as for `field_at`, for two u64 halves.
    let (lo, hi): (u64, u64) = unsafe {
        (
            field_at(ctx, offset, compiled),
            if offset == 0 {
                0
            } else {
                field_at(ctx, offset + 8, compiled + 8)
            },
        )
    };
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&lo.to_ne_bytes());
    out[8..].copy_from_slice(&hi.to_ne_bytes());
    out
}

/// Transitions made only in the owner's system call, where the current
/// process is the socket's owner: connect() (CLOSE → SYN_SENT, in
/// tcp_v4_connect/tcp_v6_connect), listen() (CLOSE → LISTEN), and close() or
/// shutdown() (ESTABLISHED → FIN_WAIT1, CLOSE_WAIT → LAST_ACK, in
/// tcp_close_state()).
#[inline(always)]
fn owner_context(old: u8, new: u8) -> bool {
    matches!(
        (old, new),
        (state::CLOSE, state::SYN_SENT)
            | (state::CLOSE, state::LISTEN)
            | (state::ESTABLISHED, state::FIN_WAIT1)
            | (state::CLOSE_WAIT, state::LAST_ACK)
    )
}

/// A new socket: whatever `TCP_SOCKS` holds for this address is stale.
#[inline(always)]
fn is_birth(old: u8, new: u8) -> bool {
    old == state::CLOSE || (old == state::LISTEN && new == state::SYN_RECV)
}

/// CLOCK_MONOTONIC, ns.
#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: the helper has no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// "Not a target" in slot values. Attribution keeps plain integers rather
/// than `Option`s: LLVM may carry the undefined payload of a `None` in a
/// register, which the verifier rejects as an uninitialized read
/// ("R4 !read_ok").
const NO_SLOT: u32 = u32::MAX;
/// "No owner" in tgid values (no process has tgid 0 in user space).
const NO_TGID: u32 = 0;

/// The slot of a target, or [`NO_SLOT`].
#[inline(always)]
fn slot_of(tgid: u32) -> u32 {
    // SAFETY: plain lookup of a Copy value.
    unsafe { TCP_TARGETS.get(&tgid) }.copied().unwrap_or(NO_SLOT)
}

/// The target listening on `port`, or [`NO_TGID`].
#[inline(always)]
fn listen_owner(port: u16) -> u32 {
    // SAFETY: plain lookup of a Copy value.
    unsafe { TCP_LISTEN.get(&u32::from(port)) }
        .copied()
        .unwrap_or(NO_TGID)
}

#[inline(always)]
fn event_mask() -> u32 {
    TCP_CONFIG.get(tcp_config_index::EVENTS).copied().unwrap_or(0)
}

/// Sends `event` to the agent; a full ring is counted in `stats`. The agent
/// reads every 100 ms; wake it early only when a quarter is filled, so a
/// busy machine costs one wake-up per 4 Ki events, not one per event.
#[inline(always)]
fn emit(event: TcpEvent, stats: &mut TcpStats) {
    match TCP_EVENTS.reserve::<TcpEvent>(0) {
        Some(mut entry) => {
            entry.write(event);
            let flags = if TCP_EVENTS.query(u64::from(BPF_RB_AVAIL_DATA)) >= u64::from(TCP_EVENTS_BYTES / 4) {
                BPF_RB_FORCE_WAKEUP
            } else {
                BPF_RB_NO_WAKEUP
            };
            entry.submit(u64::from(flags));
        }
        None => stats.lost_events += 1,
    }
}

/// `sock/inet_sock_set_state`.
pub fn try_set_state(ctx: &TracePointContext) -> Result<(), i64> {
    let (protocol, old, new, skaddr, sport, dport) = (
        tp!(ctx, u16, ss_protocol, set_state::PROTOCOL),
        tp!(ctx, i32, ss_oldstate, set_state::OLDSTATE),
        tp!(ctx, i32, ss_newstate, set_state::NEWSTATE),
        tp!(ctx, u64, ss_skaddr, set_state::SKADDR),
        tp!(ctx, u16, ss_sport, set_state::SPORT),
        tp!(ctx, u16, ss_dport, set_state::DPORT),
    );
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    if let Some(global) = TCP_GLOBAL.get_ptr_mut(0) {
        // SAFETY: per-CPU value; BPF programs do not nest on a CPU.
        unsafe { (*global).transitions += 1 };
    }
    if old < 0 || new < 0 || old >= TCP_STATES as i32 || new >= TCP_STATES as i32 {
        return Ok(());
    }
    let (old, new) = (old as u8, new as u8);

    // Who owns the socket?
    let birth = is_birth(old, new);
    let current = (bpf_get_current_pid_tgid() >> 32) as u32;
    let sock = TCP_SOCKS.get_ptr_mut(&skaddr);
    let known = sock.is_some();
    // SAFETY: pointer into the map's value, copied once.
    let entry: TcpSock = sock.map(|p| unsafe { *p }).unwrap_or_default();
    let mut tgid = NO_TGID;
    let mut slot = NO_SLOT;
    if owner_context(old, new) {
        slot = slot_of(current);
        if slot != NO_SLOT {
            tgid = current;
        }
    }
    if slot == NO_SLOT && !birth && known {
        tgid = entry.tgid;
        slot = slot_of(tgid);
    }
    if slot == NO_SLOT && (!birth || old == state::LISTEN) {
        // A connection on a target's listening port was accepted by it
        // (from its first transition, LISTEN -> SYN_RECV of the child).
        let owner = listen_owner(sport);
        if owner != NO_TGID {
            tgid = owner;
            slot = slot_of(owner);
        }
    }
    if slot == NO_SLOT {
        if birth && known {
            // A stale entry would attribute this non-target socket.
            let _ = TCP_SOCKS.remove(&skaddr);
        }
        return Ok(());
    }
    // The map's entry describes this socket (not a stale one) and its owner.
    let entry_valid = known && !birth && entry.tgid == tgid;
    let Some(stats) = TCP_STATS.get_ptr_mut(slot) else {
        return Ok(());
    };
    // SAFETY: per-CPU value; BPF programs do not nest on a CPU
    // (trace_call_bpf() skips a program started while one runs).
    let stats: &mut TcpStats = unsafe { &mut *stats };
    stats.events += 1;
    let index = usize::from(old) * TCP_STATES + usize::from(new);
    // LLVM knows index < 169 from the checks above and drops a plain bound
    // check, but the verifier lost that bound (the checks ran on other
    // registers): check again on a value LLVM cannot see through.
    // SAFETY: reading a local.
    let index = unsafe { core::ptr::read_volatile(&index) };
    if let Some(count) = stats.transitions.get_mut(index) {
        *count += 1;
    }
    match (old, new) {
        (state::SYN_SENT, state::ESTABLISHED) => stats.active_opens += 1,
        (state::SYN_RECV, state::ESTABLISHED) => stats.passive_opens += 1,
        (state::SYN_SENT, state::CLOSE) => stats.connect_failures += 1,
        _ => {}
    }

    let mut kind = event_kind::STATE;
    if new == state::CLOSE {
        if matches!(
            old,
            state::ESTABLISHED
                | state::FIN_WAIT1
                | state::FIN_WAIT2
                | state::CLOSING
                | state::CLOSE_WAIT
                | state::LAST_ACK
        ) {
            stats.closed += 1;
        }
        let reset = entry_valid && entry.flags & sock_flags::RESET != 0;
        let time_wait = matches!(old, state::FIN_WAIT2 | state::CLOSING) && !reset;
        if time_wait {
            stats.time_wait_closes += 1;
            kind = event_kind::TIME_WAIT;
        }
        if old == state::LISTEN && listen_owner(sport) == tgid {
            let _ = TCP_LISTEN.remove(&u32::from(sport));
        }
        if known {
            let _ = TCP_SOCKS.remove(&skaddr);
        }
        let recent = TcpRecentClose {
            ts_ns: now_ns(),
            tgid,
            sport,
            dport,
            time_wait: u32::from(time_wait),
            _pad: 0,
        };
        // An LRU map: the insert only fails on a kernel allocation failure.
        let _ = TCP_RECENT_CLOSE.insert(&skaddr, &recent, 0);
    } else {
        if new == state::LISTEN
            && listen_owner(sport) != tgid
            && TCP_LISTEN.insert(&u32::from(sport), &tgid, 0).is_err()
        {
            if let Some(global) = TCP_GLOBAL.get_ptr_mut(0) {
                // SAFETY: per-CPU value.
                unsafe { (*global).listen_map_full += 1 };
            }
        }
        // Remember the socket unless the map already says so.
        if !entry_valid && TCP_SOCKS.insert(&skaddr, &TcpSock { tgid, flags: 0 }, 0).is_err() {
            stats.untracked_sockets += 1;
            if crate::maps::may_log() {
                aya_log_ebpf::warn!(
                    ctx,
                    "TCP socket map full: sockets of pid {} go untracked (counted as untracked_sockets)",
                    tgid
                );
            }
        }
    }

    let mask = event_mask();
    if mask & tcp_events::ALL != 0 || (kind == event_kind::TIME_WAIT && mask & tcp_events::TIME_WAIT != 0) {
        let family = tp!(ctx, u16, ss_family, set_state::FAMILY);
        let (s_off, d_off) = (
            layout_offset!(TCP_LAYOUT.ss_saddr_v6),
            layout_offset!(TCP_LAYOUT.ss_daddr_v6),
        );
        // SAFETY: this kernel's offsets of the addresses.
        let (saddr, daddr) = unsafe {
            (
                addr16(ctx, s_off, set_state::SADDR_V6),
                addr16(ctx, d_off, set_state::DADDR_V6),
            )
        };
        emit(
            TcpEvent {
                ts_ns: now_ns(),
                tgid,
                kind,
                oldstate: old,
                newstate: new,
                family: family as u8,
                sport,
                dport,
                _pad: 0,
                saddr,
                daddr,
            },
            stats,
        );
    }
    Ok(())
}

/// The owner of a socket a reset concerns, as (tgid, slot): the socket
/// map, else the listening port; `slot` is [`NO_SLOT`] for others. Marks the
/// socket so its close is not a TIME_WAIT entry.
#[inline(always)]
fn reset_owner(skaddr: u64, sport: u16) -> (u32, u32) {
    if let Some(p) = TCP_SOCKS.get_ptr_mut(&skaddr) {
        // SAFETY: pointer into the map's value; a racing writer on another
        // CPU can only set the same bit.
        let tgid = unsafe {
            (*p).flags |= sock_flags::RESET;
            (*p).tgid
        };
        return (tgid, slot_of(tgid));
    }
    let tgid = listen_owner(sport);
    if tgid == NO_TGID {
        return (NO_TGID, NO_SLOT);
    }
    let slot = slot_of(tgid);
    if slot == NO_SLOT {
        return (NO_TGID, NO_SLOT);
    }
    let entry = TcpSock {
        tgid,
        flags: sock_flags::RESET,
    };
    if TCP_SOCKS.insert(&skaddr, &entry, 0).is_err() {
        if let Some(stats) = TCP_STATS.get_ptr_mut(slot) {
            // SAFETY: per-CPU value.
            unsafe { (*stats).untracked_sockets += 1 };
        }
    }
    (tgid, slot)
}

/// `tcp/tcp_receive_reset`: fired by tcp_reset() before the socket closes.
pub fn try_receive_reset(ctx: &TracePointContext) -> Result<(), i64> {
    let (skaddr, sport, dport) = (
        tp!(ctx, u64, rr_skaddr, receive_reset::SKADDR),
        tp!(ctx, u16, rr_sport, receive_reset::SPORT),
        tp!(ctx, u16, rr_dport, receive_reset::DPORT),
    );
    let (tgid, slot) = reset_owner(skaddr, sport);
    if slot == NO_SLOT {
        return Ok(());
    }
    let Some(stats) = TCP_STATS.get_ptr_mut(slot) else {
        return Ok(());
    };
    // SAFETY: per-CPU value; BPF programs do not nest on a CPU.
    let stats: &mut TcpStats = unsafe { &mut *stats };
    stats.events += 1;
    stats.resets_received += 1;
    if event_mask() & tcp_events::ALL != 0 {
        // The v6 addresses sit at unaligned offsets: copy them with the
        // probe-read helper (detail mode only).
        let (family, saddr, daddr) = (
            tp!(ctx, u16, rr_family, receive_reset::FAMILY),
            helper_copy16(ctx, layout_offset!(TCP_LAYOUT.rr_saddr_v6)),
            helper_copy16(ctx, layout_offset!(TCP_LAYOUT.rr_daddr_v6)),
        );
        emit(
            TcpEvent {
                ts_ns: now_ns(),
                tgid,
                kind: event_kind::RESET_RECEIVED,
                oldstate: 0,
                newstate: 0,
                family: family as u8,
                sport,
                dport,
                _pad: 0,
                saddr,
                daddr,
            },
            stats,
        );
    }
    Ok(())
}

/// A `sockaddr_in`/`sockaddr_in6` of the tcp_send_reset record as (family,
/// port in host order, address as IPv4-mapped IPv6 or IPv6).
#[inline(always)]
fn sockaddr(
    ctx: &TracePointContext,
    offset: usize,
    compiled: usize,
    with_address: bool,
) -> (u16, u16, [u8; 16]) {
    // SAFETY: sa_family (u16 at +0) and the port (__be16 at +2) of a
    // sockaddr inside the record, 4-byte aligned.
    let (family, port_be) = unsafe {
        (
            field_at::<u16>(ctx, offset, compiled),
            field_at::<u16>(ctx, offset + 2, compiled + 2),
        )
    };
    let mut addr = [0u8; 16];
    if with_address {
        if family == AF_INET {
            // SAFETY: sin_addr at +4, inside the record.
            let v4: [u8; 4] = unsafe { field_at(ctx, offset + 4, compiled + 4) };
            addr[10] = 0xff;
            addr[11] = 0xff;
            addr[12..].copy_from_slice(&v4);
        } else if family == AF_INET6 {
            // SAFETY: sin6_addr at +8 (4-byte aligned only: helper copy).
            addr = helper_copy16(ctx, offset + 8);
        }
    }
    (family, u16::from_be(port_be), addr)
}

/// 16 bytes of the record at `offset` (any alignment), zero if `ABSENT`.
#[inline(always)]
fn helper_copy16(ctx: &TracePointContext, offset: usize) -> [u8; 16] {
    if offset == 0 {
        return [0; 16];
    }
    // SAFETY: bpf_probe_read_kernel of the record.
    unsafe { ctx.read_at::<[u8; 16]>(offset) }.unwrap_or([0; 16])
}

/// (family, local port, remote port) of a tcp_send_reset record, in
/// either of its forms.
#[inline(always)]
fn send_reset_ports(ctx: &TracePointContext) -> (u16, u16, u16) {
    if layout_offset!(TCP_LAYOUT.sr_form) as u32 == send_reset_form::FIELDS {
        // No direct-load offsets compiled for this form: `usize::MAX` never
        // matches, so these are helper copies.
        (
            tp!(ctx, u16, sr_family, usize::MAX),
            tp!(ctx, u16, sr_sport, usize::MAX),
            tp!(ctx, u16, sr_dport, usize::MAX),
        )
    } else {
        let (family, sport, _) = sockaddr(ctx, layout_offset!(TCP_LAYOUT.sr_saddr), send_reset::SADDR, false);
        let (_, dport, _) = sockaddr(ctx, layout_offset!(TCP_LAYOUT.sr_daddr), send_reset::DADDR, false);
        (family, sport, dport)
    }
}

/// (local, remote) addresses of a tcp_send_reset record, in either form.
#[inline(always)]
fn send_reset_addrs(ctx: &TracePointContext) -> ([u8; 16], [u8; 16]) {
    if layout_offset!(TCP_LAYOUT.sr_form) as u32 == send_reset_form::FIELDS {
        (
            helper_copy16(ctx, layout_offset!(TCP_LAYOUT.sr_saddr_v6)),
            helper_copy16(ctx, layout_offset!(TCP_LAYOUT.sr_daddr_v6)),
        )
    } else {
        let (_, _, saddr) = sockaddr(ctx, layout_offset!(TCP_LAYOUT.sr_saddr), send_reset::SADDR, true);
        let (_, _, daddr) = sockaddr(ctx, layout_offset!(TCP_LAYOUT.sr_daddr), send_reset::DADDR, true);
        (saddr, daddr)
    }
}

/// `tcp/tcp_send_reset`: a reset sent on a socket. On an abortive close the
/// kernel sets CLOSE first and sends the reset after (state CLOSE here).
pub fn try_send_reset(ctx: &TracePointContext) -> Result<(), i64> {
    let (skaddr, sk_state) = (
        tp!(ctx, u64, sr_skaddr, send_reset::SKADDR),
        tp!(ctx, i32, sr_state, send_reset::STATE),
    );
    if skaddr == 0 {
        return Ok(());
    }
    let (family, sport, dport) = send_reset_ports(ctx);
    let mut kind = event_kind::RESET_SENT;
    let (tgid, slot) = if sk_state == i32::from(state::CLOSE) {
        let Some(recent) = TCP_RECENT_CLOSE.get_ptr_mut(&skaddr) else {
            return Ok(());
        };
        // SAFETY: pointer into the LRU map's value; this CPU's program is
        // the only one handling this socket's close and reset.
        let recent = unsafe { &mut *recent };
        if recent.sport != sport
            || recent.dport != dport
            || now_ns().wrapping_sub(recent.ts_ns) > RESET_AFTER_CLOSE_NS
        {
            return Ok(());
        }
        if recent.time_wait != 0 {
            recent.time_wait = 0;
            kind = event_kind::TIME_WAIT_CANCELLED;
        }
        (recent.tgid, slot_of(recent.tgid))
    } else {
        reset_owner(skaddr, sport)
    };
    if slot == NO_SLOT {
        return Ok(());
    }
    let Some(stats) = TCP_STATS.get_ptr_mut(slot) else {
        return Ok(());
    };
    // SAFETY: per-CPU value; BPF programs do not nest on a CPU.
    let stats: &mut TcpStats = unsafe { &mut *stats };
    stats.events += 1;
    stats.resets_sent += 1;
    let mask = event_mask();
    if kind == event_kind::TIME_WAIT_CANCELLED {
        stats.time_wait_reset_after += 1;
    }
    if mask & tcp_events::ALL != 0
        || (kind == event_kind::TIME_WAIT_CANCELLED && mask & tcp_events::TIME_WAIT != 0)
    {
        let (saddr, daddr) = send_reset_addrs(ctx);
        emit(
            TcpEvent {
                ts_ns: now_ns(),
                tgid,
                kind,
                oldstate: 0,
                newstate: sk_state as u8,
                family: family as u8,
                sport,
                dport,
                _pad: 0,
                saddr,
                daddr,
            },
            stats,
        );
    }
    Ok(())
}

//! The ABI of TCP state tracking (`ebpf/src/tcp.rs` ↔ `agent/src/tcp/`).
//!
//! States are the kernel's `TCP_*` values (include/net/tcp_states.h), as
//! the `sock/inet_sock_set_state` tracepoint reports them.

/// Number of TCP state values, `0` (unused) to [`state::NEW_SYN_RECV`]:
/// the side of the transition matrix.
pub const TCP_STATES: usize = 13;

/// The kernel's TCP states (include/net/tcp_states.h).
pub mod state {
    /// `TCP_ESTABLISHED`.
    pub const ESTABLISHED: u8 = 1;
    /// `TCP_SYN_SENT`.
    pub const SYN_SENT: u8 = 2;
    /// `TCP_SYN_RECV`.
    pub const SYN_RECV: u8 = 3;
    /// `TCP_FIN_WAIT1`.
    pub const FIN_WAIT1: u8 = 4;
    /// `TCP_FIN_WAIT2`.
    pub const FIN_WAIT2: u8 = 5;
    /// `TCP_TIME_WAIT` (never a `newstate` of the tracepoint: TIME_WAIT lives
    /// in a separate `inet_timewait_sock`).
    pub const TIME_WAIT: u8 = 6;
    /// `TCP_CLOSE`.
    pub const CLOSE: u8 = 7;
    /// `TCP_CLOSE_WAIT`.
    pub const CLOSE_WAIT: u8 = 8;
    /// `TCP_LAST_ACK`.
    pub const LAST_ACK: u8 = 9;
    /// `TCP_LISTEN`.
    pub const LISTEN: u8 = 10;
    /// `TCP_CLOSING`.
    pub const CLOSING: u8 = 11;
    /// `TCP_NEW_SYN_RECV`.
    pub const NEW_SYN_RECV: u8 = 12;
}

/// Field offsets of the tracepoint records the TCP programs read, as the
/// kernel flamewatch is developed on (6.18) lays them out
/// (`/sys/kernel/tracing/events/<category>/<name>/format`). These are the
/// defaults of [`TcpLayout`]: the agent reads each kernel's own offsets from
/// its format files and hands them to the programs as a load-time global.
pub mod layout {
    /// Field offsets of `sock/inet_sock_set_state` (include/trace/events/sock.h).
    pub mod set_state {
        /// `const void *skaddr`.
        pub const SKADDR: usize = 8;
        /// `int oldstate`.
        pub const OLDSTATE: usize = 16;
        /// `int newstate`.
        pub const NEWSTATE: usize = 20;
        /// `__u16 sport` (host order).
        pub const SPORT: usize = 24;
        /// `__u16 dport` (host order).
        pub const DPORT: usize = 26;
        /// `__u16 family`.
        pub const FAMILY: usize = 28;
        /// `__u16 protocol`.
        pub const PROTOCOL: usize = 30;
        /// `__u8 saddr_v6[16]` (IPv4 stored mapped).
        pub const SADDR_V6: usize = 40;
        /// `__u8 daddr_v6[16]`.
        pub const DADDR_V6: usize = 56;
    }

    /// Field offsets of `tcp/tcp_receive_reset` (include/trace/events/tcp.h).
    pub mod receive_reset {
        /// `const void *skaddr`.
        pub const SKADDR: usize = 8;
        /// `__u16 sport` (host order).
        pub const SPORT: usize = 16;
        /// `__u16 dport` (host order).
        pub const DPORT: usize = 18;
        /// `__u16 family`.
        pub const FAMILY: usize = 20;
        /// `__u8 saddr_v6[16]` (not 8-byte aligned: read with a helper).
        pub const SADDR_V6: usize = 30;
        /// `__u8 daddr_v6[16]`.
        pub const DADDR_V6: usize = 46;
    }

    /// Field offsets of `tcp/tcp_send_reset` (include/trace/events/tcp.h).
    /// Since 6.10 the addresses are `sockaddr`s; before, the record has
    /// `sport`, `dport`, `family` and `saddr_v6`/`daddr_v6` fields
    /// ([`super::send_reset_form`]).
    pub mod send_reset {
        /// `const void *skaddr` (NULL for a reply to a segment without socket).
        pub const SKADDR: usize = 16;
        /// `int state`: the socket's state when the reset is sent.
        pub const STATE: usize = 24;
        /// `__u8 saddr[28]`: a `sockaddr_in` or `sockaddr_in6` (local side).
        pub const SADDR: usize = 32;
        /// `__u8 daddr[28]`: the remote side.
        pub const DADDR: usize = 60;
    }

    /// `sched/sched_switch` (include/trace/events/sched.h).
    pub mod sched_switch {
        /// `long prev_state`.
        pub const PREV_STATE: usize = 32;
        /// `pid_t next_pid`.
        pub const NEXT_PID: usize = 56;
    }
}

/// How `tcp/tcp_send_reset` carries its addresses ([`TcpLayout::sr_form`]).
pub mod send_reset_form {
    /// `saddr`/`daddr` are 28-byte `sockaddr_in`/`sockaddr_in6` (6.10+).
    pub const SOCKADDR: u32 = 0;
    /// `sport`, `dport`, `family`, `saddr_v6`, `daddr_v6` fields (before 6.10).
    pub const FIELDS: u32 = 1;
}

/// A field this kernel's record does not have: the program reads zero.
pub const ABSENT: u32 = 0;

/// Offsets of every TCP tracepoint field the programs read, in this
/// kernel's records: the `TCP_LAYOUT` global of the object, set by the agent
/// at load from the format files. A read-only global is a constant to the
/// verifier, so the programs take the direct-load path of the offset
/// compiled for ([`layout`]) and a helper copy for any other. Offsets of
/// absent optional fields are [`ABSENT`]. Prefixes: `ss_` set_state, `rr_`
/// receive_reset, `sr_` send_reset.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct TcpLayout {
    pub ss_skaddr: u32,
    pub ss_oldstate: u32,
    pub ss_newstate: u32,
    pub ss_sport: u32,
    pub ss_dport: u32,
    pub ss_family: u32,
    pub ss_protocol: u32,
    pub ss_saddr_v6: u32,
    pub ss_daddr_v6: u32,
    pub rr_skaddr: u32,
    pub rr_sport: u32,
    pub rr_dport: u32,
    pub rr_family: u32,
    pub rr_saddr_v6: u32,
    pub rr_daddr_v6: u32,
    pub sr_skaddr: u32,
    pub sr_state: u32,
    /// [`send_reset_form`].
    pub sr_form: u32,
    pub sr_saddr: u32,
    pub sr_daddr: u32,
    pub sr_sport: u32,
    pub sr_dport: u32,
    pub sr_family: u32,
    pub sr_saddr_v6: u32,
    pub sr_daddr_v6: u32,
}

impl TcpLayout {
    /// The layout of [`layout`] (6.18).
    pub const DEFAULT: Self = Self {
        ss_skaddr: layout::set_state::SKADDR as u32,
        ss_oldstate: layout::set_state::OLDSTATE as u32,
        ss_newstate: layout::set_state::NEWSTATE as u32,
        ss_sport: layout::set_state::SPORT as u32,
        ss_dport: layout::set_state::DPORT as u32,
        ss_family: layout::set_state::FAMILY as u32,
        ss_protocol: layout::set_state::PROTOCOL as u32,
        ss_saddr_v6: layout::set_state::SADDR_V6 as u32,
        ss_daddr_v6: layout::set_state::DADDR_V6 as u32,
        rr_skaddr: layout::receive_reset::SKADDR as u32,
        rr_sport: layout::receive_reset::SPORT as u32,
        rr_dport: layout::receive_reset::DPORT as u32,
        rr_family: layout::receive_reset::FAMILY as u32,
        rr_saddr_v6: layout::receive_reset::SADDR_V6 as u32,
        rr_daddr_v6: layout::receive_reset::DADDR_V6 as u32,
        sr_skaddr: layout::send_reset::SKADDR as u32,
        sr_state: layout::send_reset::STATE as u32,
        sr_form: send_reset_form::SOCKADDR,
        sr_saddr: layout::send_reset::SADDR as u32,
        sr_daddr: layout::send_reset::DADDR as u32,
        sr_sport: ABSENT,
        sr_dport: ABSENT,
        sr_family: ABSENT,
        sr_saddr_v6: ABSENT,
        sr_daddr_v6: ABSENT,
    };
}

impl Default for TcpLayout {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Offsets of the `sched/sched_switch` fields the off-CPU program reads:
/// the `SCHED_LAYOUT` global, like [`TcpLayout`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchedLayout {
    /// `long prev_state`.
    pub prev_state: u32,
    /// `pid_t next_pid`.
    pub next_pid: u32,
}

impl SchedLayout {
    /// The layout of [`layout::sched_switch`].
    pub const DEFAULT: Self = Self {
        prev_state: layout::sched_switch::PREV_STATE as u32,
        next_pid: layout::sched_switch::NEXT_PID as u32,
    };
}

impl Default for SchedLayout {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Index of `TCP_CONFIG` (an `Array<u32>`) entries.
pub mod tcp_config_index {
    /// [`super::tcp_events`] bits: which events go to the ring buffer.
    pub const EVENTS: u32 = 0;
}

/// Bits of the `TCP_CONFIG[EVENTS]` word.
pub mod tcp_events {
    /// Send an event for each TIME_WAIT entry of a target (the agent uses
    /// their addresses to attribute TIME_WAIT sockets on ephemeral ports).
    pub const TIME_WAIT: u32 = 1 << 0;
    /// Send every transition and reset of the targets (detail).
    pub const ALL: u32 = 1 << 1;
}

/// Bits of [`TcpSock::flags`].
pub mod sock_flags {
    /// A reset was received or sent on the socket before it closed: its
    /// close is not a TIME_WAIT entry.
    pub const RESET: u32 = 1 << 0;
}

/// What the kernel remembers of a target's socket, keyed by the socket's
/// address in `TCP_SOCKS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpSock {
    /// Owner (tgid).
    pub tgid: u32,
    /// [`sock_flags`] bits.
    pub flags: u32,
}

/// A socket that just went to CLOSE, keyed by its address in
/// `TCP_RECENT_CLOSE`: a reset the kernel sends *after* setting CLOSE
/// (`tcp_disconnect`, `__tcp_close` with unread data) is matched to it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpRecentClose {
    /// `bpf_ktime_get_ns` at the close.
    pub ts_ns: u64,
    /// Owner (tgid).
    pub tgid: u32,
    /// Local port (host order).
    pub sport: u16,
    /// Remote port (host order).
    pub dport: u16,
    /// 1 when the close was counted as a TIME_WAIT entry.
    pub time_wait: u32,
    /// Explicit padding.
    pub _pad: u32,
}

/// Per-target TCP counters (per CPU, summed by the agent), in `TCP_STATS`
/// at the target's slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpStats {
    /// Transition counts, `[old * TCP_STATES + new]`.
    pub transitions: [u64; TCP_STATES * TCP_STATES],
    /// SYN_SENT → ESTABLISHED: connections this target opened.
    pub active_opens: u64,
    /// SYN_RECV → ESTABLISHED: connections accepted on its listening ports.
    pub passive_opens: u64,
    /// Established connections that reached CLOSE.
    pub closed: u64,
    /// SYN_SENT → CLOSE: connects that failed (refused, timed out, no port).
    pub connect_failures: u64,
    /// Resets sent on the target's sockets.
    pub resets_sent: u64,
    /// Resets received on the target's sockets.
    pub resets_received: u64,
    /// FIN_WAIT2 → CLOSE and CLOSING → CLOSE not preceded by a reset: the
    /// socket entered TIME_WAIT.
    pub time_wait_closes: u64,
    /// Of those, closes a reset followed at once (the kernel set CLOSE, then
    /// sent a RST): not a TIME_WAIT entry after all.
    pub time_wait_reset_after: u64,
    /// Program runs about this target (transitions and resets): the share
    /// of the TCP programs' run time charged to it.
    pub events: u64,
    /// Events for the ring buffer lost because it was full.
    pub lost_events: u64,
    /// Sockets that could not be remembered (socket map full): their later
    /// transitions are not attributed.
    pub untracked_sockets: u64,
}

impl Default for TcpStats {
    fn default() -> Self {
        Self {
            transitions: [0; TCP_STATES * TCP_STATES],
            active_opens: 0,
            passive_opens: 0,
            closed: 0,
            connect_failures: 0,
            resets_sent: 0,
            resets_received: 0,
            time_wait_closes: 0,
            time_wait_reset_after: 0,
            events: 0,
            lost_events: 0,
            untracked_sockets: 0,
        }
    }
}

/// Counters not tied to a target, index 0 of `TCP_GLOBAL` (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpGlobalStats {
    /// TCP state transitions seen (all processes).
    pub transitions: u64,
    /// Listening ports of targets that could not be remembered (map full).
    pub listen_map_full: u64,
}

/// Kinds of [`TcpEvent`].
pub mod event_kind {
    /// A state change (`oldstate` → `newstate`).
    pub const STATE: u8 = 0;
    /// A state change that is a TIME_WAIT entry.
    pub const TIME_WAIT: u8 = 1;
    /// A reset sent.
    pub const RESET_SENT: u8 = 2;
    /// A reset received.
    pub const RESET_RECEIVED: u8 = 3;
    /// A reset sent right after a close counted as a TIME_WAIT entry: that
    /// entry is withdrawn.
    pub const TIME_WAIT_CANCELLED: u8 = 4;
}

/// One event of a target's socket, in the `TCP_EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpEvent {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    /// Owner of the socket (tgid).
    pub tgid: u32,
    /// [`event_kind`].
    pub kind: u8,
    /// Old state (0 for resets).
    pub oldstate: u8,
    /// New state (for resets: the state at the time).
    pub newstate: u8,
    /// `AF_INET` (2) or `AF_INET6` (10).
    pub family: u8,
    /// Local port (host order).
    pub sport: u16,
    /// Remote port (host order).
    pub dport: u16,
    /// Explicit padding.
    pub _pad: u32,
    /// Local address; IPv4 as IPv4-mapped IPv6 (as the tracepoint stores it).
    pub saddr: [u8; 16],
    /// Remote address, same encoding.
    pub daddr: [u8; 16],
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), Copy, and have no padding (checked by
    // the size assertions below), so any byte pattern is a valid value.
    unsafe impl aya::Pod for super::TcpSock {}
    unsafe impl aya::Pod for super::TcpRecentClose {}
    unsafe impl aya::Pod for super::TcpStats {}
    unsafe impl aya::Pod for super::TcpGlobalStats {}
    unsafe impl aya::Pod for super::TcpEvent {}
    unsafe impl aya::Pod for super::TcpLayout {}
    unsafe impl aya::Pod for super::SchedLayout {}
}

// No padding surprises: each size is the sum of its fields.
const _: () = assert!(core::mem::size_of::<TcpSock>() == 8);
const _: () = assert!(core::mem::size_of::<TcpRecentClose>() == 24);
const _: () = assert!(core::mem::size_of::<TcpStats>() == (TCP_STATES * TCP_STATES + 11) * 8);
const _: () = assert!(core::mem::size_of::<TcpGlobalStats>() == 16);
const _: () = assert!(core::mem::size_of::<TcpEvent>() == 56);
const _: () = assert!(core::mem::size_of::<TcpLayout>() == 25 * 4);
const _: () = assert!(core::mem::size_of::<SchedLayout>() == 8);

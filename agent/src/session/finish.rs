//! The last stages of a session: a window of one target's flight recorder
//! → merged → symbolized → profile → report files. Runs after the engine's
//! part is done (the target no longer pays), on a blocking thread.

use std::{
    collections::HashMap,
    time::{Duration, SystemTime},
};

use super::{
    compact_timestamp, round3, sanitize, session_id, write_report, Report, ReportMeta, SessionError,
    SessionKind,
};
use crate::{
    aggregate::{frames_for, BuildOptions, Profile, RawProfile},
    config::{Format, Mode, RecordConfig},
    engine::{Collected, Engine, Interval},
    offcpu::StillBlocked,
    render::{self, flamegraph, folded, pprof, summary},
    symbolize::{self, MapsCache, SymbolTable},
    target::Target,
    tcp::summary::TcpSummary,
    unwind,
};

/// Everything a report of one target is made of, taken from the engine.
pub struct Window {
    /// The process.
    pub target: Target,
    /// How its user stacks were unwound.
    pub choice: unwind::Choice,
    /// Threads when the engine added it.
    pub threads_at_start: usize,
    /// Thread names seen.
    pub thread_names: HashMap<u32, String>,
    /// Its mappings (for symbolization, valid after it exits).
    pub maps: MapsCache,
    /// Start of the window.
    pub from: SystemTime,
    /// End of the window.
    pub to: SystemTime,
    /// When the alert behind it fired (emergencies).
    pub alert_at: Option<SystemTime>,
    /// The recorder's intervals in the window.
    pub intervals: Vec<Interval>,
    /// The recorder's healthy intervals before it (emergencies' baseline).
    pub baseline: Vec<Interval>,
    /// Threads still blocked at the end (off-CPU windows).
    pub still_blocked: Vec<StillBlocked>,
    /// Their blocked time inside the window.
    pub still_blocked_off: RawProfile,
    /// TCP activity.
    pub tcp: Option<TcpSummary>,
    /// When the target exited, after the window's start.
    pub exited_after: Option<Duration>,
    /// Calibrated interrupt cost per sample, ns.
    pub interrupt_ns: f64,
    /// Samples of forked children (not profiled).
    pub child_process_samples: u64,
    /// Whether it is shown as a window of the recorder in the summary
    /// (daemon sessions; `record` covers its own run).
    pub show_window: bool,
    /// Sampled allocations still live at the end (heap windows).
    pub live: Vec<crate::memory::LiveAlloc>,
    /// The allocator probed (heap windows): name and file.
    pub allocator: Option<(String, String)>,
    /// Per-hit probe costs (heap windows).
    pub probe_costs: Option<crate::memory::ProbeCosts>,
}

impl Window {
    /// Takes `pid`'s window `[from, to]` from `engine`; with `off_cpu`, the
    /// threads still blocked now are added.
    pub fn take(engine: &Engine, pid: u32, from: SystemTime, to: SystemTime, off_cpu: bool) -> Option<Self> {
        let slot = engine.slot(pid)?;
        let mut still_blocked_off = RawProfile::default();
        let still_blocked = if off_cpu {
            engine.still_blocked(pid, from, &mut still_blocked_off)
        } else {
            Vec::new()
        };
        let intervals = engine.window(pid, from, to);
        // The window starts where the recorder's history does.
        let from = intervals.first().map_or(from, |i| i.from.max(from));
        Some(Self {
            target: slot.target.clone(),
            choice: slot.choice.clone(),
            threads_at_start: slot.threads_at_start,
            thread_names: slot.thread_names.clone(),
            maps: slot.maps.clone(),
            from,
            to,
            alert_at: None,
            intervals,
            baseline: Vec::new(),
            still_blocked,
            still_blocked_off,
            tcp: engine.tcp_summary(pid),
            exited_after: slot.exited_at.map(|t| t.duration_since(from).unwrap_or_default()),
            interrupt_ns: engine.calibration().interrupt_ns,
            child_process_samples: engine.foreign_samples(),
            show_window: false,
            live: engine.live_allocations(pid),
            allocator: engine
                .memory()
                .and_then(|m| m.allocator(pid))
                .map(|a| (a.name.clone(), a.path.clone())),
            probe_costs: engine.memory().and_then(|m| m.probe_costs()),
        })
    }
}

/// What a session asks of its report.
pub struct Spec<'a> {
    /// Output, formats, rate, mode, labels.
    pub config: &'a RecordConfig,
    /// Why it ran.
    pub kind: SessionKind,
    /// When it was asked for (its id and file names).
    pub started_at: SystemTime,
}

/// Writes the report of `window`.
pub fn finish(window: Window, spec: &Spec<'_>) -> Result<Report, SessionError> {
    let config = spec.config;
    let pid = window.target.pid;
    let collected = Collected::merge(&window.intervals, window.from);
    let views = config.mode.memory().map(|kind| {
        crate::memory::report::Views::of(kind, &collected.mem, &window.live, config.leak_age.as_secs_f64())
    });
    let mut off_raw = collected.off.clone();
    off_raw.merge(window.still_blocked_off.clone());
    let mut raw = collected.cpu.clone();
    if let Some(v) = &views {
        // pprof's `cpu` input carries pages or allocations, `off_cpu` the
        // live allocations (see `render::pprof::build`).
        raw = v.primary.clone();
        off_raw = v.inuse.clone();
    }
    let mut all_raw = raw.clone();
    all_raw.merge(off_raw.clone());
    if let Some(v) = &views {
        all_raw.merge(v.secondary.clone());
    }
    let symbols = symbolize::symbolize(&all_raw, &window.maps, &[pid]);
    let opts = build_options(&window, config);
    let profile = build_profile(config.mode, &raw, &off_raw, pid, &symbols, &opts);
    let label = config
        .label
        .clone()
        .unwrap_or_else(|| sanitize(&window.target.comm));
    let mut stem = format!("{label}-{pid}-{}", compact_timestamp(spec.started_at));
    if spec.kind == SessionKind::Slow {
        // Beside the latency session's `<stem>.latency.json`.
        stem.push_str(".slow");
    }
    let duration = window
        .exited_after
        .unwrap_or_else(|| window.to.duration_since(window.from).unwrap_or_default());
    let effective_hz = if collected.covered_s > 0.0 {
        round3(collected.hz_seconds / collected.covered_s)
    } else {
        collected.last_hz as f64
    };
    let pprof = if config.writes(Format::Pprof) {
        let kernel_image = symbolize::kernel_image();
        let profile = pprof::build(&pprof::Input {
            pid,
            exe: window.target.exe.as_deref(),
            mode: config.mode,
            cpu: &raw,
            off_cpu: &off_raw,
            symbols: &symbols,
            maps: &window.maps,
            kernel: &kernel_image,
            thread_names: &opts.thread_names,
            started_at: window.from,
            duration,
            period_ns: crate::sampling::period_for(config.freq_hz),
            comments: vec![
                format!("flamewatch {}", env!("CARGO_PKG_VERSION")),
                format!(
                    "{} (pid {pid}), {} session {}, mode {}, requested {} Hz, effective {effective_hz} Hz",
                    window.target.comm,
                    spec.kind.as_str(),
                    session_id(spec.kind, spec.started_at, pid),
                    format!("{:?}", config.mode).to_lowercase(),
                    config.freq_hz,
                ),
            ],
        });
        Some(pprof::encode(&profile)?)
    } else {
        None
    };
    let off_cpu = config
        .mode
        .off_cpu()
        .then(|| off_cpu_info(&window, &collected, &off_raw, &symbols, &opts, config));
    let before_after = window
        .alert_at
        .and_then(|at| before_after(&window, at, &stem, config, &symbols, &opts));
    let meta = ReportMeta {
        kind: spec.kind,
        started_at: spec.started_at,
        duration,
        requested_hz: config.freq_hz,
        effective_hz,
        base_period_ns: crate::sampling::period_for(config.freq_hz),
        kernel_stacks: config.kernel_stacks,
        per_thread: config.per_thread,
        threads_at_start: window.threads_at_start,
        child_process_samples: window.child_process_samples,
        lost_samples: collected.stats.map_full,
        stack_errors: summary::StackErrors {
            user_collisions: collected.stats.user_stack_collisions,
            user_errors: collected.stats.user_stack_errors,
            kernel_collisions: collected.stats.kernel_stack_collisions,
            kernel_errors: collected.stats.kernel_stack_errors,
        },
        unwind: unwind_info(&window, &collected, config),
        overhead: overhead_info(&window, &collected, config, duration),
        mode: config.mode,
        cpu_weight: Profile::build(&raw, pid, &symbols, &opts).total(),
        off_cpu,
        memory: views
            .as_ref()
            .map(|v| memory_info(v, &window, &collected, config)),
        top_n: config.top_functions,
        warnings: warnings(&window, &collected, config),
        tcp: window.tcp.clone(),
        formats: config.formats.clone(),
        pprof,
        window: window
            .show_window
            .then(|| window_info(&window, before_after.as_ref())),
    };
    let mut report = write_report(&config.output, &stem, &window.target, &profile, meta)?;
    if let (Some(v), Some(info)) = (&views, report.summary.memory.as_mut()) {
        let ctx = crate::memory::report::Context {
            pid,
            symbols: &symbols,
            opts: &opts,
            dir: &config.output,
            stem: &stem,
            svg: config.writes(Format::Svg),
            folded: config.writes(Format::Folded),
            top_n: config.top_functions,
            who: format!("{} (pid {pid})", window.target.comm),
        };
        crate::memory::report::write_views(v, &ctx, info);
        if config.writes(Format::Json) {
            let json = report.summary.to_json().map_err(render::RenderError::from)?;
            render::write_file(std::path::Path::new(&report.summary.files.json), json.as_bytes())?;
        }
    }
    report.baseline = baseline(&window, &stem, config, &opts);
    if let Some(ba) = before_after {
        report.summary.files.before_after_svg = ba.svg;
        // The summary on disk names the before/after graph too.
        if config.writes(Format::Json) {
            let json = report.summary.to_json().map_err(render::RenderError::from)?;
            render::write_file(std::path::Path::new(&report.summary.files.json), json.as_bytes())?;
        }
    }
    Ok(report)
}

fn build_options(window: &Window, config: &RecordConfig) -> BuildOptions {
    let mut thread_names = window.thread_names.clone();
    for b in &window.still_blocked {
        thread_names.entry(b.tid).or_insert_with(|| b.comm.clone());
    }
    BuildOptions {
        process_name: window.target.comm.clone(),
        // Wall profiles answer "what did each thread spend its time on".
        per_thread: config.per_thread || config.mode == Mode::Wall,
        thread_names,
        leaf_marker: None,
    }
}

fn build_profile(
    mode: Mode,
    raw: &RawProfile,
    off_raw: &RawProfile,
    pid: u32,
    symbols: &SymbolTable,
    opts: &BuildOptions,
) -> Profile {
    match mode {
        Mode::Cpu => Profile::build(raw, pid, symbols, opts),
        Mode::Offcpu => Profile::build(off_raw, pid, symbols, opts),
        // New pages (in `raw`), or live allocations (in `off_raw`).
        Mode::Memory => Profile::build(raw, pid, symbols, opts),
        Mode::Heap => Profile::build(off_raw, pid, symbols, opts),
        Mode::Wall => {
            let mut p = Profile::build(raw, pid, symbols, opts);
            let marked = BuildOptions {
                leaf_marker: Some("[off-cpu]".into()),
                ..opts.clone()
            };
            p.add_raw(off_raw, pid, symbols, &marked);
            p
        }
    }
}

/// The summary's memory section (its top lists are filled as the extra
/// views are written).
fn memory_info(
    v: &crate::memory::report::Views,
    window: &Window,
    c: &Collected,
    config: &RecordConfig,
) -> crate::memory::report::MemoryInfo {
    use crate::memory::{report::MemoryInfo, MemKind};
    let m = &c.mem;
    let sum = |r: &RawProfile| {
        r.samples
            .iter()
            .filter(|(k, _)| k.tgid == window.target.pid)
            .fold((0u64, 0u64), |a, (_, w)| (a.0 + w.samples, a.1 + w.period_ns))
    };
    let (shown_n, shown_bytes) = sum(v.shown());
    let mut info = MemoryInfo {
        kind: match v.kind {
            MemKind::Growth => "growth",
            MemKind::Heap => "heap",
        }
        .into(),
        bytes: shown_bytes,
        lost: m.stats.lost + m.stats.live_full,
        dwarf_copies: (m.stats.dwarf_copies > 0).then_some(m.stats.dwarf_copies),
        ..MemoryInfo::default()
    };
    match v.kind {
        MemKind::Growth => {
            info.new_pages = Some(shown_n);
            info.page_size = Some(shown_bytes.checked_div(shown_n).unwrap_or(4096));
            info.sample_every = Some(m.fault_every.max(1));
            info.faults_seen = Some(m.stats.faults);
            info.shared_faults = Some(m.stats.shared);
            info.extend_bytes = Some(sum(&v.secondary).1);
            info.bpf_ns_per_fault = (m.stats.faults > 0)
                .then(|| (m.stats.prog_ns as f64 / m.stats.faults as f64 * 10.0).round() / 10.0);
        }
        MemKind::Heap => {
            let (alloc_milli, alloc_bytes) = sum(&v.primary);
            info.allocator = window.allocator.as_ref().map(|a| a.0.clone());
            info.allocator_path = window.allocator.as_ref().map(|a| a.1.clone());
            info.sample_mean_bytes = Some(config.heap_sample_bytes);
            info.calls = Some(m.stats.calls);
            info.sampled = Some(m.stats.sampled);
            info.frees = Some(m.stats.frees);
            info.inuse_bytes = Some(shown_bytes);
            info.inuse_objects = Some(shown_n / 1000);
            info.alloc_bytes = Some(alloc_bytes);
            info.alloc_objects = Some(alloc_milli / 1000);
            info.leak_age_s = Some(config.leak_age.as_secs_f64());
            info.leaked_bytes = Some(sum(&v.secondary).1);
            info.probe_costs = window.probe_costs;
            info.observation = Some(observation(m));
        }
    }
    info
}

fn observation(m: &crate::memory::MemCollected) -> crate::memory::report::Observation {
    let rfc = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
    crate::memory::report::Observation {
        observed_s: round3(m.observed_s),
        unobserved_s: round3(m.unobserved_s),
        unobserved: m.unobserved.iter().map(|(a, b)| (rfc(*a), rfc(*b))).collect(),
        note: if m.free_missed {
            "the probes, free() included, were detached to stay inside the budget during the listed spans: \
             allocations made then are missing, and frees made then were missed, so some allocations \
             sampled before a span may be counted in use although freed"
                .into()
        } else if m.unobserved.is_empty() {
            "the probes were attached for the whole window: every allocation and free could be sampled".into()
        } else {
            "the allocation probes were detached to stay inside the budget during the listed spans: \
             allocations made then are missing from alloc_* and inuse_* (the estimates cover the observed \
             time); free() stayed attached, so what was sampled and freed is not counted in use"
                .into()
        },
    }
}

fn off_cpu_info(
    window: &Window,
    c: &Collected,
    off_raw: &RawProfile,
    symbols: &SymbolTable,
    opts: &BuildOptions,
    config: &RecordConfig,
) -> summary::OffCpuInfo {
    let pid = window.target.pid;
    let flat = BuildOptions {
        per_thread: false,
        ..opts.clone()
    };
    let blocked_threads = window
        .still_blocked
        .iter()
        .filter(|b| b.pid == pid)
        .map(|b| summary::BlockedThreadInfo {
            tid: b.tid,
            comm: b.comm.clone(),
            state: b.state.to_string(),
            wchan: b.wchan.clone(),
            blocked_s: round3(b.blocked_s),
            since: if b.before_session {
                "before session"
            } else {
                "session"
            }
            .into(),
            stack: frames_for(&b.key, symbols, &flat)
                .iter()
                .skip(1)
                .map(|f| f.to_string())
                .collect(),
        })
        .collect();
    let in_profile = Profile::build(off_raw, pid, symbols, opts).total();
    let elapsed = window.to.duration_since(window.from).unwrap_or_default();
    summary::OffCpuInfo {
        other_processes_cpu_pct: round3(100.0 * c.off_machine_ns as f64 / elapsed.as_nanos().max(1) as f64),
        min_block_us: config.min_block.as_secs_f64() * 1e6,
        blocks: in_profile.samples,
        blocked_s: round3(in_profile.period_ns as f64 / 1e9),
        short_blocks: c.off_stats.short,
        sample_every: c.off_every,
        lost: c.off_stats.lost + c.off_stats.start_full,
        blocked_threads,
    }
}

fn unwind_info(window: &Window, c: &Collected, config: &RecordConfig) -> summary::UnwindInfo {
    let choice = &window.choice;
    let u = c.unwind;
    summary::UnwindInfo {
        mode: if choice.dwarf { "dwarf" } else { "fp" }.into(),
        requested: format!("{:?}", config.unwind).to_lowercase(),
        reason: choice.reason.clone(),
        executable: choice.executable.clone(),
        stack_window: config.stack_window,
        dwarf_samples: u.samples,
        complete: u.complete,
        truncated_window: u.truncated_window,
        truncated_error: u.truncated_error,
        no_user_stack: u.no_user_stack,
        lost: c.stats.dwarf_lost,
        unwinder_cpu_s: round3(c.unwinder_ns as f64 / 1e9),
        leaf_checked: c.leaf.checked,
        leaf_fixups: c.leaf.fixups,
        mid_stack_gaps: c.leaf.mid_stack_gaps,
        leaf_rbp_reused: c.leaf.rbp_reused,
        leaf_fixup: config.leaf_fixup,
        fp_compared: c.fp_check.compared,
        fp_agreed: c.fp_check.agreed,
        fp_agreement_pct: c.fp_check.agreement_pct().map(|p| (p * 10.0).round() / 10.0),
    }
}

fn overhead_info(
    window: &Window,
    c: &Collected,
    config: &RecordConfig,
    duration: Duration,
) -> summary::OverheadInfo {
    summary::OverheadInfo {
        budget_pct: config.max_overhead_pct,
        measured_pct: round3(c.measured_pct()),
        max_pct: round3(c.max_pct),
        agent_cpu_pct: round3(100.0 * c.housekeeping_ns as f64 / duration.as_nanos().max(1) as f64),
        interrupt_ns_per_sample: window.interrupt_ns.round(),
        bpf_ns_per_sample: c.bpf_run.mean_ns().round(),
        paused_s: round3(c.paused_s),
        timeline: c.timeline.clone(),
    }
}

fn warnings(window: &Window, c: &Collected, config: &RecordConfig) -> Vec<String> {
    let st = &c.stats;
    let mut warnings = Vec::new();
    if let Some(after) = window.exited_after {
        warnings.push(format!(
            "target exited after {:.1} s; the report covers that time",
            after.as_secs_f64()
        ));
    }
    if st.map_full > 0 {
        warnings.push(format!("{} samples lost: aggregation map full", st.map_full));
    }
    let collisions = st.user_stack_collisions + st.kernel_stack_collisions;
    if collisions > 0 {
        warnings.push(format!(
            "{collisions} stacks lost to stack-map collisions (shown as [lost … stack])"
        ));
    }
    let stack_errors = st.user_stack_errors + st.kernel_stack_errors;
    if stack_errors > 0 {
        warnings.push(format!(
            "{stack_errors} stacks could not be read by the kernel (counted in sampling.stack_errors)"
        ));
    }
    if st.dwarf_lost > 0 {
        warnings.push(format!(
            "{} DWARF samples lost: the stack ring buffer was full (the agent fell behind)",
            st.dwarf_lost
        ));
    }
    warnings.extend(c.leaf.warning());
    if config.mode.memory().is_some() && window.choice.dwarf {
        warnings.push(
            "memory and heap stacks are frame-pointer walks (their DWARF unwinding is not implemented yet): \
             this target has no frame pointers, so its stacks may stop short"
                .into(),
        );
    }
    let lost = c.mem.stats.lost + c.mem.stats.live_full;
    if lost > 0 {
        warnings.push(format!(
            "{lost} memory records lost: a memory table was full (counted in memory.lost)"
        ));
    }
    if c.paused_s > 0.0 {
        warnings.push(format!(
            "sampling was paused for {:.0} s: even 1 Hz cost more than the {:.1} % budget",
            c.paused_s, config.max_overhead_pct
        ));
    }
    warnings
}

/// Writes `<stem>.baseline.folded` from the window's baseline intervals.
fn baseline(
    window: &Window,
    stem: &str,
    config: &RecordConfig,
    opts: &BuildOptions,
) -> Option<(String, u64)> {
    if window.baseline.is_empty() || !config.mode.on_cpu() {
        return None;
    }
    let c = Collected::merge(&window.baseline, window.from);
    // Its stacks were not all in the window's symbolization.
    let symbols = symbolize::symbolize(&c.cpu, &window.maps, &[window.target.pid]);
    let p = Profile::build(&c.cpu, window.target.pid, &symbols, opts);
    let samples = p.total().samples;
    if samples == 0 {
        return None;
    }
    let path = config.output.join(format!("{stem}.baseline.folded"));
    let text = folded::render(&p, crate::sampling::period_for(config.freq_hz));
    render::write_file(&path, text.as_bytes()).ok()?;
    Some((path.display().to_string(), samples))
}

/// The before/after differential of an emergency window.
struct BeforeAfter {
    svg: String,
    before_samples: u64,
    after_samples: u64,
}

/// Renders the window after the alert against the part before it.
fn before_after(
    window: &Window,
    alert_at: SystemTime,
    stem: &str,
    config: &RecordConfig,
    symbols: &SymbolTable,
    opts: &BuildOptions,
) -> Option<BeforeAfter> {
    let pid = window.target.pid;
    let (before, after): (Vec<Interval>, Vec<Interval>) =
        window.intervals.iter().cloned().partition(|i| i.to <= alert_at);
    let part = |intervals: &[Interval]| -> (String, u64) {
        let c = Collected::merge(intervals, window.from);
        let p = Profile::build(&c.cpu, pid, symbols, opts);
        let samples = p.total().samples;
        (
            folded::render(&p, crate::sampling::period_for(config.freq_hz)),
            samples,
        )
    };
    let (b, before_samples) = part(&before);
    let (a, after_samples) = part(&after);
    let mut out = BeforeAfter {
        svg: String::new(),
        before_samples,
        after_samples,
    };
    if config.mode.on_cpu() && before_samples > 0 && after_samples > 0 {
        let title = flamegraph::Title {
            title: "differential: after the alert vs the minute before".into(),
            subtitle: "red grew, blue shrank (normalized to each part's total)".into(),
            count_name: "samples".into(),
        };
        let path = config.output.join(format!("{stem}.before-after.svg"));
        match flamegraph::render_diff(&b, &a, &title).and_then(|svg| render::write_file(&path, &svg)) {
            Ok(()) => out.svg = path.display().to_string(),
            Err(e) => tracing::warn!("before/after differential of {stem}: {e}"),
        }
    }
    Some(out)
}

fn window_info(window: &Window, ba: Option<&BeforeAfter>) -> summary::WindowInfo {
    let rfc = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
    summary::WindowInfo {
        from: rfc(window.intervals.first().map_or(window.from, |i| i.from)),
        to: rfc(window.to),
        alert_at: window.alert_at.map(rfc),
        before_alert_samples: ba.map(|b| b.before_samples),
        after_alert_samples: ba.map(|b| b.after_samples),
    }
}

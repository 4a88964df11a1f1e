//! Folded stacks: one line per stack, frames root first separated by `;`,
//! then a space and the count. The format of Brendan Gregg's
//! `stackcollapse-*` scripts, read by inferno, FlameGraph and speedscope.

use std::fmt::Write as _;

use crate::aggregate::{Profile, Weight};

/// Count written for a stack: samples normalised to the requested sampling
/// period. With a constant rate this is exactly the number of samples; when
/// the governor lowered the rate, each later sample stands for more CPU time
/// and counts for more, so the picture stays time-proportional.
pub fn count(weight: Weight, base_period_ns: u64) -> u64 {
    if base_period_ns == 0 {
        return weight.samples;
    }
    let scaled = (weight.period_ns as f64 / base_period_ns as f64).round() as u64;
    scaled.max(u64::from(weight.samples > 0))
}

/// `;` separates frames and a newline ends a record: neither may appear in a
/// frame name.
fn clean(frame: &str) -> std::borrow::Cow<'_, str> {
    if frame.contains([';', '\n', '\r']) {
        frame.replace(';', ",").replace(['\n', '\r'], " ").into()
    } else {
        frame.into()
    }
}

/// Renders the profile; lines sorted (deterministic output).
pub fn render(profile: &Profile, base_period_ns: u64) -> String {
    let mut out = String::new();
    for (stack, weight) in &profile.stacks {
        let n = count(*weight, base_period_ns);
        if n == 0 {
            continue;
        }
        for (i, frame) in stack.iter().enumerate() {
            if i > 0 {
                out.push(';');
            }
            out.push_str(&clean(frame));
        }
        let _ = writeln!(out, " {n}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        aggregate::{tests as agg, BuildOptions, Profile},
        render::assert_golden,
    };

    /// Test that the folded output of a known profile matches the golden file.
    #[test]
    fn folded_golden() {
        let opts = BuildOptions {
            process_name: "demo".into(),
            ..Default::default()
        };
        let profile = Profile::build(&agg::raw(), 100, &agg::FakeSymbols, &opts);
        assert_golden("demo.folded", &render(&profile, 10_000_000));
    }

    /// Test that counts scale with the period and never round a sample away.
    #[test]
    fn counts_are_time_proportional() {
        let w = |samples, period_ns| Weight { samples, period_ns };
        assert_eq!(count(w(10, 10 * 1_000_000), 1_000_000), 10);
        assert_eq!(count(w(10, 10 * 4_000_000), 1_000_000), 40);
        assert_eq!(count(w(1, 400_000), 1_000_000), 1);
        assert_eq!(count(w(0, 0), 1_000_000), 0);
    }

    /// Test that separators inside frame names cannot break the format.
    #[test]
    fn frame_names_are_cleaned() {
        assert_eq!(clean("operator;()"), "operator,()");
        assert_eq!(clean("a\nb"), "a b");
        assert_eq!(clean("plain"), "plain");
    }
}

//! Interactive SVG flamegraphs, drawn by inferno from folded lines.

use inferno::flamegraph::{self, Options};

use super::RenderError;

/// What the flamegraph's title says.
#[derive(Debug, Clone)]
pub struct Title {
    /// Main line, e.g. `logcaster (pid 1234)`.
    pub title: String,
    /// Second line, e.g. `10.0 s at 99 Hz, 987 samples`.
    pub subtitle: String,
    /// What the counts are (`samples`, `µs`).
    pub count_name: String,
}

/// Renders folded lines to SVG. inferno refuses empty input, so an empty
/// profile gets a single `[no samples]` frame instead of an error.
pub fn render(folded: &str, title: &Title, deterministic: bool) -> Result<Vec<u8>, RenderError> {
    let mut opts = Options::default();
    opts.title = title.title.clone();
    opts.subtitle = Some(title.subtitle.clone());
    opts.count_name = title.count_name.clone();
    // Colour by function name, so one function keeps its colour across
    // flamegraphs (and golden files stay stable).
    opts.hash = true;
    opts.deterministic = deterministic;
    let placeholder = "[no samples] 1\n";
    let input = if folded.trim().is_empty() {
        placeholder
    } else {
        folded
    };
    let mut svg = Vec::new();
    flamegraph::from_lines(&mut opts, input.lines(), &mut svg).map_err(|source| RenderError::Write {
        path: "<svg>".into(),
        source,
    })?;
    Ok(svg)
}

/// A differential flamegraph: `after`'s stacks, coloured by how their share
/// changed since `before` (red: grew, blue: shrank), as FlameGraph's
/// difffolded + flamegraph do. Counts are normalised, so a longer or busier
/// session does not paint everything red.
pub fn render_diff(before: &str, after: &str, title: &Title) -> Result<Vec<u8>, RenderError> {
    let mut diff = Vec::new();
    let opts = inferno::differential::Options {
        normalize: true,
        strip_hex: false,
    };
    inferno::differential::from_readers(opts, before.as_bytes(), after.as_bytes(), &mut diff).map_err(
        |source| RenderError::Write {
            path: "<diff>".into(),
            source,
        },
    )?;
    render(&String::from_utf8_lossy(&diff), title, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn title() -> Title {
        Title {
            title: "demo (pid 100)".into(),
            subtitle: "1.0 s at 99 Hz, 3 samples".into(),
            count_name: "samples".into(),
        }
    }

    /// Test that a small profile renders to an SVG holding its functions and title.
    #[test]
    fn renders_svg() {
        let svg = render("demo;main;hot 2\ndemo;main;cold 1\n", &title(), true).expect("svg");
        let svg = String::from_utf8(svg).expect("utf-8");
        assert!(svg.starts_with("<?xml"));
        assert!(svg.contains("demo (pid 100)"));
        assert!(
            svg.contains(">hot<") || svg.contains("hot ("),
            "function frames are drawn"
        );
        crate::render::assert_golden("small.svg", &svg);
    }

    /// Test that a differential flamegraph colours a grown stack red and a
    /// shrunk one blue.
    #[test]
    fn differential() {
        let before = "demo;main;hot 10\ndemo;main;cold 10\n";
        let after = "demo;main;hot 18\ndemo;main;cold 2\n";
        let svg = String::from_utf8(render_diff(before, after, &title()).expect("svg")).unwrap();
        // inferno titles each frame with the change, e.g. "hot (18 samples, 90.00%; +40.00%)".
        assert!(svg.contains("+40.00%"), "grown stack marked");
        assert!(svg.contains("-40.00%"), "shrunk stack marked");
    }

    /// Test that an empty profile still yields a valid SVG (inferno rejects empty input).
    #[test]
    fn empty_profile_renders() {
        let svg = render("", &title(), true).expect("svg");
        assert!(String::from_utf8(svg).expect("utf-8").contains("no samples"));
    }
}

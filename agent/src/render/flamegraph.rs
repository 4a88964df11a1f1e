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

    /// Test that an empty profile still yields a valid SVG (inferno rejects empty input).
    #[test]
    fn empty_profile_renders() {
        let svg = render("", &title(), true).expect("svg");
        assert!(String::from_utf8(svg).expect("utf-8").contains("no samples"));
    }
}

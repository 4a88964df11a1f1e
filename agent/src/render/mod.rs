//! Turning a [`Profile`](crate::aggregate::Profile) into files: folded
//! stacks, an interactive SVG flamegraph (inferno) and the JSON summary.

pub mod flamegraph;
pub mod folded;
pub mod html;
pub mod pprof;
pub mod summary;

use std::path::{Path, PathBuf};

/// Errors of the rendering layer.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// Writing an output file failed.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Serializing the summary failed.
    #[error("serializing the summary: {0}")]
    Json(#[from] serde_json::Error),
    /// Compressing the pprof profile failed.
    #[error("compressing the pprof profile: {0}")]
    Pprof(#[source] std::io::Error),
}

/// Writes `bytes` to `path` atomically (an `O_EXCL` temp file under a
/// random name beside it, then a rename), so a reader never sees half a
/// report and a symlink planted at the name is replaced, not followed.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<(), RenderError> {
    crate::fsafe::write_atomic(path, bytes).map_err(|source| RenderError::Write {
        path: path.to_owned(),
        source,
    })
}

/// Compares `actual` with the golden file `name` under agent/tests/golden,
/// or rewrites the golden file when `FLAMEWATCH_BLESS=1`.
#[cfg(test)]
pub(crate) fn assert_golden(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("FLAMEWATCH_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(&path, actual).expect("bless golden file");
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with FLAMEWATCH_BLESS=1 to create it)",
            path.display()
        )
    });
    assert!(
        expected == actual,
        "{} differs from the rendered output (FLAMEWATCH_BLESS=1 re-blesses):\n--- expected\n{expected}\n--- actual\n{actual}",
        path.display()
    );
}

//! From `SYMBOL` or `lib:SYMBOL` and a pid to the file and file offset a
//! uprobe attaches to.

use std::path::{Path, PathBuf};

use object::{Object as _, ObjectSection as _, ObjectSymbol as _};

use super::ProbeError;

/// Where a probe attaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The function as asked for (`tick`, `libc:rand_r`).
    pub spec: String,
    /// Its symbol name.
    pub symbol: String,
    /// The binary as the target maps it.
    pub binary: PathBuf,
    /// The same file reached through the target's root (another mount
    /// namespace's file is still the right inode).
    pub open_path: PathBuf,
    /// File offset of the function's first instruction.
    pub offset: u64,
}

/// Splits `lib:symbol` (a library) from `symbol` (the executable).
pub fn split_spec(spec: &str) -> Result<(Option<&str>, &str), ProbeError> {
    let (lib, symbol) = match spec.split_once(':') {
        Some((lib, sym)) => (Some(lib), sym),
        None => (None, spec),
    };
    let ok = |s: &str| !s.is_empty() && !s.contains(char::is_whitespace);
    if !ok(symbol) || lib.is_some_and(|l| !ok(l)) {
        return Err(ProbeError::BadSpec(spec.to_owned()));
    }
    Ok((lib, symbol))
}

/// Finds `spec` in the executable or a mapped library of `pid`.
pub fn resolve(pid: u32, spec: &str) -> Result<Location, ProbeError> {
    let (lib, symbol) = split_spec(spec)?;
    let binary = match lib {
        None => std::fs::read_link(format!("/proc/{pid}/exe"))
            .map_err(|source| ProbeError::Proc { pid, source })?,
        Some(lib) => find_library(pid, lib)?,
    };
    let open_path =
        PathBuf::from(format!("/proc/{pid}/root")).join(binary.strip_prefix("/").unwrap_or(&binary));
    let offset = symbol_offset(&open_path, symbol).map_err(|e| match e {
        ProbeError::UnknownSymbol { symbol, .. } => ProbeError::UnknownSymbol {
            symbol,
            binary: binary.clone(),
        },
        e => e,
    })?;
    Ok(Location {
        spec: spec.to_owned(),
        symbol: symbol.to_owned(),
        binary,
        open_path,
        offset,
    })
}

/// The mapped file of `pid` whose name is `lib` or starts with `lib.` or
/// `lib-` (`libc` finds `libc.so.6`).
fn find_library(pid: u32, lib: &str) -> Result<PathBuf, ProbeError> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|source| ProbeError::Proc { pid, source })?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| p.starts_with('/'))
        .find(|p| {
            let name = Path::new(p)
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            name == lib || name.starts_with(&format!("{lib}.")) || name.starts_with(&format!("{lib}-"))
        })
        .map(PathBuf::from)
        .ok_or_else(|| ProbeError::UnknownLibrary {
            lib: lib.to_owned(),
            pid,
        })
}

/// The file offset of function `symbol` of the ELF file at `path` (its
/// symbol table, else its dynamic symbols; versioned names match too).
pub fn symbol_offset(path: &Path, symbol: &str) -> Result<u64, ProbeError> {
    let read = |source| ProbeError::Read {
        path: path.to_owned(),
        source,
    };
    let bytes = std::fs::read(path).map_err(read)?;
    let file = object::File::parse(&*bytes).map_err(|e| read(std::io::Error::other(e)))?;
    let named = |s: &object::Symbol<'_, '_>| {
        s.name()
            .is_ok_and(|n| n == symbol || n.split('@').next() == Some(symbol))
            && s.is_definition()
            && s.kind() == object::SymbolKind::Text
    };
    let sym = file
        .symbols()
        .find(|s| named(s))
        .or_else(|| file.dynamic_symbols().find(|s| named(s)))
        .ok_or_else(|| ProbeError::UnknownSymbol {
            symbol: symbol.to_owned(),
            binary: path.to_owned(),
        })?;
    let section = sym
        .section_index()
        .and_then(|i| file.section_by_index(i).ok())
        .ok_or_else(|| ProbeError::UnknownSymbol {
            symbol: symbol.to_owned(),
            binary: path.to_owned(),
        })?;
    let (file_offset, _) = section.file_range().ok_or_else(|| ProbeError::UnknownSymbol {
        symbol: symbol.to_owned(),
        binary: path.to_owned(),
    })?;
    Ok(sym.address() - section.address() + file_offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test that `lib:symbol` and `symbol` split, and empty parts are refused.
    #[test]
    fn specs_split() {
        assert_eq!(split_spec("tick").unwrap(), (None, "tick"));
        assert_eq!(split_spec("libc:rand_r").unwrap(), (Some("libc"), "rand_r"));
        for bad in ["", "libc:", ":x", "a b"] {
            assert!(split_spec(bad).is_err(), "{bad}");
        }
    }

    /// Test that a function of this test binary resolves to a file offset
    /// whose bytes are the function's code, and an unknown one names itself.
    #[test]
    fn own_symbol_resolves() {
        // Referenced, so the test binary keeps it.
        std::hint::black_box(
            crate::probes::calibrate::flamewatch_probe_calibration as extern "C" fn(u64) -> u64,
        );
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let off = symbol_offset(&exe, "flamewatch_probe_calibration").unwrap();
        assert!(off > 0);
        let err = symbol_offset(&exe, "no_such_function_here")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no_such_function_here"), "{err}");
    }
}

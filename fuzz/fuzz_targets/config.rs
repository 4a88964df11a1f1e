//! A `--config` file's text: parsed and validated, errors one line.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match flamewatch::config::parse("fuzz.toml", text) {
        // A valid config prints as TOML (watch --check) and has its presets.
        Ok(c) => {
            let _ = toml::to_string(&c.effective());
        }
        Err(e) => assert!(!e.to_string().contains('\n'), "{e}"),
    }
});

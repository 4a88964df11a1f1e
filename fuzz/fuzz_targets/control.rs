//! A control socket request line: parsed and validated.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else { return };
    if let Ok(req) = flamewatch::control::parse_request(line) {
        // What the daemon does with a valid request must not panic either.
        let d = req.duration().expect("validated");
        assert!(!d.is_zero());
    }
});

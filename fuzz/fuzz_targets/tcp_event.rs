//! A TCP event ring buffer record: decoded and printed.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(e) = flamewatch::tcp::events::TcpEventRecord::decode(data) {
        let _ = e.to_string();
        let _ = e.kind_name();
    }
});

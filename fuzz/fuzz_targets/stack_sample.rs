//! A stack sample ring buffer record: header and stack slice.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((h, stack)) = flamewatch::unwind::consumer::decode_sample(data) {
        assert!(stack.len() <= h.stack_len as usize);
    }
});

//! flamewatch's agent as a library: the binary (main.rs) is its command
//! line, and the fuzz targets (fuzz/) reach the parsers and decoders of
//! untrusted input through it.

// An internal library, not a published API: the API-shape lints that are
// silent on a binary's `pub` items (len without is_empty …) stay silent.
#![allow(clippy::len_without_is_empty, clippy::new_without_default)]

pub mod aggregate;
pub mod alerts;
pub mod bpf;
pub mod cli;
pub mod config;
pub mod control;
pub mod crash;
pub mod daemon;
pub mod dashboard;
pub mod detect;
pub mod doctor;
pub mod engine;
pub mod export;
pub mod fsafe;
pub mod governor;
pub mod http;
pub mod layout;
pub mod memory;
pub mod metrics;
pub mod offcpu;
pub mod probes;
pub mod render;
pub mod retention;
pub mod sampling;
pub mod session;
pub mod symbolize;
pub mod target;
pub mod tcp;
#[cfg(test)]
mod testutil;
pub mod unwind;

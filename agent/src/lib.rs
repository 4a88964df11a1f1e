//! flamewatch's agent as a library: the binary (main.rs) is its command
//! line, and the fuzz targets (fuzz/) reach the parsers and decoders of
//! untrusted input through it.

pub mod aggregate;
pub mod alerts;
pub mod bpf;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod detect;
pub mod engine;
pub mod export;
pub mod fsafe;
pub mod governor;
pub mod http;
pub mod metrics;
pub mod offcpu;
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

//! HTTP clients for alert delivery (webhooks, Alertmanager).
//!
//! rustls needs a process-wide crypto provider; we use `ring` (no C build
//! dependency, unlike aws-lc), installed once here.

use std::time::Duration;

/// A client with `timeout` per request.
pub fn client(timeout: Duration) -> Result<reqwest::Client, reqwest::Error> {
    // Fails only when a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().timeout(timeout).build()
}

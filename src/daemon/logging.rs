//! The daemon's log: one line per event on stderr, as text or JSON, each
//! carrying the span it happened in (`sandbox{id=sb-...}`), so every line
//! about a sandbox names it. The libraries' `log` records are taken in
//! too, inside whatever span was current.

use anyhow::{anyhow, Result};
use tracing_subscriber::EnvFilter;

/// How the daemon writes its log.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default)]
pub enum LogFormat {
    /// For people: `time LEVEL span{fields}: message`.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Starts the daemon's log at `CAPSULE_LOG`'s level (a tracing filter:
/// `info`, `debug`, `capsule=debug,warn`...), `info` by default.
pub fn init(format: LogFormat) -> Result<()> {
    let filter = EnvFilter::try_from_env("CAPSULE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let installed = match format {
        LogFormat::Text => builder.with_ansi(false).try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
    installed.map_err(|e| anyhow!("starting the log: {e}"))
}

/// The span every line about template `name` is logged in.
pub fn template_span(name: &str) -> tracing::Span {
    tracing::info_span!("template", name = %name)
}

/// The span every line about sandbox `id` is logged in.
pub fn sandbox_span(id: &str) -> tracing::Span {
    tracing::info_span!("sandbox", id = %id)
}

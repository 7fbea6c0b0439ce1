//! A spinner with the time taken, on stderr, while a long request runs (a
//! template build, a suspend, a create that boots): only when stderr is a
//! terminal, never with `--json`, so scripts and logs see none of it.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// Runs `f`, showing `message` and the time since it began meanwhile.
pub fn while_waiting<T>(message: &str, json: bool, f: impl FnOnce() -> T) -> T {
    if json || !std::io::stderr().is_terminal() {
        return f();
    }
    let spinner = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template("{spinner} capsule: {msg} ({elapsed})") {
        spinner.set_style(style);
    }
    spinner.set_message(message.to_string());
    spinner.enable_steady_tick(Duration::from_millis(100));
    let out = f();
    let took = spinner.elapsed();
    spinner.finish_and_clear();
    eprintln!("capsule: {message}: {:.1} s", took.as_secs_f64());
    out
}

//! One progress line per step on a terminal: a spinner on standard error naming the probe that
//! is running, cleared when it ends (the step's result is then printed on standard output).
//! Nothing at all when standard error is not a terminal (logs, CI, `--json` piped).

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The spinner (or nothing).
#[derive(Debug)]
pub struct Progress {
    enabled: bool,
    bar: Option<ProgressBar>,
}

impl Progress {
    /// A spinner when `enabled`, else silent.
    pub fn new(enabled: bool) -> Self {
        Progress { enabled, bar: None }
    }

    /// Shows `what` as running.
    pub fn begin(&mut self, what: &str) {
        if !self.enabled {
            return;
        }
        self.end();
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template("  {spinner} {msg} ({elapsed})") {
            bar.set_style(style);
        }
        bar.set_message(what.to_owned());
        bar.enable_steady_tick(Duration::from_millis(100));
        self.bar = Some(bar);
    }

    /// Clears the spinner.
    pub fn end(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

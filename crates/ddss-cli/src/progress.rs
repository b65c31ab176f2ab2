//! Progress of long work: an indicatif bar when stderr is a terminal, and plain INFO lines when it
//! is not (a log file, `nohup`, a batch scheduler, CI), where indicatif draws nothing.
//!
//! A line is printed at the first step, at the last, and in between every [`LINE_INTERVAL`]; it
//! says what runs, how far it is (`step 3/5` for optimiser steps, `150/1000 images` for images),
//! the rate, the time left and the latest message (the loss, where there is one), as tqdm does when
//! it writes to a file:
//!
//! ```text
//! INFO train: step 3/5 (2.10 steps/s, ETA 1s) loss 0.1234 lr 2.00e-4
//! ```
//!
//! `--quiet` hides both forms.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Time between two progress lines (besides the first and the last).
pub const LINE_INTERVAL: Duration = Duration::from_secs(10);

/// What a progress report counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Optimiser steps: `step 3/5`, `steps/s`.
    Steps,
    /// Images or samples: `150/1000 images`, `images/s`.
    Images,
    /// Anything else: `3/5`, `/s`.
    Items,
}

impl Unit {
    fn position(self, pos: u64, len: u64) -> String {
        match self {
            Unit::Steps => format!("step {pos}/{len}"),
            Unit::Images => format!("{pos}/{len} images"),
            Unit::Items => format!("{pos}/{len}"),
        }
    }

    fn rate(self) -> &'static str {
        match self {
            Unit::Steps => " steps/s",
            Unit::Images => " images/s",
            Unit::Items => "/s",
        }
    }
}

/// A progress report (cheap to clone; clones report to the same place).
#[derive(Clone)]
pub struct Progress {
    inner: Arc<Inner>,
}

enum Inner {
    Hidden,
    Bar(ProgressBar),
    Lines(Mutex<Lines>),
}

/// The state of a report written as lines.
struct Lines {
    what: String,
    unit: Unit,
    len: u64,
    pos: u64,
    /// The position the run started from (a resumed run's first step), for the rate.
    base: u64,
    message: String,
    started: Instant,
    /// When the last line was printed, and at which position.
    printed: Option<(Instant, u64)>,
}

impl Lines {
    /// A report of `len` units of `unit` named `what`, at 0 and started now.
    fn new(what: &str, unit: Unit, len: u64) -> Self {
        Self {
            what: what.to_string(),
            unit,
            len,
            pos: 0,
            base: 0,
            message: String::new(),
            started: Instant::now(),
            printed: None,
        }
    }

    /// Moves to `pos`, printing a line when one is due.
    fn advance(&mut self, pos: u64) {
        self.pos = pos;
        let due = match self.printed {
            None => pos > self.base,
            Some((at, printed_pos)) => pos != printed_pos && (pos >= self.len || at.elapsed() >= LINE_INTERVAL),
        };
        if due {
            self.print();
        }
    }

    /// Prints the current position unless it was the last one printed.
    fn print_unless_printed(&mut self) {
        if self.printed.is_none_or(|(_, printed_pos)| printed_pos != self.pos) && self.pos > self.base {
            self.print();
        }
    }

    fn print(&mut self) {
        let elapsed = self.started.elapsed().as_secs_f64();
        let done = self.pos.saturating_sub(self.base) as f64;
        let rate = if elapsed > 0.0 { done / elapsed } else { 0.0 };
        let eta =
            if rate > 0.0 { format_duration(self.len.saturating_sub(self.pos) as f64 / rate) } else { "?".to_string() };
        let message = if self.message.is_empty() { String::new() } else { format!(" {}", self.message) };
        tracing::info!(
            "{}: {} ({}{}, ETA {eta}){message}",
            self.what,
            self.unit.position(self.pos, self.len),
            format_rate(rate),
            self.unit.rate()
        );
        self.printed = Some((Instant::now(), self.pos));
    }
}

/// `12.3`, `0.456`, `1234`: three significant digits or the integer part.
fn format_rate(rate: f64) -> String {
    match rate {
        r if r >= 100.0 => format!("{r:.0}"),
        r if r >= 1.0 => format!("{r:.2}"),
        r => format!("{r:.3}"),
    }
}

/// `42s`, `3m 05s`, `2h 07m`.
fn format_duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m {:02}s", s / 60, s % 60),
        s => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
    }
}

impl Progress {
    /// A report of `len` units of `unit` named `what` on stderr: hidden when `quiet`, a bar on a
    /// terminal, lines otherwise.
    pub fn new(len: u64, quiet: bool, what: &str, unit: Unit) -> Self {
        let inner = if quiet {
            Inner::Hidden
        } else if std::io::stderr().is_terminal() {
            Inner::Bar(bar(len, what))
        } else {
            Inner::Lines(Mutex::new(Lines::new(what, unit, len)))
        };
        Self { inner: Arc::new(inner) }
    }

    fn with_lines(&self, f: impl FnOnce(&mut Lines)) {
        if let Inner::Lines(lines) = self.inner.as_ref() {
            f(&mut lines.lock().unwrap_or_else(PoisonError::into_inner));
        }
    }

    /// Starts a resumed run at `pos` (no line for it; the rate counts from it).
    pub fn resume_from(&self, pos: u64) {
        if let Inner::Bar(bar) = self.inner.as_ref() {
            bar.set_position(pos);
        }
        self.with_lines(|lines| {
            lines.pos = pos;
            lines.base = pos;
        });
    }

    /// Moves to `pos`.
    pub fn set_position(&self, pos: u64) {
        if let Inner::Bar(bar) = self.inner.as_ref() {
            bar.set_position(pos);
        }
        self.with_lines(|lines| lines.advance(pos));
    }

    /// Moves `delta` further.
    pub fn inc(&self, delta: u64) {
        if let Inner::Bar(bar) = self.inner.as_ref() {
            bar.inc(delta);
        }
        self.with_lines(|lines| lines.advance(lines.pos + delta));
    }

    /// Sets the message shown after the position (the latest loss, ...).
    pub fn set_message(&self, message: String) {
        if let Inner::Bar(bar) = self.inner.as_ref() {
            bar.set_message(message.clone());
        }
        self.with_lines(|lines| lines.message = message);
    }

    /// Prints a line of its own (above the bar on a terminal).
    pub fn println(&self, line: String) {
        match self.inner.as_ref() {
            Inner::Hidden => {}
            Inner::Bar(bar) => bar.println(line),
            Inner::Lines(_) => tracing::info!("{line}"),
        }
    }

    /// Runs `f` with the bar hidden (so that `f` can print).
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        match self.inner.as_ref() {
            Inner::Bar(bar) => bar.suspend(f),
            _ => f(),
        }
    }

    /// Ends the report, leaving the bar on screen (lines: prints the final position if it was not).
    pub fn finish(&self) {
        if let Inner::Bar(bar) = self.inner.as_ref() {
            bar.finish();
        }
        self.with_lines(Lines::print_unless_printed);
    }

    /// Ends the report, removing the bar (lines: prints the final position if it was not).
    pub fn finish_and_clear(&self) {
        if let Inner::Bar(bar) = self.inner.as_ref() {
            bar.finish_and_clear();
        }
        self.with_lines(Lines::print_unless_printed);
    }
}

/// An indicatif bar on stderr with rate and ETA.
fn bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    let style = ProgressStyle::with_template(&format!(
        "{what} [{{elapsed_precise}}] {{bar:30}} {{pos}}/{{len}} ({{per_sec}}, ETA {{eta}}) {{msg}}"
    ))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(len: u64) -> Lines {
        Lines::new("train", Unit::Steps, len)
    }

    #[test]
    fn lines_come_at_the_first_and_the_last_step_and_after_the_interval() {
        let mut report = lines(100);
        report.advance(1);
        assert_eq!(report.printed.map(|(_, pos)| pos), Some(1), "the first step");
        report.advance(2);
        assert_eq!(report.printed.map(|(_, pos)| pos), Some(1), "not again within the interval");
        report.printed = Some((Instant::now() - LINE_INTERVAL, 1));
        report.advance(3);
        assert_eq!(report.printed.map(|(_, pos)| pos), Some(3), "after the interval");
        report.advance(100);
        assert_eq!(report.printed.map(|(_, pos)| pos), Some(100), "the last step");
        report.print_unless_printed();
        assert_eq!(report.printed.map(|(_, pos)| pos), Some(100));

        let mut resumed = lines(10);
        resumed.base = 4;
        resumed.pos = 4;
        resumed.print_unless_printed();
        assert!(resumed.printed.is_none(), "no line for the position a run resumes from");
        resumed.advance(5);
        assert_eq!(resumed.printed.map(|(_, pos)| pos), Some(5));
    }

    #[test]
    fn durations_rates_and_positions_read_as_words() {
        assert_eq!(format_duration(42.4), "42s");
        assert_eq!(format_duration(185.0), "3m 05s");
        assert_eq!(format_duration(7625.0), "2h 07m");
        assert_eq!(format_rate(1234.5), "1234");
        assert_eq!(format_rate(2.104), "2.10");
        assert_eq!(format_rate(0.0456), "0.046");
        assert_eq!(Unit::Steps.position(3, 5), "step 3/5");
        assert_eq!(Unit::Images.position(150, 1000), "150/1000 images");
    }
}

//! Progress bars on a terminal (bytes, rate, ETA); silence when stderr is not one.

use std::io::IsTerminal;
use std::sync::{Arc, Mutex};

use berth_store::progress::Progress;
use indicatif::{ProgressBar, ProgressStyle};

struct Bars {
    current: Mutex<Option<ProgressBar>>,
}

impl Progress for Bars {
    fn start(&self, label: &str, total: u64, done: u64) {
        let bar = ProgressBar::new(total);
        let style = ProgressStyle::with_template(
            "{msg:24!} [{bar:30}] {bytes:>10}/{total_bytes:<10} {binary_bytes_per_sec:>12} ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_message(label.to_string());
        bar.set_position(done);
        if let Ok(mut cur) = self.current.lock()
            && let Some(old) = cur.replace(bar)
        {
            old.finish_and_clear();
        }
    }

    fn advance(&self, bytes: u64) {
        if let Ok(cur) = self.current.lock()
            && let Some(bar) = cur.as_ref()
        {
            bar.inc(bytes);
        }
    }

    fn finish(&self) {
        if let Ok(mut cur) = self.current.lock()
            && let Some(bar) = cur.take()
        {
            bar.finish();
        }
    }

    fn note(&self, message: &str) {
        eprintln!("{message}");
    }
}

/// Without a terminal: no bars, only warnings.
struct WarningsOnly;

impl Progress for WarningsOnly {
    fn start(&self, _: &str, _: u64, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
    fn warn(&self, message: &str) {
        eprintln!("berth: {message}");
    }
}

/// Bars when a person is watching, only warnings otherwise.
pub fn for_terminal() -> Arc<dyn Progress> {
    if std::io::stderr().is_terminal() { Arc::new(Bars { current: Mutex::new(None) }) } else { Arc::new(WarningsOnly) }
}

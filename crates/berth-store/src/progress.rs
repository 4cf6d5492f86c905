//! Progress of long transfers, reported to whoever shows it (the CLI draws bars on a terminal).

/// Receives progress of one transfer at a time.
pub trait Progress: Send + Sync {
    /// A transfer of `total` bytes begins, `done` of them already present (a resumed download).
    fn start(&self, label: &str, total: u64, done: u64);
    /// `bytes` more were moved.
    fn advance(&self, bytes: u64);
    /// The transfer ended (successfully or not).
    fn finish(&self);
    /// A step that moved nothing (a blob already present, say), to mention in passing.
    fn note(&self, _message: &str) {}
    /// Something the user should hear about even without a terminal (a damaged blob replaced).
    fn warn(&self, message: &str) {
        self.note(message)
    }
}

/// Reports nothing.
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _: &str, _: u64, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}

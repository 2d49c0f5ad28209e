//! One log file as the writer holds it: opened for appending, followed across a rename
//! rotation, and appended to in one write under an fs2 exclusive lock (rolled back when the
//! write fails or is short).

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use fs2::FileExt;

use super::{LogPosition, WriteError};

/// Diagnostics keep the target they had before this file was split out of `artifacts`.
const TARGET: &str = "llmscope::artifacts";

/// How often the writer checks that a log's path still names the file it holds. Lines written
/// to a renamed file in between are not lost: the engine drains a renamed log to its end.
pub(super) const FOLLOW_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// One log file as the writer holds it: reopened when the path names another file (a rename
/// rotation) or on request (SIGHUP).
pub(super) struct LogFile {
    /// The path the log is written at.
    pub(super) path: PathBuf,
    file: File,
    /// The inode of the file held.
    pub(super) ino: u64,
    /// When the path was last compared with the file held.
    checked: std::time::Instant,
}

impl LogFile {
    /// Open `path` for appending, creating it and its directories as needed.
    pub(super) fn open(path: &Path) -> Result<Self, WriteError> {
        let err = |e: std::io::Error| WriteError {
            path: path.into(),
            message: e.to_string(),
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(err)?;
        let ino = file.metadata().map_err(err)?.ino();
        Ok(Self {
            path: path.into(),
            file,
            ino,
            checked: std::time::Instant::now(),
        })
    }

    /// Follow the path: reopen when it names another file than the one held (renamed away,
    /// deleted, replaced; checked at most every [`FOLLOW_INTERVAL`]) or when `force` is set.
    pub(super) fn follow(&mut self, force: bool) -> Result<(), WriteError> {
        if !force && self.checked.elapsed() < FOLLOW_INTERVAL {
            return Ok(());
        }
        self.checked = std::time::Instant::now();
        let moved = match std::fs::metadata(&self.path) {
            Ok(m) => m.ino() != self.ino,
            Err(_) => true,
        };
        if moved || force {
            *self = Self::open(&self.path)?;
            tracing::info!(target: TARGET, file = %self.path.display(), "log reopened");
        }
        Ok(())
    }

    /// Append `buf` (whole lines) in one write under an exclusive lock; returns the file length
    /// before the write. A failed or short write is rolled back (truncated to the length before
    /// it) under the same lock, so no fragment is left for the next line to be glued to.
    pub(super) fn append_locked(&mut self, buf: &[u8]) -> Result<u64, WriteError> {
        let err = |e: std::io::Error| WriteError {
            path: self.path.clone(),
            message: e.to_string(),
        };
        self.file.lock_exclusive().map_err(err)?;
        let result = (|| {
            let before = self.file.seek(SeekFrom::End(0))?;
            if let Err(e) = self.file.write_all(buf) {
                if let Err(t) = self.file.set_len(before) {
                    tracing::error!(target: TARGET, file = %self.path.display(), error = %t, "cannot roll back a partial write");
                }
                return Err(e);
            }
            Ok(before)
        })();
        let unlock = FileExt::unlock(&self.file);
        let before = result.map_err(err)?;
        unlock.map_err(err)?;
        Ok(before)
    }
}

/// Append `lines` (whole JSON lines) to the log at `path` now, outside the writer thread, in
/// one locked write (rolled back if it fails); returns where they end. For start-up, before
/// the gateway serves.
pub fn append_lines_now(path: &Path, lines: &str) -> Result<LogPosition, WriteError> {
    let mut log = LogFile::open(path)?;
    let before = log.append_locked(lines.as_bytes())?;
    Ok(LogPosition {
        file_id: log.ino,
        offset: before.saturating_add(lines.len() as u64),
    })
}

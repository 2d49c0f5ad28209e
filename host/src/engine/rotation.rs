//! Following a log across rotations: which file a pass reads (the one at the path, or the one
//! held when the path names no new data yet), whether a rename rotation left a file to drain
//! first, and where to read each from (on from the cursor, or from the start when the file is
//! not the one the cursor was taken on). See the module doc of [`super`] on rotation.

use std::fs::{File, Metadata};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::read::{resume_at, Cursor};
use super::EngineError;

/// Diagnostics keep the target they had before this file was split out of `engine`.
const TARGET: &str = "llmscope::engine";

/// A log file held open between passes, and its identity.
#[derive(Debug)]
pub(super) struct Held {
    /// The open file.
    pub(super) file: File,
    dev: u64,
    /// Its inode.
    pub(super) ino: u64,
}

impl Held {
    /// `file`, known by `meta`'s device and inode.
    fn new(file: File, meta: &Metadata) -> Self {
        Self {
            file,
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }

    /// Whether both are the same file (device and inode).
    fn same_file(&self, other: &Self) -> bool {
        (self.dev, self.ino) == (other.dev, other.ino)
    }
}

/// The file at `path` and its length, if there is one. Opened first, then asked who it is: a
/// rotation between the two cannot mix one file's identity with another's content.
pub(super) fn open_log(path: &Path) -> Result<Option<(Held, u64)>, EngineError> {
    let io = |source| EngineError::Io {
        path: path.into(),
        source,
    };
    match File::open(path) {
        Ok(file) => {
            let meta = file.metadata().map_err(io)?;
            Ok(Some((Held::new(file, &meta), meta.len())))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(e)),
    }
}

/// Which file a pass reads, given the one `held` and the one `opened` at the path: the opened
/// one when it is to replace the held one (`None`: keep reading the held one), and whether the
/// held one is to be drained first (a rename rotation).
pub(super) fn pick_file(held: Option<&Held>, opened: Option<(Held, u64)>) -> (Option<Held>, bool) {
    match (held, opened) {
        // The path is gone (renamed, not yet recreated): the held file is still the log.
        (_, None) => (None, false),
        (None, Some((new, _))) => (Some(new), false),
        // Same file, or a new one nobody has written yet: keep reading the held one.
        (Some(held), Some((new, len))) if held.same_file(&new) || len == 0 => (None, false),
        (Some(_), Some((new, _))) => (Some(new), true),
    }
}

/// A rotated-away file a pass reads to its end before the new one.
pub(super) struct Drain<'a> {
    pub(super) held: &'a Held,
    /// `<path> (rotated, inode N)`, naming its malformed lines.
    pub(super) label: String,
    /// Where to read it from.
    pub(super) start: u64,
    /// Its length when the pass began.
    pub(super) len: u64,
}

/// What one log's pass reads: `drain`, if any, then `current` from `cursor.offset` to `len`.
pub(super) struct Plan<'a> {
    pub(super) current: &'a Held,
    pub(super) drain: Option<Drain<'a>>,
    /// Where to read `current` from, and its head now; the new cursor once the pass ran.
    pub(super) cursor: Cursor,
    /// `current`'s length when the pass began.
    pub(super) len: u64,
    /// Whether the log was found rotated or truncated.
    pub(super) rotated: bool,
}

/// Where a pass reads `current` (and `old`, the held file a rename rotation left behind) from
/// `cursor` on, or from the start when the file is not the one the cursor was taken on.
pub(super) fn plan_pass<'a>(
    path: &Path,
    label: &str,
    current: &'a Held,
    old: Option<&'a Held>,
    cursor: &Cursor,
) -> Result<Plan<'a>, EngineError> {
    let io = |source| EngineError::Io {
        path: path.into(),
        source,
    };
    let mut cursor = cursor.clone();
    let mut rotated = false;
    let mut drain = None;
    if let Some(old) = old {
        let old_label = format!("{label} (rotated, inode {})", old.ino);
        let (start, reset, _) = resume_at(&old.file, &cursor).map_err(io)?;
        if reset {
            tracing::warn!(target: TARGET, file = %old_label, previous_offset = cursor.offset, "rotated-away log was truncated before it was read to its end; reading it from the start");
        }
        let len = old.file.metadata().map_err(io)?.len();
        drain = Some(Drain {
            held: old,
            label: old_label,
            start,
            len,
        });
        rotated = true;
        tracing::info!(target: TARGET, file = %label, old_inode = old.ino, new_inode = current.ino, "log was rotated (renamed): reading the old file to its end, then the new one from the start");
        cursor.offset = 0;
    }
    let (start, reset, head) = resume_at(&current.file, &cursor).map_err(io)?;
    if reset {
        tracing::warn!(target: TARGET, file = %label, previous_offset = cursor.offset, "log was rotated or truncated; reading it from the start");
        rotated = true;
    }
    cursor.offset = start;
    cursor.head = head;
    let len = current.file.metadata().map_err(io)?.len();
    Ok(Plan {
        current,
        drain,
        cursor,
        len,
        rotated,
    })
}

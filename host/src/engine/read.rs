//! Reading a log file: from a byte offset to its end, in positioned reads, each read's
//! complete lines parsed into Arrow batches and appended to the log's table; and recognising
//! a file again by its first line.

use std::fs::File;
use std::os::unix::fs::FileExt;

use duckdb::Connection;

use super::schema::Kind;
use super::{batch, EngineError};

/// Bytes read per chunk while ingesting.
const CHUNK: usize = 8 << 20;
/// Backlogs from this size on (a start on existing logs, a query after a quiet period) are
/// read and parsed on other threads while this one appends. Smaller ones, such as a serving
/// gateway's refresh, stay on the calling thread: spawning threads for every refresh made glibc
/// keep a heap per short-lived thread, which cost over 100 MiB of RSS under load.
const PARALLEL_MIN_BYTES: u64 = 32 << 20;
/// Bytes of the first line kept to recognise a file.
const HEAD_BYTES: usize = 128;

/// Malformed lines listed in one report.
pub(super) const MALFORMED_LISTED: usize = 100;

/// Where ingestion stands for one file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Cursor {
    /// Bytes ingested: the offset after the last line read.
    pub(super) offset: u64,
    /// The file's first line (at most 128 bytes) when the cursor was taken, to recognise it.
    pub(super) head: String,
    /// Malformed lines skipped in this log so far.
    pub(super) malformed: u64,
}

/// Malformed lines met in one log's pass: all counted, the first [`MALFORMED_LISTED`] listed.
#[derive(Debug, Default)]
pub(super) struct Skipped {
    /// Malformed lines met.
    pub(super) count: u64,
    /// The first of them, with file and offset.
    pub(super) listed: Vec<String>,
}

impl Skipped {
    /// Count `line` (a description with file and offset), listing it while there is room.
    pub(super) fn add(&mut self, line: String) {
        self.count = self.count.saturating_add(1);
        if self.listed.len() < MALFORMED_LISTED {
            self.listed.push(line);
        }
    }
}

/// Where a read to the end of a file stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ReadEnd {
    /// The offset after the last complete line.
    pub(super) lines_end: u64,
    /// The offset after the last byte read.
    pub(super) eof: u64,
    /// Where a last line without a newline starts (not blank), if there is one.
    pub(super) fragment: Option<u64>,
}

/// Append the complete lines of `file` from byte `start` on (about `pending` bytes) to
/// `kind`'s table, counting malformed ones in `skipped` named by `label` and offset. For a
/// large backlog a thread reads and parses (on every core) while this one appends, so parsing
/// the next read overlaps appending this one; a smaller increment (the usual refresh) is read
/// and parsed here. Returns the rows appended and where the read stopped.
pub(super) fn append_from(
    conn: &Connection,
    kind: Kind,
    file: &File,
    start: u64,
    pending: u64,
    label: &str,
    skipped: &mut Skipped,
) -> Result<(u64, ReadEnd), EngineError> {
    let mut appender = conn.appender(kind.key())?;
    let mut rows = 0u64;
    let mut append = |parts: std::io::Result<Vec<batch::Parsed>>| -> Result<(), EngineError> {
        let parts = parts.map_err(|source| EngineError::Io {
            path: label.into(),
            source,
        })?;
        for parsed in parts {
            let n = parsed.batch.num_rows();
            if n > 0 {
                appender.append_record_batch(parsed.batch)?;
                rows += n as u64;
            }
            for m in parsed.malformed {
                skipped.add(format!("{label}:{}: {}", m.offset, m.why));
            }
        }
        Ok(())
    };
    let end = if pending < PARALLEL_MIN_BYTES {
        let mut failed = None;
        let end = read_and_parse(file, kind, start, pending, 1, |parts| match append(parts) {
            Ok(()) => true,
            Err(e) => {
                failed = Some(e);
                false
            }
        });
        if let Some(e) = failed {
            return Err(e);
        }
        end
    } else {
        let (tx, rx) = std::sync::mpsc::sync_channel(2);
        std::thread::scope(|s| -> Result<ReadEnd, EngineError> {
            // Owned here, so that a failed append drops it before the scope joins the reader:
            // the reader's next send then fails and it stops instead of blocking forever.
            let rx = rx;
            let reader = s.spawn(move || {
                let threads = batch::threads();
                read_and_parse(file, kind, start, pending, threads, |parts| {
                    tx.send(parts).is_ok()
                })
            });
            for parts in &rx {
                append(parts)?;
            }
            Ok(reader
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
        })?
    };
    appender.flush()?;
    Ok((rows, end))
}

/// Read `file` from byte `start` to its end in reads of up to [`CHUNK`] (sized for the
/// `pending` bytes expected) and hand the complete lines of each, parsed on up to `threads`
/// threads, to `sink`, which returns whether to go on. Reads are positioned (`pread`): the
/// handle's own offset is neither used nor moved. A torn last line is not handed on; a read
/// error is, and ends the reading.
fn read_and_parse(
    file: &File,
    kind: Kind,
    start: u64,
    pending: u64,
    threads: usize,
    mut sink: impl FnMut(std::io::Result<Vec<batch::Parsed>>) -> bool,
) -> ReadEnd {
    let mut carry: Vec<u8> = Vec::new();
    let mut line_start = start;
    let mut at = start;
    let size = usize::try_from(pending).map_or(CHUNK, |p| p.clamp(64 << 10, CHUNK));
    let mut buf = vec![0u8; size];
    loop {
        let n = match file.read_at(&mut buf, at) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                sink(Err(e));
                break;
            }
        };
        at = at.saturating_add(n as u64);
        carry.extend_from_slice(&buf[..n]);
        let Some(last_newline) = carry.iter().rposition(|b| *b == b'\n') else {
            continue;
        };
        let parts = batch::parse(kind, &carry[..=last_newline], line_start, threads);
        line_start = line_start.saturating_add(last_newline as u64 + 1);
        carry.drain(..=last_newline);
        if !sink(Ok(parts)) {
            break;
        }
    }
    ReadEnd {
        lines_end: line_start,
        eof: at,
        fragment: (!carry.iter().all(u8::is_ascii_whitespace)).then_some(line_start),
    }
}

/// Where to go on reading `file` for `cursor`, whether that is a restart from 0 because the
/// file is shorter than the cursor or starts with another line than the one the cursor was
/// taken on (rotated or truncated), and the file's head now.
pub(super) fn resume_at(file: &File, cursor: &Cursor) -> std::io::Result<(u64, bool, String)> {
    let head = read_head(file)?;
    if cursor.offset == 0 {
        return Ok((0, false, head));
    }
    let len = file.metadata()?.len();
    // A head taken while the first line was still being written is a prefix of the whole
    // one: that is the same file, not a rotation (reading it again would double its rows).
    let same_head = head.starts_with(&cursor.head) || cursor.head.starts_with(&head);
    if len < cursor.offset || !same_head {
        Ok((0, true, head))
    } else {
        Ok((cursor.offset, false, head))
    }
}

/// The file's first line, at most [`HEAD_BYTES`] of it.
pub(super) fn read_head(file: &File) -> std::io::Result<String> {
    let mut head = vec![0u8; HEAD_BYTES];
    let mut filled = 0;
    while filled < HEAD_BYTES {
        let n = match file.read_at(&mut head[filled..], filled as u64) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            break;
        }
        filled += n;
    }
    head.truncate(filled);
    if let Some(nl) = head.iter().position(|b| *b == b'\n') {
        head.truncate(nl);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

//! Reading a log: one line at a time, numbered and located by byte offset.

use std::io::{self, BufRead};

/// A parse error located the way serde_json locates it in a one-line document (`at line 1
/// column N`) says `at column N`: the file's line number is already in the problem.
pub(super) fn within_line(why: String) -> String {
    match why.rsplit_once(" at line 1 column ") {
        Some((head, column)) if column.bytes().all(|b| b.is_ascii_digit()) => {
            format!("{head} at column {column}")
        }
        _ => why,
    }
}

/// Call `f(line, (number, offset), complete)` for each line of `reader`, without its `\n` (and
/// `\r`); `complete` is false for a last line without a newline. Holds one line at a time.
pub(super) fn each_line(
    mut reader: impl BufRead,
    mut f: impl FnMut(&[u8], (u64, u64), bool),
) -> io::Result<()> {
    let mut buf = Vec::with_capacity(4096);
    let (mut number, mut offset) = (0u64, 0u64);
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf)?;
        if n == 0 {
            return Ok(());
        }
        number += 1;
        let complete = buf.last() == Some(&b'\n');
        let line = buf.strip_suffix(b"\n").unwrap_or(&buf);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        f(line, (number, offset), complete);
        offset += n as u64;
    }
}

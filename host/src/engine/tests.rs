//! Ingestion under concurrency, rotation (rename and copytruncate) and malformed lines: the
//! telemetry table holds each complete, well-formed line of the log exactly once.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::read::{read_head, resume_at, Cursor};
use super::*;

fn line(i: u64) -> String {
    format!(
        "{{\"timestamp\":\"2025-11-25T10:00:00Z\",\"request_id\":\"r{i}\",\"tenant_id\":\"t{}\",\"cost_usd\":0.01,\"status\":\"ok\"}}\n",
        i % 5
    )
}

fn lines(from: u64, n: u64) -> String {
    (from..from + n).map(line).collect()
}

fn logs() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("telemetry.jsonl");
    let d = dir.path().join("policy_decisions.jsonl");
    (dir, t, d)
}

fn append(path: &Path, text: &str) {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
}

fn telemetry_rows(e: &SpendEngine) -> (u64, u64) {
    e.with_conn(|c| {
        c.query_row(
            "SELECT count(*), count(DISTINCT request_id) FROM telemetry",
            [],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
        )
    })
    .unwrap()
}

#[test]
fn concurrent_ingests_append_each_line_once() {
    let (_dir, t, d) = logs();
    std::fs::write(&t, "").unwrap();
    let e = Arc::new(SpendEngine::open(None, &t, &d).unwrap());
    let done = Arc::new(AtomicBool::new(false));
    let written = 4_000u64;
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let (e, done) = (Arc::clone(&e), Arc::clone(&done));
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    e.ingest().unwrap();
                }
            })
        })
        .collect();
    let mut w = OpenOptions::new().append(true).open(&t).unwrap();
    for i in 0..written {
        w.write_all(line(i).as_bytes()).unwrap();
        if i % 20 == 0 {
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
    }
    done.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    e.ingest().unwrap();
    assert_eq!(
        telemetry_rows(&e),
        (written, written),
        "rows == lines in the file"
    );
}

#[test]
fn a_rename_rotation_drains_the_old_file_before_following_the_new_one() {
    let (dir, t, d) = logs();
    let (n, m, k, j) = (50, 7, 5, 3);
    append(&t, &lines(0, n));
    // The writer's handle: it keeps appending to the old file until it reopens the path.
    let mut writer = OpenOptions::new().append(true).open(&t).unwrap();
    let e = SpendEngine::open(None, &t, &d).unwrap();
    assert_eq!(e.ingest().unwrap().telemetry_rows, n);
    writer.write_all(lines(n, m).as_bytes()).unwrap();
    std::fs::rename(&t, dir.path().join("telemetry.jsonl.1")).unwrap();
    writer.write_all(lines(n + m, k).as_bytes()).unwrap();
    append(&t, &lines(n + m + k, j));
    let report = e.ingest().unwrap();
    assert_eq!(
        telemetry_rows(&e),
        (n + m + k + j, n + m + k + j),
        "{report:?}"
    );
    assert_eq!(report.telemetry_rows, m + k + j);
    assert_eq!(report.rotated.len(), 1, "{report:?}");
}

#[test]
fn a_rename_rotation_waits_for_the_writer_to_reopen() {
    // logrotate renames, then creates an empty file, then signals the writer: until the writer
    // writes to the new file, the old one is still the log.
    let (dir, t, d) = logs();
    append(&t, &lines(0, 10));
    let mut writer = OpenOptions::new().append(true).open(&t).unwrap();
    let e = SpendEngine::open(None, &t, &d).unwrap();
    e.ingest().unwrap();
    std::fs::rename(&t, dir.path().join("telemetry.jsonl.1")).unwrap();
    writer.write_all(lines(10, 4).as_bytes()).unwrap();
    assert_eq!(
        e.ingest().unwrap().telemetry_rows,
        4,
        "path missing: tail the held file"
    );
    File::create(&t).unwrap();
    writer.write_all(lines(14, 3).as_bytes()).unwrap();
    assert_eq!(
        e.ingest().unwrap().telemetry_rows,
        3,
        "new file empty: still the old one"
    );
    writer.write_all(lines(17, 2).as_bytes()).unwrap();
    drop(writer);
    append(&t, &lines(19, 6));
    let report = e.ingest().unwrap();
    assert_eq!(report.telemetry_rows, 8, "{report:?}");
    assert_eq!(telemetry_rows(&e), (25, 25));
}

#[test]
fn rows_and_malformed_lines_add_up_to_the_lines_across_a_rotation() {
    let (dir, t, d) = logs();
    let old = dir.path().join("telemetry.jsonl.1");
    append(&t, &lines(0, 20));
    append(&t, "{not json\n");
    let mut writer = OpenOptions::new().append(true).open(&t).unwrap();
    let e = SpendEngine::open(None, &t, &d).unwrap();
    let first = e.ingest().unwrap();
    assert_eq!((first.telemetry_rows, first.malformed.len()), (20, 1));
    writer.write_all(lines(20, 5).as_bytes()).unwrap();
    writer
        .write_all(b"{\"timestamp\": \"not a time\", \"tenant_id\": \"x\", \"cost_usd\": 1}\n")
        .unwrap();
    std::fs::rename(&t, &old).unwrap();
    writer.write_all(lines(25, 5).as_bytes()).unwrap();
    // The writer died mid-line: this fragment will never be completed.
    let fragment_at = std::fs::metadata(&old).unwrap().len();
    writer
        .write_all(b"{\"timestamp\": \"2025-11-25T10:00:00Z\", \"ten")
        .unwrap();
    drop(writer);
    append(&t, &lines(30, 4));
    append(&t, "[]\n");
    append(&t, &lines(34, 2));
    let report = e.ingest().unwrap();
    let text_lines = |p: &Path| {
        let text = std::fs::read(p).unwrap();
        text.split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .count() as u64
    };
    let all_lines = text_lines(&old) + text_lines(&t);
    let (rows, _) = telemetry_rows(&e);
    let (malformed, _) = e.malformed_total();
    assert_eq!((rows, malformed), (36, 4), "{report:?}");
    assert_eq!(
        rows + malformed,
        all_lines,
        "every line is a row or malformed"
    );
    assert!(
        report
            .malformed
            .iter()
            .any(|m| m.contains("telemetry.jsonl") && m.contains(&format!(":{fragment_at}:"))),
        "the fragment is named by file and offset: {:?}",
        report.malformed
    );
}

#[test]
fn copytruncate_is_read_again_from_the_start() {
    let (dir, t, d) = logs();
    append(&t, &lines(0, 30));
    let e = SpendEngine::open(None, &t, &d).unwrap();
    e.ingest().unwrap();
    // Copied away, truncated in place (same file), then written again: shorter than the cursor.
    std::fs::copy(&t, dir.path().join("telemetry.jsonl.1")).unwrap();
    OpenOptions::new()
        .write(true)
        .open(&t)
        .unwrap()
        .set_len(0)
        .unwrap();
    append(&t, &lines(30, 3));
    let report = e.ingest().unwrap();
    assert_eq!((report.telemetry_rows, report.rotated.len()), (3, 1));
    assert_eq!(telemetry_rows(&e), (33, 33), "rows already ingested stay");
    // Truncated and written past the old cursor before the next pass: the head differs.
    OpenOptions::new()
        .write(true)
        .open(&t)
        .unwrap()
        .set_len(0)
        .unwrap();
    append(&t, &lines(100, 40));
    let report = e.ingest().unwrap();
    assert_eq!((report.telemetry_rows, report.rotated.len()), (40, 1));
    assert_eq!(telemetry_rows(&e), (73, 73));
}

#[test]
fn a_restart_finds_a_rotated_file_by_its_head() {
    let (dir, t, d) = logs();
    let db = dir.path().join("state.duckdb");
    append(&t, &lines(0, 10));
    {
        let e = SpendEngine::open(Some(&db), &t, &d).unwrap();
        e.ingest().unwrap();
    }
    std::fs::rename(&t, dir.path().join("telemetry.jsonl.1")).unwrap();
    append(&t, &lines(10, 20));
    let e = SpendEngine::open(Some(&db), &t, &d).unwrap();
    let report = e.ingest().unwrap();
    assert_eq!((report.telemetry_rows, report.rotated.len()), (20, 1));
    assert_eq!(telemetry_rows(&e), (30, 30));
}

fn position(path: &Path) -> LogPosition {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).unwrap();
    LogPosition {
        file_id: meta.ino(),
        offset: meta.len(),
    }
}

#[test]
fn reports_name_each_telemetry_file_read_with_its_offset() {
    let (dir, t, d) = logs();
    let old = dir.path().join("telemetry.jsonl.1");
    let e = SpendEngine::open(None, &t, &d).unwrap();
    let report = e.ingest().unwrap();
    assert_eq!(report.telemetry_through, [], "no telemetry file yet");
    assert_eq!(e.telemetry_position(), None);

    append(&t, &lines(0, 10));
    let mut writer = OpenOptions::new().append(true).open(&t).unwrap();
    let first = position(&t);
    let report = e.ingest().unwrap();
    assert_eq!(report.telemetry_through, [first]);
    assert_eq!(report.telemetry_offset, first.offset);
    assert_eq!(e.telemetry_position(), Some(first));
    let report = e.ingest().unwrap();
    assert_eq!(
        report.telemetry_through,
        [first],
        "listed when nothing new was read"
    );

    std::fs::rename(&t, &old).unwrap();
    writer.write_all(lines(10, 3).as_bytes()).unwrap();
    append(&t, &lines(13, 2));
    append(&t, "{\"timestamp\":\"2025-11-25T10:00:00Z\",\"ten"); // torn: not ingested yet
    let (drained, current) = (position(&old), position(&t));
    let torn = u64::try_from(line(14).len() + line(13).len()).unwrap();
    let report = e.ingest().unwrap();
    assert_ne!(drained.file_id, current.file_id);
    assert_eq!(
        report.telemetry_through,
        [
            drained,
            LogPosition {
                file_id: current.file_id,
                offset: torn
            }
        ],
        "the drained old file at its end, then the new one at its cursor"
    );
    assert_eq!(report.telemetry_offset, torn);
    assert_eq!(
        e.telemetry_position(),
        report.telemetry_through.last().copied()
    );
    assert_eq!(telemetry_rows(&e), (15, 15));
    let report = e.ingest().unwrap();
    assert_eq!(
        report.telemetry_through.len(),
        1,
        "the old file is not listed again: {report:?}"
    );
}

#[test]
fn an_old_file_truncated_below_the_cursor_before_its_drain_is_read_from_its_start() {
    let (dir, t, d) = logs();
    let old = dir.path().join("telemetry.jsonl.1");
    append(&t, &lines(0, 20));
    let e = SpendEngine::open(None, &t, &d).unwrap();
    e.ingest().unwrap();
    std::fs::rename(&t, &old).unwrap();
    let held = OpenOptions::new().write(true).open(&old).unwrap();
    held.set_len(0).unwrap();
    append(&t, &lines(20, 3));
    let report = e.ingest().unwrap();
    assert_eq!(report.telemetry_rows, 3, "{report:?}");
    assert_eq!(
        report.telemetry_through[0],
        LogPosition {
            file_id: position(&old).file_id,
            offset: 0
        }
    );
    assert_eq!(telemetry_rows(&e), (23, 23));
}

#[test]
fn a_fresh_engine_reads_the_rotated_logs_before_the_current_one() {
    let (_dir, t, d) = logs();
    let rotated = |n: u32| PathBuf::from(format!("{}.{n}", t.display()));
    append(&rotated(2), &lines(0, 3));
    append(&rotated(1), &lines(3, 4));
    // A gap ends the list: `.4` without `.3` is not read.
    append(&rotated(4), &lines(100, 50));
    append(&t, &lines(7, 2));
    let e = SpendEngine::open(None, &t, &d).unwrap();
    assert_eq!(e.ingest_rotated().unwrap(), 7);
    e.ingest().unwrap();
    assert_eq!(telemetry_rows(&e), (9, 9));
    // Once the current log was read, rotated files are history already in the tables.
    assert_eq!(e.ingest_rotated().unwrap(), 0);
    assert_eq!(telemetry_rows(&e), (9, 9));
}

#[test]
fn a_head_taken_mid_write_of_the_first_line_is_the_same_file() {
    // A pass can take the head while the writer is still writing the first line, then read
    // lines written after it: the next pass sees the whole first line and must not take the
    // file for a rotated one (it used to, and read everything again: 4041 rows for 4000).
    let (_dir, t, _) = logs();
    append(&t, &lines(0, 3));
    let file = File::open(&t).unwrap();
    let whole = read_head(&file).unwrap();
    let partial = Cursor {
        offset: 20,
        head: whole[..10].to_owned(),
        malformed: 0,
    };
    assert_eq!(
        resume_at(&file, &partial).unwrap(),
        (20, false, whole.clone())
    );
    let other = Cursor {
        offset: 20,
        head: "{\"timestamp\":\"1999".into(),
        malformed: 0,
    };
    assert!(
        resume_at(&file, &other).unwrap().1,
        "another first line is a rotation"
    );
}

#[test]
fn computed_aggregates_say_until_when_they_stay_exact_without_new_rows() {
    use llmscope_sdk::types::{Aggregate, Aggregation, Metric, Scope, Window};
    let (_dir, t, d) = logs();
    // 2025-11-25T10:00:00Z and, from a writer whose clock is ahead, 10:30.
    let at_10 = 1_764_064_800_000u64;
    append(&t, &line(1));
    append(
        &t,
        &line(2).replace("2025-11-25T10:00:00Z", "2025-11-25T10:30:00Z"),
    );
    let e = SpendEngine::open(None, &t, &d).unwrap();
    e.ingest().unwrap();
    let avg = |w| Aggregate {
        key: "k".into(),
        metric: Metric::CostUsd,
        aggregation: Aggregation::Avg,
        window: w,
        scope: vec![Scope::Tenant],
        include_in_flight: false,
    };
    // At 10:10 with a one-hour window: the 10:30 row enters at 10:30, before the 10:00 row
    // leaves at 11:00.
    let now = at_10 + 600_000;
    let p = e
        .compute(&[avg(Window::RollingSeconds(3600))], now)
        .unwrap();
    assert!(p.unchanged_at(now + 1_199_000));
    assert!(!p.unchanged_at(at_10 + 1_800_000));
    // At 10:40 with a 15-minute window: the 10:30 row leaves at 10:45.
    let now = at_10 + 2_400_000;
    let p = e.compute(&[avg(Window::RollingSeconds(900))], now).unwrap();
    assert!(p.unchanged_at(at_10 + 2_699_000));
    assert!(!p.unchanged_at(at_10 + 2_700_000));
    // A calendar window alone: exact until rows are added.
    let p = e.compute(&[avg(Window::CalendarDay)], now).unwrap();
    assert!(p.unchanged_at(now + 86_400_000));
}

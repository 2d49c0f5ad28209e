//! The writer: whole lines and their end offsets, write-ahead decisions, rotation following.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use super::log_file::FOLLOW_INTERVAL;
use super::*;

#[tokio::test]
async fn appends_whole_lines_and_reports_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let (t, d) = (
        dir.path().join("logs/t.jsonl"),
        dir.path().join("logs/d.jsonl"),
    );
    let w = ArtifactWriter::start(&t, &d).unwrap();
    let rec = TelemetryRecord {
        request_id: "r1".into(),
        ..TelemetryRecord::default()
    };
    let first = w.append(&rec, None).await.unwrap();
    let second = w.append(&rec, None).await.unwrap();
    w.shutdown();
    let text = std::fs::read_to_string(&t).unwrap();
    assert_eq!(text.lines().count(), 2);
    let (first, second) = (first.telemetry.unwrap(), second.telemetry.unwrap());
    assert_eq!(second.offset, text.len() as u64);
    assert_eq!(first.offset * 2, second.offset);
    assert_eq!(first.file_id, std::fs::metadata(&t).unwrap().ino());
    let back: TelemetryRecord = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(back.request_id, "r1");
}

/// Many concurrent writers on a multi-threaded runtime, enough to make leaders hand off to
/// a thread: every line lands whole, once, at the offset its writer was told.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_each_land_once_at_their_reported_offset() {
    let dir = tempfile::tempdir().unwrap();
    let (t, d) = (dir.path().join("t.jsonl"), dir.path().join("d.jsonl"));
    let w = Arc::new(ArtifactWriter::start(&t, &d).unwrap());
    let mut tasks = Vec::new();
    for task in 0..32 {
        let w = Arc::clone(&w);
        tasks.push(tokio::spawn(async move {
            let mut ends = Vec::new();
            for i in 0..200 {
                let rec = TelemetryRecord {
                    request_id: format!("r-{task}-{i}"),
                    ..TelemetryRecord::default()
                };
                let written = w.append(&rec, None).await.unwrap();
                ends.push((rec.request_id, written.telemetry.unwrap().offset));
            }
            ends
        }));
    }
    let mut ends = Vec::new();
    for t in tasks {
        ends.extend(t.await.unwrap());
    }
    w.shutdown();
    let text = std::fs::read_to_string(&t).unwrap();
    assert_eq!(text.lines().count(), 32 * 200);
    for (id, end) in &ends {
        let end = usize::try_from(*end).unwrap();
        let line = text[..end].lines().last().unwrap();
        let back: TelemetryRecord = serde_json::from_str(line).unwrap();
        assert_eq!(&back.request_id, id);
    }
    let rec = TelemetryRecord::default();
    assert!(
        w.append(&rec, None).await.is_err(),
        "a stopped writer refuses lines"
    );
}

#[tokio::test]
async fn a_decision_is_written_ahead_alone_and_rotation_is_followed() {
    let dir = tempfile::tempdir().unwrap();
    let (t, d) = (dir.path().join("t.jsonl"), dir.path().join("d.jsonl"));
    let w = ArtifactWriter::start(&t, &d).unwrap();
    let decision = DecisionRecord {
        timestamp: rfc3339(0),
        request_id: "r1".into(),
        tenant_id: "acme".into(),
        caller_id: None,
        feature_id: None,
        experiment_id: None,
        budget_namespace: None,
        route_name: "chat".into(),
        requested_model_tier: "cheap".into(),
        effective_model_tier: "cheap".into(),
        primitive: None,
        decision: "allow".into(),
        reason: None,
        policy_id: None,
        estimated_cost_usd: 0.5,
        latency_ms: 0.0,
        window_cost_usd: None,
        window_limit_usd: None,
        policy_version: "1".into(),
        reservation: Some(ReservationRecord {
            model: "gpt-4o".into(),
            provider: "mock".into(),
            cost_usd: 0.5,
            tokens_in: 10,
            tokens_out: 20,
        }),
        alerts: &[],
        rules: &[],
        policy_input: None,
    };
    w.append_decision(&decision).await.unwrap();
    assert_eq!(std::fs::read_to_string(&d).unwrap().lines().count(), 1);
    assert!(std::fs::read_to_string(&t).unwrap().is_empty());
    // logrotate's default: rename, and the writer follows the path on its next batch.
    std::fs::rename(&t, dir.path().join("t.jsonl.1")).unwrap();
    std::fs::rename(&d, dir.path().join("d.jsonl.1")).unwrap();
    std::thread::sleep(FOLLOW_INTERVAL + std::time::Duration::from_millis(20));
    let rec = TelemetryRecord {
        request_id: "r1".into(),
        ..TelemetryRecord::default()
    };
    let at = w.append(&rec, None).await.unwrap().telemetry.unwrap();
    w.append_decision(&decision).await.unwrap();
    assert_eq!(std::fs::read_to_string(&t).unwrap().lines().count(), 1);
    assert_eq!(at.file_id, std::fs::metadata(&t).unwrap().ino());
    assert_eq!(std::fs::read_to_string(&d).unwrap().lines().count(), 1);
    // SIGHUP's reopen with the path unchanged keeps appending to the same file.
    w.reopen();
    w.append(&rec, None).await.unwrap();
    w.shutdown();
    assert_eq!(std::fs::read_to_string(&t).unwrap().lines().count(), 2);
}

#[tokio::test]
async fn unwritable_path_is_an_error_naming_it() {
    let err = ArtifactWriter::start(Path::new("/proc/llmscope/t.jsonl"), Path::new("/proc/x"))
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .starts_with("cannot append to /proc/llmscope/t.jsonl"),
        "{err}"
    );
}

//! Test helper: append `count` telemetry + decision line pairs through llmscope's artifact
//! writer (the gateway's own code path: one writer thread, fs2 lock, one write per batch), from
//! 32 concurrent tasks. `tests/faults.rs` runs eight of these at once against the same files.
//!
//! Usage: `append_load <telemetry> <decisions> <count> <tag>`; request ids are `<tag>-<i>`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use llmscope::artifacts::{rfc3339, ArtifactWriter, DecisionRecord, TelemetryRecord};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, telemetry, decisions, count, tag] = args.as_slice() else {
        eprintln_usage();
        return ExitCode::from(2);
    };
    let Ok(count) = count.parse::<usize>() else {
        eprintln_usage();
        return ExitCode::from(2);
    };
    let writer = match ArtifactWriter::start(&PathBuf::from(telemetry), &PathBuf::from(decisions)) {
        Ok(w) => Arc::new(w),
        Err(e) => {
            let _ = std::io::Write::write_all(&mut std::io::stderr(), format!("{e}\n").as_bytes());
            return ExitCode::from(1);
        }
    };
    let Ok(runtime) = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    else {
        return ExitCode::from(1);
    };
    let tasks = 32;
    let failed = runtime.block_on(async {
        let mut handles = Vec::new();
        for t in 0..tasks {
            let (writer, tag) = (Arc::clone(&writer), tag.clone());
            handles.push(tokio::spawn(async move {
                let mut failed = 0usize;
                for i in (t..count).step_by(tasks) {
                    let id = format!("{tag}-{i}");
                    let telemetry = TelemetryRecord {
                        timestamp: rfc3339(1_764_000_000_000 + i as u64),
                        request_id: id.clone(),
                        tenant_id: tag.clone(),
                        status: "ok".into(),
                        cost_usd: 0.001,
                        ..TelemetryRecord::default()
                    };
                    let decision = DecisionRecord {
                        timestamp: telemetry.timestamp.clone(),
                        request_id: id,
                        tenant_id: tag.clone(),
                        caller_id: None,
                        feature_id: None,
                        experiment_id: None,
                        budget_namespace: Some("default".into()),
                        route_name: "/answer-routed".into(),
                        requested_model_tier: "cheap".into(),
                        effective_model_tier: "cheap".into(),
                        primitive: None,
                        decision: "allow".into(),
                        reason: None,
                        policy_id: None,
                        estimated_cost_usd: 0.001,
                        latency_ms: 0.01,
                        window_cost_usd: None,
                        window_limit_usd: None,
                        policy_version: "load".into(),
                        reservation: None,
                        alerts: &[],
                        rules: &[],
                        policy_input: None,
                    };
                    if writer.append(&telemetry, Some(&decision)).await.is_err() {
                        failed += 1;
                    }
                }
                failed
            }));
        }
        let mut failed = 0;
        for h in handles {
            failed += h.await.unwrap_or(usize::MAX / 64);
        }
        failed
    });
    writer.shutdown();
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn eprintln_usage() {
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        b"usage: append_load <telemetry> <decisions> <count> <tag>\n",
    );
}

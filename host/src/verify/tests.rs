//! Unit tests of `llmscope logs verify`: one log pair per check, built from the gateway's own
//! record types.

use super::*;
use crate::artifacts::{AuditTags, DecisionRecord, TelemetryRecord};

/// A telemetry line as the gateway writes it.
fn tel(id: &str, status: &str, cost: f64) -> String {
    let denied = status == "denied";
    let rec = TelemetryRecord {
        schema_version: "1.0".into(),
        timestamp: "2025-11-24T16:00:00.123Z".into(),
        request_id: id.into(),
        tenant_id: "acme-corp".into(),
        caller_id: Some("svc-a".into()),
        feature_id: Some("summarize".into()),
        use_case: Some("summarize".into()),
        experiment_id: Some("exp-1".into()),
        budget_namespace: "demo".into(),
        audit_tags: AuditTags {
            feature_id: Some("summarize".into()),
            experiment_id: Some("exp-1".into()),
            budget_namespace: "demo".into(),
        },
        route_name: "/conversation-turn".into(),
        route: "/conversation-turn".into(),
        requested_model_tier: "cheap".into(),
        model_tier: "cheap".into(),
        provider: "mock".into(),
        model: "gpt-4o-mini".into(),
        tokens_in: 42,
        tokens_out: if denied { 0 } else { 120 },
        tokens_total: if denied { 42 } else { 162 },
        estimated_cost_usd: 0.000_306_3,
        cost_usd: cost,
        cost_source: if denied { "none" } else { "tokenizer" }.into(),
        latency_ms: if denied { 0.0 } else { 12.5 },
        held_ms: (!denied).then_some(13.0),
        status: status.into(),
        finish_reason: (!denied).then(|| "stop".into()),
        is_fallback: false,
        fallback_reason: None,
        error_type: (status == "error").then(|| "upstream_error".into()),
        policy_decision: if denied { "deny" } else { "allow" }.into(),
        policy_id: denied.then(|| "tight-cap".into()),
        timed_out_cost_usd: 0.0,
        streamed: false,
        stream_cut_at_tokens: None,
        embeddings: false,
    };
    format!("{}\n", serde_json::to_string(&rec).unwrap())
}

/// A decision line as the gateway writes it.
fn dec(id: &str, decision: &str, estimate: f64) -> String {
    let rec = DecisionRecord {
        timestamp: "2025-11-24T16:00:00.123Z".into(),
        request_id: id.into(),
        tenant_id: "acme-corp".into(),
        caller_id: Some("svc-a".into()),
        feature_id: Some("summarize".into()),
        experiment_id: Some("exp-1".into()),
        budget_namespace: Some("demo".into()),
        route_name: "/conversation-turn".into(),
        requested_model_tier: "cheap".into(),
        effective_model_tier: "cheap".into(),
        primitive: Some("budget_threshold".into()),
        decision: decision.into(),
        reason: (decision == "deny").then(|| "Tight budget exceeded".into()),
        policy_id: Some("tight-cap".into()),
        estimated_cost_usd: estimate,
        latency_ms: 0.042,
        window_cost_usd: Some(0.0),
        window_limit_usd: Some(1.0),
        policy_version: "0.1.0".into(),
        reservation: None,
        alerts: &[],
        rules: &[],
        policy_input: None,
    };
    format!("{}\n", serde_json::to_string(&rec).unwrap())
}

fn check(telemetry: &str, decisions: &str, options: Options) -> Summary {
    let mut v = Verifier::new("t.jsonl", "d.jsonl", options);
    v.read_telemetry(telemetry.as_bytes()).unwrap();
    v.read_decisions(decisions.as_bytes()).unwrap();
    v.finish()
}

fn strict(telemetry: &str, decisions: &str) -> Summary {
    check(telemetry, decisions, Options::default())
}

/// The listed problems as text.
fn problems(s: &Summary) -> Vec<String> {
    s.problems.iter().map(ToString::to_string).collect()
}

/// Exactly one problem, of `kind`, whose text is returned.
fn only(s: &Summary, kind: ProblemKind) -> String {
    assert_eq!(s.problem_count, 1, "{}", s.to_text());
    assert_eq!(s.problems[0].kind, kind, "{}", s.to_text());
    assert!(!s.consistent);
    s.problems[0].to_string()
}

fn consistent_pair() -> (String, String) {
    let t = [
        tel("r1", "ok", 0.000_078_3),
        tel("r2", "denied", 0.0),
        tel("r3", "error", 0.0),
        tel("r4", "cancelled", 0.000_1),
        tel("r5", "unanswered", 0.000_306_3),
    ]
    .concat();
    let d = [
        dec("r1", "allow", 0.000_306_3),
        dec("r2", "deny", 0.000_306_3),
        dec("r3", "downgrade", 0.000_306_3),
        dec("r4", "allow", 0.000_306_3),
        dec("r5", "allow", 0.000_306_3),
    ]
    .concat();
    (t, d)
}

#[test]
fn a_consistent_pair_passes_with_its_counts() {
    let (t, d) = consistent_pair();
    let s = strict(&t, &d);
    assert!(s.consistent, "{}", s.to_text());
    assert_eq!((s.telemetry.lines, s.telemetry.records), (5, 5));
    assert_eq!((s.decisions.lines, s.decisions.records), (5, 5));
    assert_eq!(
        s.requests_by_status,
        StatusCounts {
            ok: 1,
            error: 1,
            denied: 1,
            cancelled: 1,
            unanswered: 1,
            unknown: 0
        }
    );
    assert_eq!(
        s.decisions_by_verdict,
        VerdictCounts {
            allow: 3,
            downgrade: 1,
            deny: 1,
            unknown: 0
        }
    );
    assert!((s.total_cost_usd - 0.000_484_6).abs() < 1e-12);
    assert_eq!(s.unanswered.count, 0);
    assert!(s.problems.is_empty() && s.problems_by_kind.is_empty());
    let text = s.to_text();
    assert!(
        text.contains("t.jsonl: 5 lines, 5 records")
            && text.contains("ok 1, error 1, denied 1, cancelled 1, unanswered 1")
            && text.contains("cost        0.000485 USD")
            && text.ends_with("problems    0\nconsistent\n"),
        "{text}"
    );
}

#[test]
fn empty_logs_are_consistent() {
    let s = strict("", "");
    assert!(s.consistent);
    assert_eq!(s.telemetry.lines + s.decisions.lines, 0);
}

#[test]
fn blank_lines_are_skipped_and_crlf_is_accepted() {
    let t = format!("\n{}  \n", tel("r1", "ok", 0.1).replace('\n', "\r\n"));
    let s = strict(&t, &dec("r1", "allow", 0.2));
    assert!(s.consistent, "{}", s.to_text());
    assert_eq!((s.telemetry.lines, s.telemetry.records), (3, 1));
}

#[test]
fn a_malformed_line_is_named_by_file_line_and_offset() {
    let first = tel("r1", "ok", 0.1);
    let t = format!("{first}{{\"timestamp\": \"yesterday\"\n");
    let s = strict(&t, &dec("r1", "allow", 0.2));
    let p = only(&s, ProblemKind::Malformed);
    assert!(
        p.starts_with(&format!(
            "t.jsonl:2 (byte {}): not a telemetry record: ",
            first.len()
        )),
        "{p}"
    );
    assert_eq!((s.telemetry.lines, s.telemetry.records), (2, 1));

    let s = strict(
        &first,
        &format!(
            "{}{}",
            dec("r1", "allow", 0.2),
            dec("r2", "allow", 0.2).replace("2025-11-24T16:00:00.123Z", "yesterday")
        ),
    );
    let p = only(&s, ProblemKind::Malformed);
    assert!(p.starts_with("d.jsonl:2 (byte "), "{p}");
    assert!(p.contains("timestamp \"yesterday\""), "{p}");
}

#[test]
fn a_missing_field_is_malformed() {
    let t = tel("r1", "ok", 0.1).replace("\"tenant_id\":\"acme-corp\",", "");
    let p = only(&strict(&t, ""), ProblemKind::Malformed);
    assert!(
        p.ends_with("missing field `tenant_id` at column 741"),
        "{p}"
    );
}

#[test]
fn a_last_line_without_newline_is_torn() {
    let whole = tel("r1", "ok", 0.1);
    let partial = &tel("r2", "ok", 0.1)[..40];
    let s = strict(&format!("{whole}{partial}"), &dec("r1", "allow", 0.2));
    let p = only(&s, ProblemKind::TornLastLine);
    assert_eq!(
        p,
        format!(
            "t.jsonl:2 (byte {}): torn last line: no trailing newline (a write in progress, \
             or a crash mid-write)",
            whole.len()
        )
    );
    // Even a complete record is torn without its newline: it is not in the log yet.
    let d = dec("r1", "allow", 0.2);
    let s = strict(&whole, d.trim_end());
    assert_eq!(s.problem_count, 2, "{}", s.to_text());
    assert_eq!(
        s.problems_by_kind.keys().copied().collect::<Vec<_>>(),
        [ProblemKind::TornLastLine, ProblemKind::NoDecision]
    );
}

#[test]
fn a_record_without_request_id_is_a_problem() {
    let t = tel("", "ok", 0.1);
    let p = only(&strict(&t, ""), ProblemKind::MissingRequestId);
    assert_eq!(p, "t.jsonl:1 (byte 0): no request_id");
}

#[test]
fn duplicate_request_ids_are_reported_in_either_file() {
    let t1 = tel("r1", "ok", 0.1);
    let t = format!("{t1}{}", tel("r1", "ok", 0.1));
    let s = strict(&t, &dec("r1", "allow", 0.2));
    assert_eq!(
        only(&s, ProblemKind::DuplicateRequestId),
        format!(
            "t.jsonl:2 (byte {}): duplicate request_id \"r1\" (first at line 1)",
            t1.len()
        )
    );
    let d = format!("{}{}", dec("r1", "allow", 0.2), dec("r1", "allow", 0.2));
    let s = strict(&t1, &d);
    let p = only(&s, ProblemKind::DuplicateRequestId);
    assert!(
        p.starts_with("d.jsonl:2 ") && p.ends_with("duplicate request_id \"r1\" (first at line 1)"),
        "{p}"
    );
}

#[test]
fn an_unanswered_decision_fails_unless_allowed() {
    let t = tel("r1", "ok", 0.1);
    let d = [
        dec("r1", "allow", 0.2),
        dec("r2", "allow", 0.25),
        dec("r3", "downgrade", 0.5),
    ]
    .concat();
    let s = strict(&t, &d);
    assert_eq!(s.problem_count, 2);
    assert_eq!(s.problems_by_kind[&ProblemKind::Unanswered], 2);
    assert!(problems(&s)[0].ends_with(
        "request_id \"r2\" has no telemetry line: unanswered (in flight, or lost in a \
         crash), estimate 0.250000 USD"
    ));
    assert!(problems(&s)[1].starts_with("d.jsonl:3 "));
    assert_eq!(s.unanswered.count, 2);
    assert!((s.unanswered.estimate_usd - 0.75).abs() < 1e-12);
    assert!(!s.unanswered.allowed);

    let s = check(
        &t,
        &d,
        Options {
            allow_unanswered: true,
        },
    );
    assert!(s.consistent, "{}", s.to_text());
    assert_eq!(s.unanswered.count, 2);
    assert!((s.unanswered.estimate_usd - 0.75).abs() < 1e-12);
    assert!(
        s.to_text()
            .contains("unanswered  2 decisions without telemetry, estimate 0.750000 USD (allowed)"),
        "{}",
        s.to_text()
    );
}

#[test]
fn a_telemetry_line_without_decision_is_a_problem() {
    let t = [tel("r1", "ok", 0.1), tel("r2", "ok", 0.1)].concat();
    let s = strict(&t, &dec("r1", "allow", 0.2));
    assert_eq!(
        only(&s, ProblemKind::NoDecision),
        format!(
            "t.jsonl:2 (byte {}): request_id \"r2\" has no decision",
            tel("r1", "ok", 0.1).len()
        )
    );
}

#[test]
fn deny_and_denied_go_together() {
    let s = strict(&tel("r1", "ok", 0.1), &dec("r1", "deny", 0.2));
    assert_eq!(
        only(&s, ProblemKind::DecisionMismatch),
        "d.jsonl:1 (byte 0): request_id \"r1\": decision deny, but its telemetry (line 1) \
         has status ok"
    );
    // Allowed by the rules, refused locally (an Envoy filter failing closed): consistent.
    let s = strict(&tel("r1", "denied", 0.0), &dec("r1", "downgrade", 0.2));
    assert!(s.consistent, "{}", s.to_text());
}

#[test]
fn a_denied_request_costs_nothing() {
    let s = strict(&tel("r1", "denied", 0.01), &dec("r1", "deny", 0.2));
    assert_eq!(
        only(&s, ProblemKind::BadCost),
        "t.jsonl:1 (byte 0): status denied with cost_usd 0.01: a denied request costs 0"
    );
}

#[test]
fn unknown_statuses_and_decisions_are_problems() {
    let s = strict(&tel("r1", "timeout", 0.0), &dec("r1", "allow", 0.2));
    assert!(only(&s, ProblemKind::UnknownValue).ends_with(
        "unknown status \"timeout\" (expected ok, error, denied, cancelled or unanswered)"
    ));
    assert_eq!(s.requests_by_status.unknown, 1);
    assert!(s.to_text().contains(", unknown 1\n"));
    let s = strict(&tel("r1", "ok", 0.0), &dec("r1", "maybe", 0.2));
    assert!(only(&s, ProblemKind::UnknownValue)
        .ends_with("unknown decision \"maybe\" (expected allow, downgrade or deny)"));
    assert_eq!(s.decisions_by_verdict.unknown, 1);
}

#[test]
fn costs_must_be_finite_and_not_negative() {
    let s = strict(&tel("r1", "ok", -0.5), &dec("r1", "allow", 0.2));
    assert!(only(&s, ProblemKind::BadCost).ends_with("cost_usd is -0.5: must be finite and >= 0"));
    assert_eq!(s.total_cost_usd, 0.0, "a bad cost is not summed");
    let t = tel("r1", "ok", 0.1).replace(
        "\"estimated_cost_usd\":0.0003063",
        "\"estimated_cost_usd\":-1.0",
    );
    let s = strict(&t, &dec("r1", "allow", 0.2));
    assert!(only(&s, ProblemKind::BadCost)
        .ends_with("estimated_cost_usd is -1: must be finite and >= 0"));
    let s = strict(&tel("r1", "ok", 0.1), &dec("r1", "allow", -0.2));
    assert!(only(&s, ProblemKind::BadCost)
        .starts_with("d.jsonl:1 (byte 0): estimated_cost_usd is -0.2"));
}

#[test]
fn twenty_problems_are_listed_in_file_order_and_the_rest_counted() {
    // 15 telemetry lines without decision (found last, listed first) and 10 unanswered.
    let t: String = (0..15).map(|i| tel(&format!("t{i}"), "ok", 0.1)).collect();
    let d: String = (0..10)
        .map(|i| dec(&format!("d{i}"), "allow", 0.1))
        .collect();
    let s = strict(&t, &d);
    assert_eq!(
        (s.problem_count, s.problems.len(), s.more_problems),
        (25, 20, 5)
    );
    let lines: Vec<(Log, u64)> = s.problems.iter().map(|p| (p.log, p.line)).collect();
    let expected: Vec<(Log, u64)> = (1..=15)
        .map(|l| (Log::Telemetry, l))
        .chain((1..=5).map(|l| (Log::Decisions, l)))
        .collect();
    assert_eq!(lines, expected);
    let text = s.to_text();
    assert!(
        text.contains("  ... 5 more\nINCONSISTENT: 25 problems\n"),
        "{text}"
    );
}

#[test]
fn the_json_summary_has_every_part() {
    let s = strict(&tel("r1", "ok", 0.1), "");
    let v = serde_json::to_value(&s).unwrap();
    assert_eq!(v["consistent"], false);
    assert_eq!(v["telemetry"]["path"], "t.jsonl");
    assert_eq!(v["requests_by_status"]["ok"], 1);
    assert_eq!(v["problems_by_kind"]["no_decision"], 1);
    assert_eq!(v["problems"][0]["kind"], "no_decision");
    assert_eq!(v["problems"][0]["line"], 1);
    assert_eq!(v["problems"][0]["file"], "t.jsonl");
    assert_eq!(v["unanswered"]["count"], 0);
    assert_eq!(v["more_problems"], 0);
}

#[test]
fn verify_files_names_a_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("telemetry.jsonl");
    std::fs::write(&t, tel("r1", "ok", 0.1)).unwrap();
    let d = dir.path().join("nope.jsonl");
    let err = verify_files(&t, &d, Options::default()).unwrap_err();
    assert!(
        format!("{err:#}").starts_with(&format!("cannot open decisions log {}", d.display())),
        "{err:#}"
    );
    std::fs::write(&d, dec("r1", "allow", 0.1)).unwrap();
    assert!(verify_files(&t, &d, Options::default()).unwrap().consistent);
}

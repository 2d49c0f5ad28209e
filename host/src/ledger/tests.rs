//! Unit tests of the ledger: windows and expiry, ingestion marks, release and settlement.

use super::*;
use llmscope_sdk::testing::request;

fn pos(file_id: u64, offset: u64) -> LogPosition {
    LogPosition { file_id, offset }
}

fn sums(cost_usd: f64) -> Sums {
    Sums {
        cost_usd,
        tokens_in: 1.0,
        tokens_out: 1.0,
        requests: 1.0,
    }
}

#[test]
fn sums_count_only_entries_inside_the_window_and_old_settled_entries_expire() {
    let ledger = Ledger::default();
    let req = request();
    let scope = [Scope::BudgetNamespace];
    ledger
        .reserve(dims("acme"), 1_000, 0.5, 1, 1)
        .settle(sums(0.5), None);
    let live = ledger.reserve(dims("acme"), 5_000, 0.25, 1, 1);
    assert_eq!(ledger.sum(Metric::CostUsd, &scope, &req, 0), (0.75, 2.0));
    assert_eq!(
        ledger.sum(Metric::CostUsd, &scope, &req, 2_000),
        (0.25, 1.0)
    );
    assert_eq!(ledger.sum(Metric::CostUsd, &scope, &req, 6_000), (0.0, 0.0));
    // An unwritten line is never ingested: it leaves only when older than every window.
    ledger.ingested_through(&[pos(1, u64::MAX)]);
    assert_eq!(ledger.sum(Metric::CostUsd, &scope, &req, 0).0, 0.75);
    ledger.expire(10_000);
    assert_eq!(
        ledger.sum(Metric::CostUsd, &scope, &req, 0),
        (0.25, 1.0),
        "the live reservation stays, however old"
    );
    assert_eq!(ledger.len(), (1, 0));
    drop(live);
    assert_eq!(ledger.len(), (0, 0));
}

#[test]
fn a_request_settled_after_its_line_was_published_is_not_counted_twice() {
    let ledger = Ledger::default();
    let req = request();
    let r = ledger.reserve(dims("acme"), 1_000, 0.5, 1, 1);
    ledger.ingested_through(&[pos(1, 500)]);
    r.settle(sums(0.5), Some(pos(1, 400)));
    assert_eq!(ledger.sum(Metric::CostUsd, &[], &req, 0), (0.0, 0.0));
    assert_eq!(ledger.len(), (0, 0));
    ledger
        .reserve(dims("acme"), 1_000, 0.5, 1, 1)
        .settle(sums(0.25), Some(pos(1, 600)));
    assert_eq!(ledger.sum(Metric::CostUsd, &[], &req, 0).0, 0.25);
}

#[test]
fn a_truncated_file_forgets_its_old_mark() {
    let ledger = Ledger::default();
    let req = request();
    ledger.ingested_through(&[pos(1, 10_000)]);
    // copytruncate: same inode, offsets start again; the line at 300 is not ingested yet.
    ledger.ingested_through(&[pos(1, 10_000), pos(1, 100)]);
    ledger
        .reserve(dims("acme"), 1_000, 0.5, 1, 1)
        .settle(sums(0.5), Some(pos(1, 300)));
    assert_eq!(ledger.sum(Metric::CostUsd, &[], &req, 0).0, 0.5);
    ledger.ingested_through(&[pos(1, 299)]);
    assert_eq!(ledger.sum(Metric::CostUsd, &[], &req, 0).0, 0.5);
    ledger.ingested_through(&[pos(1, 300)]);
    assert_eq!(ledger.sum(Metric::CostUsd, &[], &req, 0), (0.0, 0.0));
}

#[test]
fn an_entry_settled_in_a_rotated_file_leaves_when_that_file_is_ingested() {
    let ledger = Ledger::default();
    let req = request();
    ledger
        .reserve(dims("acme"), 1_000, 0.5, 1, 1)
        .settle(sums(0.5), Some(pos(1, 500)));
    // The new file (another inode) ingested far past 500 says nothing about file 1.
    ledger.ingested_through(&[pos(2, 10_000)]);
    assert_eq!(ledger.sum(Metric::CostUsd, &[], &req, 0).0, 0.5);
    ledger.ingested_through(&[pos(1, 500), pos(2, 10_000)]);
    assert_eq!(ledger.sum(Metric::CostUsd, &[], &req, 0), (0.0, 0.0));
}

fn dims(tenant: &str) -> Dims {
    let mut r = request();
    r.tenant_id = tenant.into();
    Dims::of(&r)
}

#[test]
fn reservations_are_released_on_drop_and_moved_on_settle() {
    let ledger = Ledger::default();
    let req = request();
    let scope = [Scope::BudgetNamespace];
    let a = ledger.reserve(dims("acme"), 1_000, 0.5, 10, 20);
    let b = ledger.reserve(dims("globex"), 1_000, 0.25, 10, 20);
    assert_eq!(ledger.sum(Metric::CostUsd, &scope, &req, 0), (0.75, 2.0));
    assert_eq!(
        ledger.sum(Metric::CostUsd, &[Scope::Tenant], &req, 0).0,
        0.5
    );
    drop(b);
    assert_eq!(ledger.sum(Metric::CostUsd, &scope, &req, 0).0, 0.5);
    a.settle(
        Sums {
            cost_usd: 0.2,
            tokens_in: 10.0,
            tokens_out: 5.0,
            requests: 1.0,
        },
        Some(pos(7, 100)),
    );
    assert!((ledger.sum(Metric::CostUsd, &scope, &req, 0).0 - 0.2).abs() < 1e-12);
    ledger.ingested_through(&[pos(7, 99), pos(8, 1_000)]);
    assert!(
        (ledger.sum(Metric::CostUsd, &scope, &req, 0).0 - 0.2).abs() < 1e-12,
        "not yet ingested"
    );
    ledger.ingested_through(&[pos(7, 100)]);
    assert_eq!(ledger.sum(Metric::CostUsd, &scope, &req, 0), (0.0, 0.0));
}

#[test]
fn update_moves_the_reservation_to_the_new_model() {
    let ledger = Ledger::default();
    let req = request();
    let mut r = ledger.reserve(Dims::of(&req), 1_000, 0.008, 100, 500);
    let mut cheap = Dims::of(&req);
    cheap.model = "gpt-4o-mini".into();
    r.update(cheap, 0.0004, 100, 500);
    assert_eq!(
        ledger.sum(Metric::CostUsd, &[Scope::Model], &req, 0).0,
        0.0,
        "request's model is gpt-4o"
    );
    assert!((ledger.sum(Metric::CostUsd, &[], &req, 0).0 - 0.0004).abs() < 1e-12);
}

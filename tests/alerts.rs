//! Alerts through the real binary: `budget_threshold` levels (`alert_at`) raised once per rule,
//! scope and window period into `alerts.jsonl`, not once per request; delivered to webhooks
//! (JSON and Slack bodies) that were down when the alerts were raised, each alert once; not
//! raised or delivered again after a restart; `cost_anomaly` alerts once per feature.
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "integration tests: a failed unwrap or panic is a failed test"
)]

use std::time::{Duration, Instant};

use llmscope_tests::gateway::{read_jsonl, Gateway, Options};
use serde_json::{json, Value};

/// A webhook receiver on `port`: the JSON bodies POSTed to each path.
struct Receiver(llmscope_tests::receiver::Receiver);

impl Receiver {
    async fn start(port: u16) -> Self {
        Self(llmscope_tests::receiver::Receiver::start(port).await)
    }

    fn bodies(&self, path: &str) -> Vec<Value> {
        self.0
            .received()
            .into_iter()
            .filter(|(p, _)| p == path)
            .map(|(_, b)| serde_json::from_slice(&b).unwrap_or(Value::Null))
            .collect()
    }

    /// The bodies POSTed to `path`, once there are `n` (at most 20 s).
    async fn wait(&self, path: &str, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let b = self.bodies(path);
            if b.len() >= n || Instant::now() > deadline {
                return b;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn infer(gw: &Gateway, tenant: &str) -> u16 {
    reqwest::Client::new()
        .post(gw.at("/infer"))
        .json(&json!({"prompt": "hello there", "tenant_id": tenant, "max_tokens": 120}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

const POLICY: &str = r#"version: "1"
namespaces:
  default:
    rules:
      - {id: tenant-cap, primitive: budget_threshold, period: hourly, window: calendar, limit_usd: 0.001, scope: [tenant], alert_at: [0.5, 0.8, 1.0]}
"#;

#[tokio::test(flavor = "multi_thread")]
async fn budget_levels_alert_once_per_scope_and_period_and_reach_webhooks_that_were_down() {
    let port = free_port();
    let mut opts = Options::new(POLICY);
    opts.extra_yaml = format!(
        "alerts:\n  webhooks:\n    - {{name: ops, url: \"http://127.0.0.1:{port}/ops\"}}\n    - {{name: chat, url: \"http://127.0.0.1:{port}/slack\", format: slack}}\n"
    );
    let mut gw = Gateway::start(&opts);
    let alerts_path = gw.telemetry.with_file_name("alerts.jsonl");
    // ~7.4e-5 USD a request against a 0.001 cap: 50% after ~7, 80% after ~11, then refused.
    let mut statuses = Vec::new();
    for _ in 0..20 {
        statuses.push(infer(&gw, "acme").await);
    }
    assert!(statuses.contains(&402), "the cap is reached: {statuses:?}");
    assert_eq!(
        infer(&gw, "beta").await,
        200,
        "another tenant, its own budget"
    );
    let alerts = read_jsonl(&alerts_path);
    let messages: Vec<&str> = alerts
        .iter()
        .map(|a| a["message"].as_str().unwrap())
        .collect();
    assert_eq!(
        messages,
        [
            "hourly budget 50% used (limit $0.0010)",
            "hourly budget 80% used (limit $0.0010)",
            "hourly budget 100% used (limit $0.0010)"
        ],
        "one alert per level, not one per request"
    );
    for a in &alerts {
        assert_eq!(a["scope"], json!({"tenant": "acme"}));
        assert_eq!(a["rule_id"], "tenant-cap");
    }
    // The webhooks were down while the alerts were raised; now up, each gets every alert once.
    let receiver = Receiver::start(port).await;
    let ops = receiver.wait("/ops", 3).await;
    let ids: Vec<&Value> = ops.iter().map(|b| &b["alert_id"]).collect();
    let logged: Vec<&Value> = alerts.iter().map(|a| &a["alert_id"]).collect();
    assert_eq!(ids, logged, "in order, each once");
    let slack = receiver.wait("/slack", 3).await;
    assert!(
        slack[2]["text"].as_str().unwrap().contains("100% used") && slack.len() == 3,
        "{slack:?}"
    );
    // A restart neither raises nor delivers them again.
    gw.stop();
    opts.logs = Some((gw.telemetry.clone(), gw.decisions.clone()));
    let gw2 = Gateway::start(&opts);
    assert_eq!(infer(&gw2, "acme").await, 402);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(read_jsonl(&alerts_path).len(), 3);
    assert_eq!(receiver.bodies("/ops").len(), 3);
    assert_eq!(receiver.bodies("/slack").len(), 3);
    let metrics = gw2.metrics().await;
    assert!(
        metrics.contains("llmscope_alerts_raised_total 0"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cost_anomalies_alert_once_per_feature_and_period() {
    let policy = r#"version: "1"
namespaces:
  default:
    rules:
      - {id: anomaly, primitive: cost_anomaly, baseline_window_hours: 24, threshold_multiplier: 1.5, min_samples: 2, action: alert}
"#;
    let mut opts = Options::new(policy);
    // Refresh often, so the baseline exists after the first requests.
    opts.extra_yaml = "analytics: {refresh_interval_ms: 50}\n".into();
    let gw = Gateway::start(&opts);
    let body = |feature: &str| json!({"prompt": "hello there", "tenant_id": "acme", "feature_id": feature});
    let client = reqwest::Client::new();
    for i in 0..12 {
        for feature in ["chat", "search"] {
            let r = client
                .post(gw.at("/infer"))
                .json(&body(feature))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
        if i == 2 {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    let decisions = read_jsonl(&gw.decisions);
    let alerted = decisions
        .iter()
        .filter(|d| d["alerts"].as_array().is_some_and(|a| !a.is_empty()))
        .count();
    assert!(
        alerted > 4,
        "the estimate at max_output_tokens is far above the average actual cost: {alerted}"
    );
    let alerts = read_jsonl(&gw.telemetry.with_file_name("alerts.jsonl"));
    let features: Vec<&Value> = alerts.iter().map(|a| &a["scope"]["feature"]).collect();
    assert_eq!(features, [&json!("chat"), &json!("search")], "{alerts:?}");
}

//! What the HTTP providers share: the client and its settings, retries with backoff, one POST.

use std::time::{Duration, Instant};

use super::ProviderError;

/// Diagnostics keep the target they had before this file was split out of `providers`.
const TARGET: &str = "llmscope::providers";

/// Shared settings of the HTTP providers.
#[derive(Debug, Clone)]
pub struct HttpProvider {
    pub(super) client: reqwest::Client,
    pub(super) base_url: String,
    pub(super) api_key: Option<String>,
    pub(super) timeout: Duration,
    pub(super) max_retries: u32,
}

impl HttpProvider {
    pub(super) async fn with_retries<T, F, Fut>(
        &self,
        timed_out: &mut u32,
        mut call: F,
    ) -> Result<(T, u32), ProviderError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, ProviderError>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let started = Instant::now();
            let result = match tokio::time::timeout(self.timeout, call()).await {
                Ok(r) => r,
                Err(_) => Err(ProviderError::Timeout(self.timeout)),
            };
            if result.as_ref().is_err_and(ProviderError::may_have_billed) {
                *timed_out += 1;
            }
            match result {
                Ok(c) => return Ok((c, attempt)),
                // A timed-out attempt may still be answered, and billed, by the provider:
                // it is not retried on the same model unpriced; the fallback chain (re-priced
                // and re-checked by the gateway) takes over.
                Err(e)
                    if e.retryable()
                        && !matches!(e, ProviderError::Timeout(_))
                        && attempt <= self.max_retries =>
                {
                    let backoff = Duration::from_millis(100 * (1 << (attempt - 1).min(5)));
                    tracing::warn!(target: TARGET, error = %e, attempt, elapsed_ms = started.elapsed().as_millis() as u64, "provider call failed; retrying");
                    tokio::time::sleep(backoff).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// POST `body` as JSON to `url`; the response once its status is a success (its body not
    /// read yet), else the status error with the provider's error code.
    pub(super) async fn send(
        &self,
        url: &str,
        headers: &[(&str, String)],
        body: serde_json::Value,
    ) -> Result<reqwest::Response, ProviderError> {
        let mut req = self.client.post(url).json(&body);
        for (name, value) in headers {
            req = req.header(*name, value);
        }
        let resp = req.send().await.map_err(|e| {
            if e.is_timeout() {
                ProviderError::Timeout(self.timeout)
            } else {
                ProviderError::Connect(e.to_string())
            }
        })?;
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            let text = resp.text().await.unwrap_or_default();
            return Err(ProviderError::status(status, &text));
        }
        Ok(resp)
    }

    pub(super) async fn post(
        &self,
        url: &str,
        headers: &[(&str, String)],
        body: serde_json::Value,
    ) -> Result<serde_json::Value, ProviderError> {
        let text = self
            .send(url, headers, body)
            .await?
            .text()
            .await
            // The provider accepted the call: a body that breaks off may be billed.
            .map_err(|e| ProviderError::Interrupted(format!("reading the answer: {e}")))?;
        serde_json::from_str(&text).map_err(|e| ProviderError::decode(&e))
    }
}

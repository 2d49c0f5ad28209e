//! The built-in deterministic `mock` provider.

use std::time::Duration;

use super::stream::CompletionStream;
use super::{Completion, CompletionRequest, ProviderError};

/// The mock's settings.
#[derive(Debug, Clone)]
pub struct MockSettings {
    /// Simulated latency (before the answer, or before the first chunk of a stream).
    pub latency: Duration,
    /// Output tokens to report (capped by the request's max tokens).
    pub output_tokens: u32,
    /// Models that fail.
    pub fail_models: Vec<String>,
    /// Chunks a streamed answer is cut into.
    pub stream_chunks: u32,
    /// Delay between two chunks of a stream.
    pub chunk_delay: Duration,
}

/// Answer `req` after the latency, or fail it (503) when its model is one of `fail_models`.
pub(super) async fn complete(
    req: &CompletionRequest,
    m: &MockSettings,
) -> Result<(Completion, u32), ProviderError> {
    fail_or_wait(req, m).await?;
    Ok((mock_completion(req, m.output_tokens), 1))
}

/// Stream the answer [`complete`] would give in `stream_chunks` chunks, `chunk_delay` apart.
pub(super) async fn stream(
    req: &CompletionRequest,
    m: &MockSettings,
) -> Result<(CompletionStream, u32), ProviderError> {
    fail_or_wait(req, m).await?;
    let c = mock_completion(req, m.output_tokens);
    let tokens_out = c.tokens_out.unwrap_or_default();
    let s = CompletionStream::mock(
        &c.text,
        m.stream_chunks,
        m.chunk_delay,
        tokens_out,
        c.finish_reason,
    )
    .await?;
    Ok((s, 1))
}

async fn fail_or_wait(req: &CompletionRequest, m: &MockSettings) -> Result<(), ProviderError> {
    if !m.latency.is_zero() {
        tokio::time::sleep(m.latency).await;
    }
    if m.fail_models.contains(&req.model) {
        return Err(ProviderError::status(
            503,
            &format!(
                r#"{{"error": {{"message": "mock provider configured to fail {}", "type": "server_error"}}}}"#,
                req.model
            ),
        ));
    }
    Ok(())
}

fn mock_completion(req: &CompletionRequest, output_tokens: u32) -> Completion {
    let prompt = req
        .messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .map_or("", |m| m.content.as_str());
    let preview: String = prompt.chars().take(60).collect();
    let tokens_out = output_tokens.min(req.max_tokens);
    Completion {
        text: format!("[mock {}] answer to: {preview}", req.model),
        tokens_in: None,
        tokens_out: Some(tokens_out),
        finish_reason: if tokens_out < output_tokens {
            "length".into()
        } else {
            "stop".into()
        },
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::{CompletionRequest, Message, Provider};
    use super::MockSettings;

    #[tokio::test]
    async fn mock_is_deterministic_and_caps_output() {
        let p = Provider::Mock(MockSettings {
            latency: Duration::ZERO,
            output_tokens: 120,
            fail_models: vec!["bad".into()],
            stream_chunks: 4,
            chunk_delay: Duration::ZERO,
        });
        let req = CompletionRequest {
            request_id: "req-1".into(),
            model: "gpt-4o".into(),
            messages: vec![Message {
                role: "user".into(),
                content: "hello".into(),
            }],
            max_tokens: 50,
            temperature: None,
        };
        let (c, attempts) = p.complete(&req, &mut 0).await.unwrap();
        assert_eq!(
            (c.tokens_out, c.finish_reason.as_str(), attempts),
            (Some(50), "length", 1)
        );
        assert_eq!(c.text, "[mock gpt-4o] answer to: hello");
        let failing = CompletionRequest {
            model: "bad".into(),
            ..req
        };
        assert_eq!(
            p.complete(&failing, &mut 0).await.unwrap_err().kind(),
            "provider_5xx"
        );
    }
}

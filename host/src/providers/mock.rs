//! The built-in deterministic `mock` provider.

use std::time::Duration;

use super::{Completion, CompletionRequest, ProviderError};

/// Answer `req` after `latency`, or fail it (503) when its model is one of `fail_models`.
pub(super) async fn complete(
    req: &CompletionRequest,
    latency: Duration,
    output_tokens: u32,
    fail_models: &[String],
) -> Result<(Completion, u32), ProviderError> {
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if fail_models.contains(&req.model) {
        return Err(ProviderError::status(
            503,
            &format!(
                r#"{{"error": {{"message": "mock provider configured to fail {}", "type": "server_error"}}}}"#,
                req.model
            ),
        ));
    }
    Ok((mock_completion(req, output_tokens), 1))
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

    #[tokio::test]
    async fn mock_is_deterministic_and_caps_output() {
        let p = Provider::Mock {
            latency: Duration::ZERO,
            output_tokens: 120,
            fail_models: vec!["bad".into()],
        };
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

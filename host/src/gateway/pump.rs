//! Forwarding a provider's stream to the client: each text delta counted with the model's BPE
//! as it arrives and cut at the output tokens the reservation covers; usage and finish reason
//! kept for settlement; the provider's stream dropped (its connection closed, so it stops
//! generating) as soon as the client is gone, the stream is cut, or it breaks.

use tokio::sync::mpsc;

use crate::pricing::Tokenizer;
use crate::providers::{CompletionStream, ProviderError, StreamEvent};

/// What the gateway forwards to the HTTP layer of a stream.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamItem {
    /// Generated text.
    Delta(String),
    /// A piece of a tool call (an element of an OpenAI chunk's `delta.tool_calls`).
    ToolCall(serde_json::Value),
    /// Generated text of another delta field (`refusal`, `reasoning_content`, `reasoning`).
    Field(&'static str, String),
    /// The stream ended and was settled: the finish reason and what the request was billed.
    End {
        /// `stop`, `length` (also when the gateway cut the stream), ...
        finish_reason: String,
        /// Input tokens billed.
        tokens_in: u32,
        /// Output tokens billed.
        tokens_out: u32,
        /// What the request cost, USD.
        cost_usd: f64,
    },
    /// The provider's stream broke after it started; the request was settled at what it had
    /// generated. The text names the error's class and status, never the provider's body.
    Error(String),
}

/// How a forwarded stream went, for settlement.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct StreamSettlement {
    /// Output tokens counted (BPE) in what was received.
    pub(super) counted_out: u32,
    /// The reserved output tokens the stream was cut at, when it was.
    pub(super) cut_at: Option<u32>,
    /// Error class, when the provider's stream broke after it started.
    pub(super) broken: Option<&'static str>,
}

/// What pumping a stream gathered.
#[derive(Debug, Default)]
pub(super) struct Pumped {
    /// The text received (and forwarded, up to the cut).
    pub(super) text: String,
    /// The provider's finish reason (`length` when cut).
    pub(super) finish_reason: Option<String>,
    /// Input tokens the provider reported.
    pub(super) tokens_in: Option<u32>,
    /// Output tokens the provider reported.
    pub(super) tokens_out: Option<u32>,
    /// Set when the stream was cut at the reserved output.
    pub(super) cut: bool,
    /// Set when the provider's stream broke.
    pub(super) broken: Option<ProviderError>,
    /// Set when the client went away.
    pub(super) client_gone: bool,
    /// Output tokens (BPE, delta by delta) of everything the provider sent, the part of a
    /// delta trimmed at the cut included: what it generated, forwarded or not.
    pub(super) received_out: u32,
}

/// Forward `stream`'s text to `tx` until the provider ends it, it breaks, the client is gone
/// (`tx` closed) or `cap` output tokens (counted with `tokenizer`, delta by delta) have been
/// forwarded: the delta that crosses the cap is trimmed to fit and the stream is cut there.
pub(super) async fn pump(
    mut stream: CompletionStream,
    tx: &mpsc::Sender<StreamItem>,
    tokenizer: Tokenizer,
    cap: u32,
) -> Pumped {
    let mut p = Pumped::default();
    let mut used = 0u32;
    loop {
        let event = tokio::select! {
            biased;
            () = tx.closed() => {
                p.client_gone = true;
                break;
            }
            e = stream.next() => e,
        };
        let piece = match event {
            Ok(None | Some(StreamEvent::Done)) => break,
            Err(e) => {
                p.broken = Some(e);
                break;
            }
            Ok(Some(StreamEvent::Finish(reason))) => {
                p.finish_reason = Some(reason);
                continue;
            }
            Ok(Some(StreamEvent::Usage {
                tokens_in,
                tokens_out,
            })) => {
                p.tokens_in = tokens_in.or(p.tokens_in);
                p.tokens_out = tokens_out.or(p.tokens_out);
                continue;
            }
            Ok(Some(StreamEvent::Delta(text))) => Piece::Text(text),
            Ok(Some(StreamEvent::Field(field, text))) => Piece::Field(field, text),
            Ok(Some(StreamEvent::ToolCall(call))) => Piece::Call(call),
        };
        let n = tokenizer.count(&piece.text());
        p.received_out = p.received_out.saturating_add(n);
        let (piece, n, cut) = if used.saturating_add(n) > cap {
            let fitted = piece.fit(tokenizer, cap - used);
            let m = tokenizer.count(&fitted.text());
            (fitted, m, true)
        } else {
            (piece, n, false)
        };
        used += n;
        p.text.push_str(&piece.text());
        let item = match piece {
            Piece::Text(t) if t.is_empty() => None,
            Piece::Text(t) => Some(StreamItem::Delta(t)),
            Piece::Field(_, t) if t.is_empty() => None,
            Piece::Field(f, t) => Some(StreamItem::Field(f, t)),
            Piece::Call(c) => Some(StreamItem::ToolCall(c)),
        };
        if let Some(item) = item {
            if tx.send(item).await.is_err() {
                p.client_gone = true;
                break;
            }
        }
        if cut {
            p.cut = true;
            p.finish_reason = Some("length".into());
            break;
        }
    }
    // What arrived but was not taken (the client left, the stream was cut or broke) was
    // generated all the same: its text counts, its usage settles.
    for event in stream.take_buffered() {
        match event {
            StreamEvent::Delta(text) => {
                p.received_out = p.received_out.saturating_add(tokenizer.count(&text));
            }
            StreamEvent::Field(_, text) => {
                p.received_out = p.received_out.saturating_add(tokenizer.count(&text));
            }
            StreamEvent::ToolCall(call) => {
                let text = Piece::Call(call).text();
                p.received_out = p.received_out.saturating_add(tokenizer.count(&text));
            }
            StreamEvent::Usage {
                tokens_in,
                tokens_out,
            } => {
                p.tokens_in = tokens_in.or(p.tokens_in);
                p.tokens_out = tokens_out.or(p.tokens_out);
            }
            StreamEvent::Finish(reason) if !p.cut => p.finish_reason = Some(reason),
            StreamEvent::Finish(_) | StreamEvent::Done => {}
        }
    }
    // Dropping the stream here closes the provider's connection.
    p
}

/// One generated piece of a stream: text, or a piece of a tool call.
enum Piece {
    Text(String),
    Field(&'static str, String),
    Call(serde_json::Value),
}

impl Piece {
    /// What it generated, as output is counted: the text, or the call's name and arguments.
    fn text(&self) -> String {
        match self {
            Self::Text(t) | Self::Field(_, t) => t.clone(),
            Self::Call(c) => {
                let f = &c["function"];
                [&f["name"], &f["arguments"]]
                    .iter()
                    .filter_map(|v| v.as_str())
                    .collect()
            }
        }
    }

    /// The piece trimmed to at most `budget` tokens: text to its longest fitting prefix; a
    /// call's arguments to theirs, dropping its name when even the name does not fit.
    fn fit(self, tokenizer: Tokenizer, budget: u32) -> Self {
        match self {
            Self::Text(t) => Self::Text(fit(tokenizer, &t, budget).to_owned()),
            Self::Field(f, t) => Self::Field(f, fit(tokenizer, &t, budget).to_owned()),
            Self::Call(mut c) => {
                let name = c["function"]["name"].as_str().unwrap_or_default();
                let named = tokenizer.count(name);
                if named > budget {
                    return Self::Text(String::new());
                }
                if let Some(args) = c["function"]["arguments"].as_str() {
                    let kept = fit(tokenizer, args, budget - named).to_owned();
                    c["function"]["arguments"] = serde_json::Value::String(kept);
                }
                Self::Call(c)
            }
        }
    }
}

/// The longest prefix of `text` (cut at a char boundary) that `tokenizer` counts as at most
/// `budget` tokens.
fn fit(tokenizer: Tokenizer, text: &str, budget: u32) -> &str {
    let bounds: Vec<usize> = text
        .char_indices()
        .map(|(i, _)| i)
        .skip(1)
        .chain([text.len()])
        .collect();
    let (mut lo, mut hi) = (0usize, bounds.len());
    // Invariant: prefixes ending at bounds[..lo] fit; those at bounds[hi..] do not.
    while lo < hi {
        let mid = (lo + hi) / 2;
        if tokenizer.count(&text[..bounds[mid]]) <= budget {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    if lo == 0 {
        ""
    } else {
        &text[..bounds[lo - 1]]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_keeps_the_longest_prefix_within_the_budget() {
        let t = Tokenizer::Cl100kBase;
        let text = " one two three four five";
        assert_eq!(t.count(text), 5);
        assert_eq!(fit(t, text, 2), " one two");
        assert_eq!(fit(t, text, 0), "");
        assert_eq!(fit(t, text, 9), text);
        assert_eq!(fit(t, "héllo wörld", 100), "héllo wörld");
    }
}

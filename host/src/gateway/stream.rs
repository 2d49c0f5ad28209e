//! A streamed request through the same lifecycle as any other ([`super::lifecycle`]): admitted
//! (priced, reserved, evaluated, its decision written ahead), dispatched along the fallback
//! chain until a provider's stream has started (its first event arrived: before that a failure
//! falls back, after it nothing does, since bytes have reached the client), forwarded
//! ([`super::pump`]), then settled once, whatever ended it — the provider, the cut at the
//! reserved output, the client leaving (`cancelled`) or the stream breaking (`error`).
//!
//! The whole of it runs on its own task: the HTTP handler only receives the [`StreamStart`]
//! and then the [`StreamItem`]s; dropping them is how a client's departure reaches the task.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use crate::policy::Evaluation;
use crate::pricing::Tokenizer;
use crate::providers::{Completion, ProviderError};

use super::dispatch::{Dispatched, Mode};
use super::lifecycle::{Admission, Admitted, ClientGone, InFlight, Watch};
use super::pump::{pump, Pumped, StreamItem, StreamSettlement};
use super::records::provider_of;
use super::{Gateway, GatewayError, Inference, Outcome};

/// Items buffered between the stream's task and the client's connection.
const STREAM_BUFFER: usize = 16;

/// What is known of a stream before its body: what the response headers say.
#[derive(Debug, Clone)]
pub struct StreamHead {
    /// Request id.
    pub request_id: String,
    /// Model streaming.
    pub model: String,
    /// Its provider.
    pub provider: String,
    /// Tier used.
    pub effective_tier: String,
    /// `allow` or `downgrade`.
    pub decision: String,
}

/// How a streamed request starts.
#[derive(Debug)]
pub enum StreamStart {
    /// A provider is streaming: the head, then the items to forward, ending with
    /// [`StreamItem::End`] or [`StreamItem::Error`].
    Streaming {
        /// The head.
        head: StreamHead,
        /// The items.
        items: mpsc::Receiver<StreamItem>,
    },
    /// Refused by policy before anything was streamed; the provider was not called.
    Denied {
        /// Request id.
        request_id: String,
        /// The evaluation (reason, policy id).
        evaluation: Evaluation,
    },
}

/// A request that ended before any stream started, as a [`StreamStart`].
fn not_streamed(outcome: Result<Outcome, GatewayError>) -> Result<StreamStart, GatewayError> {
    match outcome? {
        Outcome::Denied {
            request_id,
            evaluation,
        } => Ok(StreamStart::Denied {
            request_id,
            evaluation,
        }),
        Outcome::Served(s) => Err(GatewayError::Internal(format!(
            "{} was answered without a stream",
            s.request_id
        ))),
    }
}

impl Gateway {
    /// Process one streamed request. As [`Gateway::handle`], the lifecycle runs on its own
    /// task; this returns once a provider's stream has started (or the request ended before
    /// one did: denied, or every attempt failed). A client that leaves before then is
    /// recorded as `cancelled` and no further attempt is made; one that drops the items
    /// afterwards stops the provider's stream and is settled at what was generated.
    pub async fn handle_stream(
        self: &Arc<Self>,
        inf: Inference,
    ) -> Result<StreamStart, GatewayError> {
        let gone = ClientGone::default();
        let watch = Watch(Some(gone.clone()));
        let (start, started) = oneshot::channel();
        let gw = Arc::clone(self);
        if crate::otel::enabled() {
            let cx = crate::otel::request_context(&inf.trace_context, &inf.route_name);
            tokio::spawn(opentelemetry::context::FutureExt::with_context(
                async move { gw.run_stream(inf, &gone, start).await },
                cx,
            ));
        } else {
            tokio::spawn(async move { gw.run_stream(inf, &gone, start).await });
        }
        let result = started.await;
        watch.answered();
        result.unwrap_or_else(|_| {
            Err(GatewayError::Internal(
                "the stream's task ended without starting it".into(),
            ))
        })
    }

    async fn run_stream(
        &self,
        inf: Inference,
        gone: &ClientGone,
        start: oneshot::Sender<Result<StreamStart, GatewayError>>,
    ) {
        let _in_flight = InFlight::enter(&self.in_flight);
        let Admitted {
            mut req,
            records,
            evaluation,
            target,
            mut reservation,
        } = match self.admit(&inf).await {
            Ok(Admission::Dispatch(admitted)) => *admitted,
            Ok(Admission::Done(outcome)) => return drop(start.send(not_streamed(Ok(outcome)))),
            Err(e) => return drop(start.send(Err(e))),
        };
        let mut d = self
            .dispatch(
                &inf,
                &mut req,
                &target,
                &mut reservation,
                gone,
                Mode::Stream,
            )
            .await;
        let Some((index, model, stream)) = d.streamed.take() else {
            let outcome = self
                .settle(req, target, records, evaluation, d, reservation, gone)
                .await;
            return drop(start.send(not_streamed(outcome)));
        };
        let (tx, items) = mpsc::channel(STREAM_BUFFER);
        let head = StreamHead {
            request_id: req.ctx.request_id.clone(),
            model: model.clone(),
            provider: provider_of(&self.config, &model),
            effective_tier: target.tier.clone(),
            decision: evaluation.decision.as_str().to_owned(),
        };
        // A client gone by now drops `items` with the unsent start: the pump sees `tx` closed.
        drop(start.send(Ok(StreamStart::Streaming { head, items })));
        let tokenizer = self
            .config
            .models
            .get(&model)
            .map_or(Tokenizer::Cl100kBase, |m| Tokenizer::for_model(&model, m));
        let cap = req.priced.tokens_out;
        let forwarding = Instant::now();
        let mut pumped = pump(stream, &tx, tokenizer, cap).await;
        d.latency_ms += (forwarding.elapsed().as_secs_f64() * 1e6).round() / 1e3;
        if pumped.client_gone {
            gone.set();
        }
        let broken = pumped.broken.take();
        streamed(
            &mut d,
            index,
            model,
            pumped,
            tokenizer,
            cap,
            broken.as_ref(),
        );
        let span = crate::otel::child("llmscope.settle", Vec::new());
        let settled = self
            .settle(req, target, records, evaluation, d, reservation, gone)
            .await;
        drop(span);
        super::lifecycle::trace_outcome(&settled);
        if let Some(b) = &broken {
            crate::otel::fail(&format!("stream broke off: {b}"));
        }
        if gone.is_set() {
            return;
        }
        let _ = tx.send(last_item(settled, broken)).await;
    }
}

/// The item ending a settled stream: its end with what it was billed, or the break.
fn last_item(settled: Result<Outcome, GatewayError>, broken: Option<ProviderError>) -> StreamItem {
    match (settled, broken) {
        (_, Some(e)) => StreamItem::Error(format!("the provider's stream broke: {e}")),
        (Ok(Outcome::Served(s)), None) => StreamItem::End {
            finish_reason: s.completion.finish_reason,
            tokens_in: s.tokens_in,
            tokens_out: s.tokens_out,
            cost_usd: s.cost_usd,
        },
        (Ok(Outcome::Denied { .. }), None) => {
            StreamItem::Error("the stream was refused after it started".into())
        }
        (Err(e), None) => StreamItem::Error(e.to_string()),
    }
}

/// Record in `d` what the forwarded stream gathered, as the answer of chain entry `index`
/// (`model`) and how to settle it: its output counted with `tokenizer`, cut at `cap` or not,
/// broken by `broken` or not.
fn streamed(
    d: &mut Dispatched,
    index: usize,
    model: String,
    pumped: Pumped,
    tokenizer: Tokenizer,
    cap: u32,
    broken: Option<&ProviderError>,
) {
    d.stream = Some(StreamSettlement {
        // Without the provider's usage, bill what it generated as the larger of the two
        // counts (per delta, as the provider's tokens arrive, and the text as a whole), and
        // a cut stream at least at the cap: the provider may generate on until it notices
        // the closed connection. Never less than what was received.
        counted_out: pumped
            .received_out
            .max(tokenizer.count(&pumped.text))
            .max(if pumped.cut { cap } else { 0 }),
        cut_at: pumped.cut.then_some(cap),
        broken: broken.map(ProviderError::kind),
    });
    let completion = Completion {
        text: pumped.text,
        tokens_in: pumped.tokens_in,
        tokens_out: pumped.tokens_out,
        // A stream that did not finish says why in the finish reason.
        finish_reason: pumped.finish_reason.unwrap_or_else(|| {
            match (pumped.client_gone, broken) {
                (true, _) => "cancelled",
                (false, Some(_)) => "error",
                (false, None) => "stop",
            }
            .into()
        }),
        choices: Vec::new(),
    };
    d.answered = Some((index, model, completion));
}

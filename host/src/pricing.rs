//! Pricing before dispatch: count input tokens with a real BPE tokenizer (offline, bundled with
//! `tiktoken-rs`), take the route's output-token budget as the expected output, and price every
//! tier of the route.

use llmscope_sdk::types::TierEstimate;

use crate::config::{GatewayConfig, ModelConfig};

/// A BPE vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tokenizer {
    /// GPT-4o / 4.1 / o-series.
    O200kBase,
    /// GPT-4 / 3.5, and the approximation used for non-OpenAI models.
    Cl100kBase,
}

impl Tokenizer {
    /// Parse a tokenizer name.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "o200k_base" => Some(Self::O200kBase),
            "cl100k_base" => Some(Self::Cl100kBase),
            _ => None,
        }
    }

    /// The tokenizer for a model: configured, else by name (GPT-4o family and o-series use
    /// o200k; everything else, including Claude models whose tokenizer is not public, cl100k).
    pub fn for_model(name: &str, model: &ModelConfig) -> Self {
        model
            .tokenizer
            .as_deref()
            .and_then(Self::from_name)
            .unwrap_or_else(|| Self::by_model_name(name))
    }

    /// The tokenizer a model's name implies (see [`Self::for_model`]), for a model without a
    /// configuration (e.g. what an upstream is asked for).
    pub fn by_model_name(name: &str) -> Self {
        let n = name.to_ascii_lowercase();
        if n.starts_with("gpt-4o")
            || n.starts_with("gpt-4.1")
            || n.starts_with("o1")
            || n.starts_with("o3")
            || n.starts_with("o4")
            || n.starts_with("gpt-5")
        {
            Self::O200kBase
        } else {
            Self::Cl100kBase
        }
    }

    /// Number of tokens in `text`. Large texts are counted with the async worker handed over
    /// to the runtime's other tasks ([`tokio::task::block_in_place`]): BPE costs 100–400 ms of
    /// CPU per MiB.
    pub fn count(self, text: &str) -> u32 {
        let multi_thread = || {
            tokio::runtime::Handle::try_current()
                .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
        };
        // The runtime is looked up only for large texts: `count` runs several times per request.
        if text.len() >= OFF_WORKER_BYTES && multi_thread() {
            tokio::task::block_in_place(|| self.count_now(text))
        } else {
            self.count_now(text)
        }
    }

    /// Count on this thread. Whitespace runs longer than [`MAX_WHITESPACE_RUN`] are counted in
    /// pieces (the tokenizer's regex gives up, and tiktoken panics, on a run of ~1M spaces);
    /// that changes the count by at most a token per piece. Should the tokenizer still panic,
    /// the byte length stands in: no token is shorter than a byte, so it never undercounts.
    fn count_now(self, text: &str) -> u32 {
        let bpe = match self {
            Self::O200kBase => tiktoken_rs::o200k_base_singleton(),
            Self::Cl100kBase => tiktoken_rs::cl100k_base_singleton(),
        };
        let counted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            split_long_whitespace(text)
                .map(|piece| bpe.encode_ordinary(piece).len())
                .sum::<usize>()
        }));
        let n = counted.unwrap_or_else(|_| {
            tracing::warn!(
                bytes = text.len(),
                "tokenizer failed; counting one token per byte"
            );
            text.len()
        });
        u32::try_from(n).unwrap_or(u32::MAX)
    }
}

/// Texts at least this long are tokenized off the async worker.
const OFF_WORKER_BYTES: usize = 64 * 1024;

/// Longest whitespace run handed to the tokenizer in one piece.
const MAX_WHITESPACE_RUN: usize = 4096;

/// `text` cut into pieces that together are `text`, none holding a whitespace run longer than
/// [`MAX_WHITESPACE_RUN`] bytes (cuts fall on char boundaries inside such runs).
fn split_long_whitespace(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut run_start = None;
        for (i, c) in rest.char_indices() {
            if !c.is_whitespace() {
                run_start = None;
                continue;
            }
            let start = *run_start.get_or_insert(i);
            let end = i + c.len_utf8();
            if end - start >= MAX_WHITESPACE_RUN {
                let (piece, tail) = rest.split_at(end);
                rest = tail;
                return Some(piece);
            }
        }
        Some(std::mem::take(&mut rest))
    })
}

/// Tokens added per chat message for role and separators (OpenAI's published accounting).
const TOKENS_PER_MESSAGE: u32 = 3;
/// Tokens that prime the reply.
const REPLY_PRIMER_TOKENS: u32 = 3;

/// Input tokens of a chat conversation for `tokenizer`.
pub fn chat_tokens(tokenizer: Tokenizer, messages: &[(String, String)]) -> u32 {
    messages
        .iter()
        .map(|(role, content)| {
            TOKENS_PER_MESSAGE + tokenizer.count(role) + tokenizer.count(content)
        })
        .sum::<u32>()
        + REPLY_PRIMER_TOKENS
}

/// What a request's input tokens are counted from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    /// A conversation as (role, content) pairs: counted with OpenAI's chat accounting
    /// ([`chat_tokens`]); an answer is expected.
    Chat(Vec<(String, String)>),
    /// Embedding inputs: each text's BPE count plus the tokens sent already tokenized, with no
    /// per-input overhead (OpenAI bills embeddings so); no output.
    Embedding {
        /// Texts to embed.
        texts: Vec<String>,
        /// Tokens of the inputs sent as token ids.
        pretokenized: u32,
    },
}

impl Prompt {
    /// Input tokens for `tokenizer`.
    pub fn count(&self, tokenizer: Tokenizer) -> u32 {
        match self {
            Self::Chat(messages) => chat_tokens(tokenizer, messages),
            Self::Embedding {
                texts,
                pretokenized,
            } => texts
                .iter()
                .fold(*pretokenized, |n, t| n.saturating_add(tokenizer.count(t))),
        }
    }

    /// Whether the provider generates output for it (embeddings: none).
    pub fn generates(&self) -> bool {
        matches!(self, Self::Chat(_))
    }
}

/// Cost in USD of `tokens_in` + `tokens_out` at `model`'s prices.
pub fn cost_usd(model: &ModelConfig, tokens_in: u32, tokens_out: u32) -> f64 {
    (f64::from(tokens_in) * model.input_per_1m + f64::from(tokens_out) * model.output_per_1m) / 1e6
}

/// A request priced at every tier of its route.
#[derive(Debug, Clone, PartialEq)]
pub struct Priced {
    /// Output tokens reserved: the output cap times the choices asked for.
    pub tokens_out: u32,
    /// The output cap of one choice, what the provider is sent as `max_tokens`.
    pub max_tokens: u32,
    /// Input besides the text, priced per model (image parts, a provider's tool prompt).
    pub extra: ExtraInput,
    /// Every tier, cheapest first.
    pub tiers: Vec<TierEstimate>,
    /// Input-token counts per tokenizer already computed for this conversation.
    counts: Vec<(Tokenizer, u32)>,
}

impl Priced {
    /// The estimate for `tier`.
    pub fn tier(&self, tier: &str) -> Option<&TierEstimate> {
        self.tiers.iter().find(|t| t.tier == tier)
    }

    /// Input tokens of the prompt for `model_name` (counted at most once per tokenizer).
    pub fn tokens_in(&mut self, config: &GatewayConfig, model_name: &str, prompt: &Prompt) -> u32 {
        let Some(model) = config.models.get(model_name) else {
            return 0;
        };
        count_once(
            &mut self.counts,
            Tokenizer::for_model(model_name, model),
            prompt,
        )
        .saturating_add(self.extra.tokens(config, model_name))
    }
}

/// Tokens Anthropic adds to a request that offers tools (its tool-use system prompt; 313–346
/// by its documentation, the larger taken).
pub const ANTHROPIC_TOOL_PROMPT_TOKENS: u32 = 346;

/// Input a request sends besides its text, whose tokens depend on the model it goes to.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExtraInput {
    /// Its image parts.
    pub images: Vec<llmscope_wire::images::Image>,
    /// It offers tools.
    pub tools: bool,
}

impl ExtraInput {
    /// Input tokens of this for `model_name`: each image by the model's rule (Anthropic's when
    /// its provider is one), and Anthropic's tool prompt when tools are offered.
    pub fn tokens(&self, config: &GatewayConfig, model_name: &str) -> u32 {
        if self.images.is_empty() && !self.tools {
            return 0;
        }
        let Some(model) = config.models.get(model_name) else {
            return 0;
        };
        let anthropic = matches!(
            config.providers.get(&model.provider),
            Some(crate::config::ProviderConfig::Anthropic { .. })
        );
        let sent_as = model.provider_model.as_deref().unwrap_or(model_name);
        let rule = llmscope_wire::images::ImageRule::for_model(sent_as, anthropic);
        let images = self
            .images
            .iter()
            .map(|i| rule.tokens(i))
            .fold(0u32, u32::saturating_add);
        let tools = if self.tools && anthropic {
            ANTHROPIC_TOOL_PROMPT_TOKENS
        } else {
            0
        };
        images.saturating_add(tools)
    }
}

fn count_once(counts: &mut Vec<(Tokenizer, u32)>, tokenizer: Tokenizer, prompt: &Prompt) -> u32 {
    if let Some((_, n)) = counts.iter().find(|(t, _)| *t == tokenizer) {
        return *n;
    }
    let n = prompt.count(tokenizer);
    counts.push((tokenizer, n));
    n
}

/// Price every tier of `route`, with `count` giving input tokens per tokenizer (it records what
/// it counts in the returned `counts`). Returns `None` when the route is unknown.
fn price_with(
    config: &GatewayConfig,
    route: &str,
    output: Output,
    extra: ExtraInput,
    mut count: impl FnMut(&mut Vec<(Tokenizer, u32)>, Tokenizer) -> u32,
) -> Option<Priced> {
    let route_cfg = config.routes.get(route)?;
    let max_tokens = output.max_tokens.map_or(route_cfg.max_output_tokens, |m| {
        m.min(route_cfg.max_output_tokens)
    });
    let tokens_out = max_tokens.saturating_mul(output.choices.max(1));
    let mut counts: Vec<(Tokenizer, u32)> = Vec::with_capacity(2);
    let mut tiers = Vec::with_capacity(route_cfg.tiers.len());
    for (tier, model_name) in &route_cfg.tiers {
        let model = config.models.get(model_name)?;
        let tokens_in = count(&mut counts, Tokenizer::for_model(model_name, model))
            .saturating_add(extra.tokens(config, model_name));
        tiers.push(TierEstimate {
            tier: tier.clone(),
            model: model_name.clone(),
            estimated_cost_usd: cost_usd(model, tokens_in, tokens_out),
        });
    }
    tiers.sort_by(|a, b| a.estimated_cost_usd.total_cmp(&b.estimated_cost_usd));
    Some(Priced {
        tokens_out,
        max_tokens,
        extra,
        tiers,
        counts,
    })
}

/// What a request asks to generate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Output {
    /// The client's output cap per choice (bounded by the route's).
    pub max_tokens: Option<u32>,
    /// Choices asked for (`n`; 0 counts as 1).
    pub choices: u32,
}

impl Output {
    /// One choice of at most `max_tokens`.
    pub fn capped(max_tokens: Option<u32>) -> Self {
        Self {
            max_tokens,
            choices: 1,
        }
    }
}

/// Price a prompt on `route` for every tier: its input tokens, counted once per distinct
/// tokenizer, and the expected `output` (none for embeddings). Returns `None` when the route is
/// unknown.
pub fn price(
    config: &GatewayConfig,
    route: &str,
    prompt: &Prompt,
    mut output: Output,
    extra: ExtraInput,
) -> Option<Priced> {
    if !prompt.generates() {
        output.max_tokens = Some(0);
        output.choices = 1;
    }
    price_with(config, route, output, extra, |counts, tokenizer| {
        count_once(counts, tokenizer, prompt)
    })
}

/// Price `tokens_in` input tokens (already counted, e.g. by an edge proxy) on every tier of
/// `route`. Returns `None` when the route is unknown.
pub fn price_tokens(
    config: &GatewayConfig,
    route: &str,
    tokens_in: u32,
    max_output: Option<u32>,
) -> Option<Priced> {
    price_with(
        config,
        route,
        Output::capped(max_output),
        ExtraInput::default(),
        |counts, tokenizer| {
            if !counts.iter().any(|(t, _)| *t == tokenizer) {
                counts.push((tokenizer, tokens_in));
            }
            tokens_in
        },
    )
}

/// Per-model correction of input-token estimates, learned from what providers bill.
///
/// The gateway counts the conversation it sends with the model's BPE vocabulary; a provider
/// may bill more (a hidden system prompt, tool definitions, another tokenizer). When a provider
/// reports more input tokens than were counted, the model's factor rises to that ratio at once,
/// so the requests priced after it reserve what the provider will bill; lower ratios pull it
/// back down by 5% of the gap per answer, never below 1 (an estimate is never lowered below
/// the count). Reads and updates are lock-free.
#[derive(Debug)]
pub struct Calibration {
    /// Model names, sorted (the index of `factors`).
    models: Vec<String>,
    /// Each model's factor, as `f64` bits.
    factors: Vec<std::sync::atomic::AtomicU64>,
}

impl Calibration {
    /// Factor 1 for each of `models` (the configured model names).
    pub fn new(models: impl IntoIterator<Item = String>) -> Self {
        let mut models: Vec<String> = models.into_iter().collect();
        models.sort();
        models.dedup();
        let factors = models
            .iter()
            .map(|_| std::sync::atomic::AtomicU64::new(1f64.to_bits()))
            .collect();
        Self { models, factors }
    }

    fn slot(&self, model: &str) -> Option<&std::sync::atomic::AtomicU64> {
        let i = self
            .models
            .binary_search_by(|m| m.as_str().cmp(model))
            .ok()?;
        self.factors.get(i)
    }

    /// The factor of `model` (1 when unknown or never corrected).
    pub fn factor(&self, model: &str) -> f64 {
        self.slot(model).map_or(1.0, |f| {
            f64::from_bits(f.load(std::sync::atomic::Ordering::Relaxed))
        })
    }

    /// `counted` input tokens corrected for `model`.
    pub fn scale(&self, model: &str, counted: u32) -> u32 {
        let f = self.factor(model);
        if f <= 1.0 {
            return counted;
        }
        let scaled = (f64::from(counted) * f).ceil();
        if scaled >= f64::from(u32::MAX) {
            u32::MAX
        } else {
            scaled as u32
        }
    }

    /// The provider billed `billed` input tokens for a conversation counted at `counted`.
    pub fn observe(&self, model: &str, billed: u32, counted: u32) {
        let Some(slot) = self.slot(model) else {
            return;
        };
        if counted == 0 {
            return;
        }
        let ratio = f64::from(billed) / f64::from(counted);
        let _ = slot.fetch_update(
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
            |bits| {
                let f = f64::from_bits(bits);
                let next = if ratio >= f {
                    ratio
                } else {
                    f - 0.05 * (f - ratio)
                };
                Some(next.max(1.0).to_bits())
            },
        );
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_configurable_tokenizer_name_parses() {
        for name in llmscope_wire::TOKENIZERS {
            assert!(Tokenizer::from_name(name).is_some(), "{name}");
        }
    }

    use super::*;

    fn model(input: f64, output: f64) -> ModelConfig {
        ModelConfig {
            provider: "mock".into(),
            provider_model: None,
            input_per_1m: input,
            output_per_1m: output,
            fallback: vec![],
            tokenizer: None,
        }
    }

    #[test]
    fn pathological_whitespace_is_counted_without_panicking() {
        let spaces = " ".repeat(1_000_000);
        for t in [Tokenizer::O200kBase, Tokenizer::Cl100kBase] {
            let n = t.count(&spaces);
            assert!(n > 0 && n <= 1_000_000, "{t:?}: {n}");
            let mixed = format!("a{spaces}b");
            assert!(t.count(&mixed) >= n);
        }
    }

    #[test]
    fn pieces_rejoin_to_the_text_and_short_texts_are_one_piece() {
        let text = format!(
            "x{}y\u{3000}{}z",
            " ".repeat(10_000),
            "\u{3000}".repeat(3000)
        );
        let pieces: Vec<&str> = split_long_whitespace(&text).collect();
        assert_eq!(pieces.concat(), text);
        assert!(pieces.len() > 3);
        assert_eq!(split_long_whitespace("hello world").count(), 1);
        assert_eq!(split_long_whitespace("").count(), 0);
        assert_eq!(
            Tokenizer::O200kBase.count("hello   world"),
            u32::try_from(
                tiktoken_rs::o200k_base_singleton()
                    .encode_ordinary("hello   world")
                    .len()
            )
            .unwrap()
        );
    }

    #[test]
    fn counts_real_bpe_tokens_not_words() {
        // "tokenization" is one word but several BPE tokens; words×1.3 would say 1.3.
        assert!(Tokenizer::O200kBase.count("tokenization isn't words") >= 4);
        assert_eq!(Tokenizer::Cl100kBase.count(""), 0);
        assert_eq!(Tokenizer::O200kBase.count("hello world"), 2);
    }

    #[test]
    fn picks_tokenizer_by_model_family() {
        assert_eq!(
            Tokenizer::for_model("gpt-4o-mini", &model(0.15, 0.6)),
            Tokenizer::O200kBase
        );
        assert_eq!(
            Tokenizer::for_model("claude-sonnet-4-20250514", &model(3.0, 15.0)),
            Tokenizer::Cl100kBase
        );
        let mut m = model(1.0, 1.0);
        m.tokenizer = Some("o200k_base".into());
        assert_eq!(Tokenizer::for_model("llama3", &m), Tokenizer::O200kBase);
    }

    #[test]
    fn prices_per_million_tokens() {
        let gpt4o = model(2.50, 10.00);
        assert!((cost_usd(&gpt4o, 1000, 500) - 0.0075).abs() < 1e-12);
        assert_eq!(cost_usd(&gpt4o, 0, 0), 0.0);
    }

    #[test]
    fn calibration_rises_to_what_providers_bill_and_decays_slowly_never_below_the_count() {
        let c = Calibration::new(["m".to_owned(), "a".to_owned()]);
        assert_eq!(c.scale("m", 25), 25);
        c.observe("m", 4_000, 25);
        assert_eq!(c.scale("m", 25), 4_000);
        c.observe("m", 25, 25);
        let f = c.factor("m");
        assert!(f < 160.0 && f > 150.0, "{f}");
        for _ in 0..500 {
            c.observe("m", 10, 25);
        }
        assert_eq!(c.factor("m"), 1.0, "never below the count");
        assert_eq!(c.scale("unknown", 7), 7);
    }

    #[test]
    fn embeddings_are_priced_at_their_input_tokens_only() {
        let yaml = r#"
policy: {file: policy.yaml, policies_dir: .}
defaults: {route: /embed}
models:
  embed-small: {provider: mock, input_per_1m: 0.02, output_per_1m: 0.0}
  chat: {provider: mock, input_per_1m: 1.0, output_per_1m: 4.0}
routes:
  /embed: {max_output_tokens: 500, tiers: {cheap: embed-small, expensive: chat}}
providers:
  mock: {kind: mock}
"#;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("llmscope.yaml");
        std::fs::write(&path, yaml).unwrap();
        let config = GatewayConfig::load(&path, &|_| None).unwrap();
        let prompt = Prompt::Embedding {
            texts: vec!["hello world".into(), "tokenization".into()],
            pretokenized: 5,
        };
        let t = Tokenizer::Cl100kBase;
        let expected = t.count("hello world") + t.count("tokenization") + 5;
        assert_eq!(prompt.count(t), expected);
        let mut priced = price(
            &config,
            "/embed",
            &prompt,
            Output::capped(Some(100)),
            ExtraInput::default(),
        )
        .unwrap();
        assert_eq!(priced.tokens_out, 0, "embeddings generate no output");
        let cheap = priced.tier("cheap").unwrap().estimated_cost_usd;
        assert!(
            (cheap - f64::from(expected) * 0.02 / 1e6).abs() < 1e-15,
            "{cheap}"
        );
        assert_eq!(priced.tokens_in(&config, "embed-small", &prompt), expected);
        // A chat prompt on the same route expects the route's output.
        let chat = Prompt::Chat(vec![("user".into(), "hello world".into())]);
        assert_eq!(
            price(
                &config,
                "/embed",
                &chat,
                Output::capped(None),
                ExtraInput::default()
            )
            .unwrap()
            .tokens_out,
            500
        );
    }

    #[test]
    fn chat_accounting_adds_message_overhead() {
        let msgs = vec![("user".to_owned(), "hello world".to_owned())];
        // 3 per message + "user" (1) + "hello world" (2) + 3 primer.
        assert_eq!(chat_tokens(Tokenizer::O200kBase, &msgs), 9);
    }
}

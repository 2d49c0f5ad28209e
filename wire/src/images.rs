//! Image parts of chat messages (`{"type": "image_url", "image_url": {"url", "detail"}}`),
//! priced with the rule of the model they are sent to ([`ImageRule`]): OpenAI's tile rule
//! (gpt-4o, gpt-4.1, o-series: 85 + 170 per 512-px tile; gpt-4o-mini: 2833 + 5667), its patch
//! rule (gpt-4.1-mini / -nano, o4-mini: 32-px patches, at most 1536, times the model's
//! multiplier) and Anthropic's area rule (width × height / 750, at most ~1600). The size of an
//! inline (`data:` URL) image is read from its header; an image behind a URL is not fetched
//! and is priced at the most its rule allows, so the reservation never falls short of what
//! the provider bills.

use base64::Engine;
use serde_json::Value;

/// Tokens of a `low`-detail image under the gpt-4o tile rule, and that rule's base.
pub const LOW_DETAIL_TOKENS: u32 = 85;

/// One image part, as far as pricing needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Image {
    /// `detail: low`.
    pub low: bool,
    /// Pixel size, when the image is inline and its header says it.
    pub size: Option<(u64, u64)>,
}

/// How a model counts an image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ImageRule {
    /// Scaled to fit 2048×2048, then its short side to 768; `base` + `tile` per 512-px tile
    /// (`low` detail: `base` only).
    Tiles {
        /// Tokens of every image (and all of a `low` one).
        base: u32,
        /// Tokens per tile.
        tile: u32,
    },
    /// 32-px patches (scaled down to at most 1536), times `multiplier`; `detail` ignored.
    Patches {
        /// The model's multiplier.
        multiplier: f64,
    },
    /// Anthropic: scaled to fit a 1568-px long edge, width × height / 750; `detail` ignored.
    Area,
}

impl ImageRule {
    /// The rule of `model` (the name the provider knows), sent through an Anthropic provider
    /// or not.
    pub fn for_model(model: &str, anthropic: bool) -> Self {
        let m = model.to_ascii_lowercase();
        if anthropic || m.starts_with("claude") {
            return Self::Area;
        }
        let patches = [
            ("gpt-4.1-nano", 2.46),
            ("gpt-4.1-mini", 1.62),
            ("o4-mini", 1.72),
            ("gpt-5-nano", 2.46),
            ("gpt-5-mini", 1.62),
        ];
        if let Some((_, multiplier)) = patches.iter().find(|(p, _)| m.starts_with(p)) {
            return Self::Patches {
                multiplier: *multiplier,
            };
        }
        if m.starts_with("gpt-4o-mini") {
            return Self::Tiles {
                base: 2833,
                tile: 5667,
            };
        }
        Self::Tiles {
            base: LOW_DETAIL_TOKENS,
            tile: 170,
        }
    }

    /// Input tokens of `image` under this rule.
    pub fn tokens(self, image: &Image) -> u32 {
        match self {
            Self::Tiles { base, tile } => {
                if image.low {
                    return base;
                }
                // Unknown size: the most tiles the scaling allows (768 × 2048: 2 × 4).
                let tiles = image.size.map_or(8, |(w, h)| tiles(w, h));
                base + tile * tiles
            }
            Self::Patches { multiplier } => {
                let patches = image.size.map_or(1536.0, |(w, h)| patches(w, h));
                (patches * multiplier).ceil() as u32
            }
            Self::Area => image.size.map_or(1600, |(w, h)| area_tokens(w, h)),
        }
    }
}

/// Why an `image_url` part is malformed, or `Ok`.
pub fn check_part(part: &Value) -> Result<(), &'static str> {
    let image = &part["image_url"];
    if !image["url"].is_string() {
        return Err("must be an object with a string `url`");
    }
    if let Some(key) = image
        .as_object()
        .and_then(|o| o.keys().find(|k| !["url", "detail"].contains(&k.as_str())))
    {
        let _ = key;
        return Err("may only have `url` and `detail`");
    }
    match image.get("detail") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(d)) if matches!(d.as_str(), "low" | "high" | "auto") => Ok(()),
        Some(_) => Err("detail must be `low`, `high` or `auto`"),
    }
}

/// The pricing facts of one `image_url` part.
pub fn image_of(part: &Value) -> Image {
    let image = &part["image_url"];
    Image {
        low: image["detail"].as_str() == Some("low"),
        size: image["url"].as_str().and_then(inline_size),
    }
}

/// The pixel size of a `data:<type>;base64,<data>` image, when its header says it.
fn inline_size(url: &str) -> Option<(u64, u64)> {
    let data = url.strip_prefix("data:")?.split_once(";base64,")?.1;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .ok()?;
    let size = imagesize::blob_size(&bytes).ok()?;
    Some((size.width as u64, size.height as u64)).filter(|(w, h)| *w > 0 && *h > 0)
}

/// 512-px tiles of a `w`×`h` image after OpenAI's scaling.
fn tiles(w: u64, h: u64) -> u32 {
    let (mut w, mut h) = (w as f64, h as f64);
    if w.max(h) > 2048.0 {
        let s = 2048.0 / w.max(h);
        (w, h) = (w * s, h * s);
    }
    if w.min(h) > 768.0 {
        let s = 768.0 / w.min(h);
        (w, h) = (w * s, h * s);
    }
    ((w / 512.0).ceil() * (h / 512.0).ceil()) as u32
}

/// 32-px patches of a `w`×`h` image, scaled down to at most 1536.
fn patches(w: u64, h: u64) -> f64 {
    let n = (w as f64 / 32.0).ceil() * (h as f64 / 32.0).ceil();
    n.min(1536.0)
}

/// Anthropic's tokens of a `w`×`h` image: scaled to a 1568-px long edge, w·h/750, at most 1600.
fn area_tokens(w: u64, h: u64) -> u32 {
    let (mut w, mut h) = (w as f64, h as f64);
    if w.max(h) > 1568.0 {
        let s = 1568.0 / w.max(h);
        (w, h) = (w * s, h * s);
    }
    ((w * h / 750.0).ceil() as u32).min(1600)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GPT_4O: ImageRule = ImageRule::Tiles {
        base: 85,
        tile: 170,
    };

    fn sized(w: u64, h: u64) -> Image {
        Image {
            low: false,
            size: Some((w, h)),
        }
    }

    #[test]
    fn openai_tile_rule() {
        // OpenAI's worked examples: 1024×1024 → 768×768, 4 tiles; 2048×4096 → 768×1536, 6.
        assert_eq!(GPT_4O.tokens(&sized(1024, 1024)), 765);
        assert_eq!(GPT_4O.tokens(&sized(2048, 4096)), 1105);
        assert_eq!(GPT_4O.tokens(&sized(100, 100)), 255);
        let unknown = Image {
            low: false,
            size: None,
        };
        assert_eq!(GPT_4O.tokens(&unknown), 85 + 8 * 170);
        assert_eq!(GPT_4O.tokens(&sized(768, 2048)), GPT_4O.tokens(&unknown));
    }

    #[test]
    fn each_model_family_has_its_rule() {
        let low = Image {
            low: true,
            size: None,
        };
        let mini = ImageRule::for_model("gpt-4o-mini-2024-07-18", false);
        assert_eq!(mini.tokens(&low), 2833, "gpt-4o-mini bills ~33× gpt-4o");
        assert_eq!(ImageRule::for_model("gpt-4o", false).tokens(&low), 85);
        let nano = ImageRule::for_model("gpt-4.1-nano", false);
        assert_eq!(
            nano.tokens(&low),
            (1536.0f64 * 2.46).ceil() as u32,
            "detail ignored"
        );
        assert_eq!(nano.tokens(&sized(64, 64)), (4.0f64 * 2.46).ceil() as u32);
        let claude = ImageRule::for_model("claude-sonnet-4-20250514", false);
        assert_eq!(claude.tokens(&sized(1000, 1000)), 1334);
        assert_eq!(
            claude.tokens(&low),
            1600,
            "detail ignored; unknown size at the most"
        );
        assert_eq!(ImageRule::for_model("my-vision", true), ImageRule::Area);
    }

    #[test]
    fn inline_images_are_sized_from_their_header() {
        // A 1×1 PNG.
        let png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==";
        let part = |url: String, detail: Option<&str>| serde_json::json!({"type": "image_url", "image_url": {"url": url, "detail": detail}});
        assert_eq!(
            image_of(&part(format!("data:image/png;base64,{png}"), None)).size,
            Some((1, 1))
        );
        assert_eq!(
            image_of(&part("https://x/a.png".into(), Some("low"))),
            Image {
                low: true,
                size: None
            }
        );
        assert_eq!(
            image_of(&part("data:image/png;base64,!!".into(), None)).size,
            None
        );
        assert!(check_part(&part("x".into(), Some("huge"))).is_err());
        assert!(check_part(&serde_json::json!({"type": "image_url", "image_url": "x"})).is_err());
        assert!(check_part(
            &serde_json::json!({"type": "image_url", "image_url": {"url": "x", "cache": 1}})
        )
        .is_err());
    }
}

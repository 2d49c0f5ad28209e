//! Image parts of chat messages (`{"type": "image_url", "image_url": {"url", "detail"}}`),
//! priced with OpenAI's image-token rule: `low` detail is a flat [`LOW_DETAIL_TOKENS`]; `high`
//! and `auto` scale the image to fit 2048×2048, then its shortest side to 768, and cost
//! [`LOW_DETAIL_TOKENS`] plus [`TILE_TOKENS`] per 512-pixel tile. The size of an inline
//! (`data:` URL) image is read from its header; an image behind a URL is not fetched and is
//! priced at the most the rule allows ([`MAX_IMAGE_TOKENS`]), so the reservation never falls
//! short of what the provider bills.

use base64::Engine;
use serde_json::Value;

/// Tokens of a `low`-detail image, and the base of every other.
pub const LOW_DETAIL_TOKENS: u32 = 85;
/// Tokens per 512×512 tile of a `high`/`auto`-detail image.
pub const TILE_TOKENS: u32 = 170;
/// The most a `high`/`auto` image can cost: 2 × 4 tiles (768 × 2048 after scaling).
pub const MAX_IMAGE_TOKENS: u32 = LOW_DETAIL_TOKENS + 8 * TILE_TOKENS;

/// Why an `image_url` part is malformed, or `Ok`.
pub fn check_part(part: &Value) -> Result<(), &'static str> {
    let image = &part["image_url"];
    if !image["url"].is_string() {
        return Err("must be an object with a string `url`");
    }
    match image.get("detail") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(d)) if matches!(d.as_str(), "low" | "high" | "auto") => Ok(()),
        Some(_) => Err("detail must be `low`, `high` or `auto`"),
    }
}

/// Input tokens of one `image_url` part.
pub fn tokens(part: &Value) -> u32 {
    let image = &part["image_url"];
    if image["detail"].as_str() == Some("low") {
        return LOW_DETAIL_TOKENS;
    }
    image["url"]
        .as_str()
        .and_then(inline_size)
        .map_or(MAX_IMAGE_TOKENS, |(w, h)| detailed_tokens(w, h))
}

/// The pixel size of a `data:<type>;base64,<data>` image, when its header says it.
fn inline_size(url: &str) -> Option<(u64, u64)> {
    let data = url.strip_prefix("data:")?.split_once(";base64,")?.1;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .ok()?;
    let size = imagesize::blob_size(&bytes).ok()?;
    Some((size.width as u64, size.height as u64))
}

/// Tokens of a `high`-detail `w`×`h` image.
fn detailed_tokens(w: u64, h: u64) -> u32 {
    if w == 0 || h == 0 {
        return LOW_DETAIL_TOKENS;
    }
    let (mut w, mut h) = (w as f64, h as f64);
    if w.max(h) > 2048.0 {
        let s = 2048.0 / w.max(h);
        (w, h) = (w * s, h * s);
    }
    if w.min(h) > 768.0 {
        let s = 768.0 / w.min(h);
        (w, h) = (w * s, h * s);
    }
    let tiles = (w / 512.0).ceil() * (h / 512.0).ceil();
    LOW_DETAIL_TOKENS + TILE_TOKENS * (tiles as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_image_rule() {
        // OpenAI's worked examples: 1024×1024 → 768×768, 4 tiles; 2048×4096 → 768×1536, 6.
        assert_eq!(detailed_tokens(1024, 1024), 765);
        assert_eq!(detailed_tokens(2048, 4096), 1105);
        assert_eq!(detailed_tokens(100, 100), 255);
        assert!(detailed_tokens(768, 2048) <= MAX_IMAGE_TOKENS);
        assert_eq!(detailed_tokens(768, 2048), MAX_IMAGE_TOKENS);
    }

    #[test]
    fn inline_images_are_sized_from_their_header_and_urls_at_the_most() {
        // A 1×1 PNG.
        let png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==";
        let part = |url: String, detail: Option<&str>| serde_json::json!({"type": "image_url", "image_url": {"url": url, "detail": detail}});
        assert_eq!(
            tokens(&part(format!("data:image/png;base64,{png}"), None)),
            255
        );
        assert_eq!(
            tokens(&part("https://example.com/a.png".into(), Some("high"))),
            MAX_IMAGE_TOKENS
        );
        assert_eq!(
            tokens(&part("https://example.com/a.png".into(), Some("low"))),
            LOW_DETAIL_TOKENS
        );
        assert_eq!(
            tokens(&part("data:image/png;base64,!!".into(), None)),
            MAX_IMAGE_TOKENS
        );
        assert!(check_part(&part("x".into(), Some("huge"))).is_err());
        assert!(check_part(&serde_json::json!({"type": "image_url", "image_url": "x"})).is_err());
    }
}

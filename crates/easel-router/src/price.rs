//! Closed providers' prices: per image, per megapixel, or per image at a quality level.
//!
//! The defaults are the public list prices as read from each vendor's price page on the date
//! in [`DEFAULTS_AS_OF`]; vendors change them, so a deployment overrides any entry in its
//! config file (`"prices": [{"provider", "model", "unit", "usd", "quality"?}]`).

use serde::{Deserialize, Serialize};

use crate::RouterError;

/// When the default prices were read from the vendors' public pages.
pub const DEFAULTS_AS_OF: &str = "2025-06-01; Imagen 4, Ideogram 3, Recraft V3: 2026-11-30";

/// What a price is per.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    Image,
    Megapixel,
}

/// One price-table entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub provider: String,
    pub model: String,
    pub unit: Unit,
    pub usd: f64,
    /// For vendors that price by quality (OpenAI's low/medium/high, dall-e-3's standard/hd).
    #[serde(default)]
    pub quality: Option<String>,
    /// Largest output area (pixels) this entry covers, for vendors that price by size tier.
    #[serde(default)]
    pub max_pixels: Option<u64>,
}

/// The prices easel knows.
#[derive(Debug, Clone)]
pub struct PriceTable {
    entries: Vec<Price>,
}

fn p(provider: &str, model: &str, unit: Unit, usd: f64, quality: Option<&str>, max_pixels: Option<u64>) -> Price {
    Price { provider: provider.into(), model: model.into(), unit, usd, quality: quality.map(Into::into), max_pixels }
}

const SQUARE: u64 = 1024 * 1024;
const PORTRAIT: u64 = 1024 * 1792;

impl Default for PriceTable {
    /// Public list prices as of [`DEFAULTS_AS_OF`].
    fn default() -> Self {
        use Unit::{Image, Megapixel};
        let mut e = vec![];
        // OpenAI: gpt-image-1 by quality and size; dall-e-3 by quality and size.
        for (q, sq, big) in [("low", 0.011, 0.016), ("medium", 0.042, 0.063), ("high", 0.167, 0.25)] {
            e.push(p("openai", "gpt-image-1", Image, sq, Some(q), Some(SQUARE)));
            e.push(p("openai", "gpt-image-1", Image, big, Some(q), None));
        }
        e.push(p("openai", "dall-e-3", Image, 0.04, Some("standard"), Some(SQUARE)));
        e.push(p("openai", "dall-e-3", Image, 0.08, Some("standard"), Some(PORTRAIT)));
        e.push(p("openai", "dall-e-3", Image, 0.08, Some("hd"), Some(SQUARE)));
        e.push(p("openai", "dall-e-3", Image, 0.12, Some("hd"), Some(PORTRAIT)));
        // Black Forest Labs' API, per image.
        for (m, usd) in [("flux-pro-1.1", 0.04), ("flux-pro-1.1-ultra", 0.06), ("flux-pro", 0.05), ("flux-dev", 0.025), ("flux-kontext-pro", 0.04)] {
            e.push(p("bfl", m, Image, usd, None, None));
        }
        // fal, per megapixel of output.
        for (m, usd) in [("fal-ai/flux/dev", 0.025), ("fal-ai/flux/schnell", 0.003), ("fal-ai/flux-pro/v1.1", 0.04), ("fal-ai/flux-lora", 0.035)] {
            e.push(p("fal", m, Megapixel, usd, None, None));
        }
        // Replicate's official models, per image.
        for (m, usd) in [("black-forest-labs/flux-schnell", 0.003), ("black-forest-labs/flux-dev", 0.025), ("black-forest-labs/flux-1.1-pro", 0.04)] {
            e.push(p("replicate", m, Image, usd, None, None));
        }
        // Stability's v2beta stable-image, credits at $0.01.
        for (m, usd) in [("core", 0.03), ("ultra", 0.08), ("sd3.5-large", 0.065), ("sd3.5-large-turbo", 0.04), ("sd3.5-medium", 0.035)] {
            e.push(p("stability", m, Image, usd, None, None));
        }
        // Google's Imagen 4 on the Gemini API, per image (Google marked these ids deprecated in
        // 2026; check the Gemini pricing page before relying on them).
        for (m, usd) in [("imagen-4.0-generate-001", 0.04), ("imagen-4.0-fast-generate-001", 0.02), ("imagen-4.0-ultra-generate-001", 0.06)] {
            e.push(p("imagen", m, Image, usd, None, None));
        }
        // Ideogram 3.0, per image by rendering speed (`quality`).
        for (q, usd) in [("turbo", 0.03), ("default", 0.06), ("quality", 0.09)] {
            e.push(p("ideogram", "ideogram-v3", Image, usd, Some(q), None));
        }
        // Recraft V3 raster images (vector styles cost $0.08: override with `quality: "vector"`).
        e.push(p("recraft", "recraftv3", Image, 0.04, None, None));
        Self { entries: e }
    }
}

impl PriceTable {
    /// The defaults with `overrides` replacing entries for the same provider, model and quality.
    pub fn with_overrides(overrides: Vec<Price>) -> Result<Self, RouterError> {
        let mut table = Self::default();
        for o in overrides {
            if !(o.usd.is_finite() && o.usd >= 0.0) {
                return Err(RouterError::Price(format!("{}/{}: price must be a finite number >= 0, got {}", o.provider, o.model, o.usd)));
            }
            table.entries.retain(|e| !(e.provider == o.provider && e.model == o.model && e.quality == o.quality && e.max_pixels == o.max_pixels));
            table.entries.push(o);
        }
        Ok(table)
    }

    pub fn entries(&self) -> &[Price] {
        &self.entries
    }

    /// The list price in USD of one `width` x `height` image, or None when unpriced.
    /// Quality-priced models take `quality` (default: their cheapest-but-one, like the vendor's
    /// "auto"/"standard"); size tiers take the smallest tier that holds the image.
    pub fn image_usd(&self, provider: &str, model: &str, quality: Option<&str>, width: u32, height: u32) -> Option<f64> {
        let pixels = width as u64 * height as u64;
        let mut candidates: Vec<&Price> = self.entries.iter().filter(|e| e.provider == provider && e.model == model).collect();
        if candidates.is_empty() {
            return None;
        }
        if candidates.iter().any(|e| e.quality.is_some()) {
            let want = quality.filter(|q| *q != "auto").map(str::to_string).or_else(|| {
                // The vendor's default: "medium" for gpt-image-1, "standard" for dall-e-3,
                // "default" for Ideogram's rendering speed.
                ["medium", "standard", "default"].iter().find(|q| candidates.iter().any(|e| e.quality.as_deref() == Some(**q))).map(|q| q.to_string())
            })?;
            candidates.retain(|e| e.quality.as_deref() == Some(want.as_str()));
        }
        candidates.sort_by_key(|e| e.max_pixels.unwrap_or(u64::MAX));
        let entry = candidates.iter().find(|e| e.max_pixels.is_none_or(|m| pixels <= m))?;
        Some(match entry.unit {
            Unit::Image => entry.usd,
            // fal rounds up to whole megapixels.
            Unit::Megapixel => entry.usd * (pixels as f64 / 1e6).ceil().max(1.0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ideograms_default_rendering_speed_is_priced_when_no_quality_is_asked() {
        let t = PriceTable::default();
        assert_eq!(t.image_usd("ideogram", "ideogram-v3", None, 1024, 1024), Some(0.06));
        assert_eq!(t.image_usd("ideogram", "ideogram-v3", Some("turbo"), 1024, 1024), Some(0.03));
    }

    #[test]
    fn defaults_price_each_kind() {
        let t = PriceTable::default();
        assert_eq!(t.image_usd("openai", "gpt-image-1", Some("high"), 1024, 1024), Some(0.167));
        assert_eq!(t.image_usd("openai", "gpt-image-1", Some("low"), 1024, 1536), Some(0.016));
        assert_eq!(t.image_usd("openai", "gpt-image-1", None, 1024, 1024), Some(0.042), "auto is the vendor's medium");
        assert_eq!(t.image_usd("openai", "dall-e-3", Some("hd"), 1792, 1024), Some(0.12));
        assert_eq!(t.image_usd("bfl", "flux-pro-1.1", None, 1024, 1024), Some(0.04));
        assert_eq!(t.image_usd("fal", "fal-ai/flux/dev", None, 1024, 1024), Some(0.05), "1.05 MP rounds up to 2");
        assert_eq!(t.image_usd("fal", "fal-ai/flux/dev", None, 512, 512), Some(0.025));
        assert_eq!(t.image_usd("replicate", "black-forest-labs/flux-schnell", None, 1024, 1024), Some(0.003));
        assert_eq!(t.image_usd("stability", "ultra", None, 1024, 1024), Some(0.08));
        assert_eq!(t.image_usd("nobody", "x", None, 64, 64), None);
    }

    #[test]
    fn overrides_replace_and_are_checked() {
        let cheaper = Price { provider: "bfl".into(), model: "flux-dev".into(), unit: Unit::Image, usd: 0.02, quality: None, max_pixels: None };
        let t = PriceTable::with_overrides(vec![cheaper]).expect("valid");
        assert_eq!(t.image_usd("bfl", "flux-dev", None, 1024, 1024), Some(0.02));
        let bad = Price { provider: "bfl".into(), model: "flux-dev".into(), unit: Unit::Image, usd: f64::NAN, quality: None, max_pixels: None };
        let err = PriceTable::with_overrides(vec![bad]).err().expect("refused");
        assert!(err.to_string().contains("bfl/flux-dev"), "{err}");
    }
}

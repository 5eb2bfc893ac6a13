//! Prompt tokenization as the diffusers pipelines do it, for CLIP (BOS + tokens + EOS) and T5
//! (tokens + EOS): special tokens from the tokenizer's post-processor, truncated to the limit
//! (keeping the final EOS, with a warning) and padded to `max_length` with the pad token.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tokenizers::Tokenizer;

use crate::error::{EngineError, Result};

/// The CLIP fast-tokenizer pipeline (normalizer, pre-tokenizer, post-processor) without its
/// vocabulary, for repos that ship only the slow tokenizer's `vocab.json` + `merges.txt`.
const CLIP_TEMPLATE: &str = include_str!("clip_tokenizer_template.json");

#[derive(Deserialize, Default)]
struct TokenizerConfig {
    #[serde(default)]
    pad_token: Option<TokenSpec>,
    #[serde(default)]
    model_max_length: Option<f64>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TokenSpec {
    Plain(String),
    Added { content: String },
}

/// A CLIP or T5 tokenizer with its padding rule.
pub struct PromptTokenizer {
    inner: Tokenizer,
    pad_id: u32,
    max_length: usize,
    dir: PathBuf,
}

/// Token ids for one prompt, and whether the prompt was cut.
#[derive(Debug, Clone)]
pub struct Tokens {
    pub ids: Vec<u32>,
    pub truncated: bool,
}

impl PromptTokenizer {
    /// Loads `tokenizer.json` from `dir`, or builds it from `vocab.json` + `merges.txt`.
    pub fn from_dir(dir: &Path, max_positions: usize) -> Result<Self> {
        let err = |message: String| EngineError::Tokenizer { path: dir.to_path_buf(), message };
        let json = dir.join("tokenizer.json");
        let inner = if json.exists() {
            Tokenizer::from_file(&json).map_err(|e| err(e.to_string()))?
        } else {
            Self::from_vocab_and_merges(dir)?
        };
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: TokenizerConfig = if cfg_path.exists() { crate::config::read_json(&cfg_path)? } else { Default::default() };
        let pad = match cfg.pad_token {
            Some(TokenSpec::Plain(s)) | Some(TokenSpec::Added { content: s }) => s,
            None => "<|endoftext|>".to_string(),
        };
        let pad_id = inner.token_to_id(&pad).ok_or_else(|| err(format!("pad token `{pad}` is not in the vocabulary")))?;
        let max_length = cfg
            .model_max_length
            .filter(|m| *m >= 2.0 && *m <= max_positions as f64)
            .map(|m| m as usize)
            .unwrap_or(max_positions);
        Ok(Self { inner, pad_id, max_length, dir: dir.to_path_buf() })
    }

    fn from_vocab_and_merges(dir: &Path) -> Result<Tokenizer> {
        let err = |message: String| EngineError::Tokenizer { path: dir.to_path_buf(), message };
        let vocab_path = dir.join("vocab.json");
        let merges_path = dir.join("merges.txt");
        for p in [&vocab_path, &merges_path] {
            if !p.exists() {
                return Err(EngineError::MissingFile {
                    path: dir.join("tokenizer.json"),
                    hint: format!("neither tokenizer.json nor {} is present", p.display()),
                });
            }
        }
        let vocab: serde_json::Value = crate::config::read_json(&vocab_path)?;
        let merges_text = std::fs::read_to_string(&merges_path).map_err(|e| EngineError::Io { path: merges_path.clone(), source: e })?;
        let merges: Vec<serde_json::Value> = merges_text
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
            .filter_map(|l| l.split_once(' '))
            .map(|(a, b)| serde_json::json!([a, b]))
            .collect();
        let mut template: serde_json::Value = serde_json::from_str(CLIP_TEMPLATE).map_err(|e| err(e.to_string()))?;
        // BOS/EOS ids come from this vocabulary (49406/49407 in CLIP's own, elsewhere in cut-down
        // or extended ones); the template's numbers are only placeholders.
        let special_id = |token: &str| {
            vocab.get(token).and_then(serde_json::Value::as_u64).ok_or_else(|| err(format!("`{token}` is not in vocab.json")))
        };
        let (bos, eos) = (special_id("<|startoftext|>")?, special_id("<|endoftext|>")?);
        template["added_tokens"][0]["id"] = bos.into();
        template["added_tokens"][1]["id"] = eos.into();
        template["post_processor"]["cls"][1] = bos.into();
        template["post_processor"]["sep"][1] = eos.into();
        template["model"]["vocab"] = vocab;
        template["model"]["merges"] = serde_json::Value::Array(merges);
        let bytes = serde_json::to_vec(&template).map_err(|e| err(e.to_string()))?;
        Tokenizer::from_bytes(bytes).map_err(|e| err(e.to_string()))
    }

    /// Tokenizes `text` to exactly `max_length` ids.
    pub fn encode(&self, text: &str) -> Result<Tokens> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| EngineError::Tokenizer { path: self.dir.clone(), message: e.to_string() })?;
        let mut ids = enc.get_ids().to_vec();
        let truncated = ids.len() > self.max_length;
        if truncated {
            let eos = ids[ids.len() - 1];
            ids.truncate(self.max_length - 1);
            ids.push(eos);
        }
        ids.resize(self.max_length, self.pad_id);
        Ok(Tokens { ids, truncated })
    }

    /// The maximum number of tokens, special tokens included.
    pub fn max_length(&self) -> usize {
        self.max_length
    }
}

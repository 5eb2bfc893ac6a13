//! The user's Hugging Face token, found where the Python client looks, and never printed.

use std::fmt;
use std::path::PathBuf;

/// Where a token came from, so errors can name the source without showing the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `HF_TOKEN`.
    HfToken,
    /// `HUGGING_FACE_HUB_TOKEN` (the older name).
    HuggingFaceHubToken,
    /// A token file: `HF_TOKEN_PATH`, or `$HF_HOME/token` as `hf auth login` writes it.
    File(PathBuf),
}

impl fmt::Display for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::HfToken => f.write_str("HF_TOKEN"),
            TokenSource::HuggingFaceHubToken => f.write_str("HUGGING_FACE_HUB_TOKEN"),
            TokenSource::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// A hub access token. `Debug` and `Display` show only its source.
#[derive(Clone)]
pub struct Token {
    secret: String,
    pub source: TokenSource,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token(from {}, redacted)", self.source)
    }
}

impl Token {
    /// A token from elsewhere (a config file, a test).
    pub fn new(secret: impl Into<String>, source: TokenSource) -> Token {
        Token { secret: secret.into(), source }
    }

    /// The `Authorization` header's value.
    pub(crate) fn bearer(&self) -> String {
        format!("Bearer {}", self.secret)
    }

    /// `HF_TOKEN`, then `HUGGING_FACE_HUB_TOKEN`, then the token file, as huggingface_hub
    /// reads them; empty values count as unset.
    pub fn from_env(home: &std::path::Path) -> Option<Token> {
        let var = |name: &str| std::env::var(name).ok().map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        if let Some(secret) = var("HF_TOKEN") {
            return Some(Token { secret, source: TokenSource::HfToken });
        }
        if let Some(secret) = var("HUGGING_FACE_HUB_TOKEN") {
            return Some(Token { secret, source: TokenSource::HuggingFaceHubToken });
        }
        let path = var("HF_TOKEN_PATH").map(PathBuf::from).unwrap_or_else(|| home.join("token"));
        let secret = std::fs::read_to_string(&path).ok()?.trim().to_string();
        (!secret.is_empty()).then_some(Token { secret, source: TokenSource::File(path) })
    }
}

/// Says in an error which token was sent (by its source), or that none was.
pub(crate) fn describe(token: Option<&Token>) -> String {
    token.map_or_else(|| "no token was sent (set HF_TOKEN)".to_string(), |t| format!("the token from {}", t.source))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The only test in this crate that touches the process environment.
    #[test]
    fn tokens_are_read_in_huggingface_hubs_order_and_never_shown() {
        let home = tempfile::tempdir().unwrap();
        for v in ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH"] {
            std::env::remove_var(v);
        }
        assert!(Token::from_env(home.path()).is_none());
        std::fs::write(home.path().join("token"), "hf_file\n").unwrap();
        let t = Token::from_env(home.path()).unwrap();
        assert_eq!((t.secret.as_str(), &t.source), ("hf_file", &TokenSource::File(home.path().join("token"))));
        std::env::set_var("HUGGING_FACE_HUB_TOKEN", "hf_old");
        assert_eq!(Token::from_env(home.path()).unwrap().source, TokenSource::HuggingFaceHubToken);
        std::env::set_var("HF_TOKEN", "  ");
        assert_eq!(Token::from_env(home.path()).unwrap().source, TokenSource::HuggingFaceHubToken, "an empty HF_TOKEN counts as unset");
        std::env::set_var("HF_TOKEN", "hf_new");
        let t = Token::from_env(home.path()).unwrap();
        assert_eq!((t.secret.as_str(), &t.source), ("hf_new", &TokenSource::HfToken));
        assert!(!format!("{t:?}").contains("hf_new"));
        for v in ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"] {
            std::env::remove_var(v);
        }
    }
}

//! Bearer-token API keys: one key per line in a file (blank lines and `#` comments ignored).
//! Keys are compared in constant time, every key every time, and never logged.

use std::path::Path;

use subtle::ConstantTimeEq;
use tonic::{Request, Status};

#[derive(Clone)]
pub struct ApiKeys {
    keys: Vec<Vec<u8>>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.keys.len())
    }
}

impl ApiKeys {
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--api-keys {}: {e}", path.display()))?;
        let keys: Vec<Vec<u8>> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| l.as_bytes().to_vec())
            .collect();
        if keys.is_empty() {
            return Err(format!(
                "--api-keys {}: no key in the file (one per line)",
                path.display()
            ));
        }
        Ok(Self { keys })
    }

    pub fn accepts(&self, presented: &[u8]) -> bool {
        self.keys
            .iter()
            .fold(0u8, |found, key| found | key.ct_eq(presented).unwrap_u8())
            == 1
    }

    /// The interceptor for the public service: `authorization: Bearer <key>`.
    pub fn check<T>(&self, request: Request<T>) -> Result<Request<T>, Status> {
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match presented {
            Some(key) if self.accepts(key.as_bytes()) => Ok(request),
            Some(_) => Err(Status::unauthenticated("the API key is not valid")),
            None => Err(Status::unauthenticated(
                "an API key is required: send metadata authorization: Bearer <key>",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ApiKeys;

    #[test]
    fn only_listed_keys_are_accepted() {
        let dir = std::env::temp_dir().join(format!("sdlm-keys-{}", std::process::id()));
        std::fs::write(&dir, "# team a\nkey-one\n\n  key-two  \n").expect("writes");
        let keys = ApiKeys::load(&dir).expect("loads");
        assert!(keys.accepts(b"key-one"));
        assert!(keys.accepts(b"key-two"));
        assert!(!keys.accepts(b"key-on"));
        assert!(!keys.accepts(b""));
        assert!(!format!("{keys:?}").contains("key-one"));
        std::fs::write(&dir, "# nothing\n").expect("writes");
        assert!(ApiKeys::load(&dir).is_err());
        let _ = std::fs::remove_file(&dir);
    }
}

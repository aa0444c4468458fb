//! Credentials: API key generation and hashing, password hashing and
//! verification, and the constant-time comparison of secrets.
//!
//! One module that the HTTP layer (authentication, `POST /auth/login`),
//! partner management and the CLI all use, so that how a key is stored is
//! decided once. Nothing here knows about HTTP or the store.

use sha2::{Digest, Sha256};

/// Characters of a key kept in clear (`prefix`), so operators can recognise it.
pub const KEY_PREFIX_LEN: usize = 10;

/// The stored form of an API key: keys are long random strings, so a fast
/// hash is enough (passwords get argon2).
pub fn hash_api_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A key's stable id: the first 16 hex digits of its hash.
pub fn key_id(key_hash: &str) -> String {
    key_hash.chars().take(16).collect()
}

/// The part of a key shown in listings.
pub fn key_prefix(key: &str) -> String {
    key.chars().take(KEY_PREFIX_LEN).collect()
}

/// A new random key: `eo_` + 40 hex characters.
pub fn generate_api_key() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 20];
    rand::rng().fill_bytes(&mut bytes);
    format!("eo_{}", hex::encode(bytes))
}

/// A random token for a session or a form (256 bits, hex).
pub fn random_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// Compares two secrets in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Argon2id hash of a password (PHC string format, random salt).
pub fn hash_password(password: &str) -> Result<String, String> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    use rand::RngCore;
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    let salt = SaltString::encode_b64(&bytes).map_err(|e| e.to_string())?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Whether `password` matches a hash made by [`hash_password`]. Slow on
/// purpose: call it off the async executor.
pub fn verify_password(password: &str, hash: &str) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    PasswordHash::new(hash)
        .map(|h| {
            argon2::Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// Verifies against a fixed hash and fails: a login for a user that does not
/// exist takes as long as one with a wrong password.
pub fn verify_nobody(password: &str) -> bool {
    static DUMMY_HASH: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| hash_password("no such user").unwrap_or_default());
    let _ = verify_password(password, &DUMMY_HASH);
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_random_and_hash_stably() {
        let (a, b) = (generate_api_key(), generate_api_key());
        assert_ne!(a, b);
        assert!(a.starts_with("eo_") && a.len() == 43);
        assert_eq!(hash_api_key(&a), hash_api_key(&a));
        assert_eq!(hash_api_key(&a).len(), 64);
        assert_eq!(key_id(&hash_api_key(&a)), hash_api_key(&a)[..16]);
        assert_eq!(key_prefix(&a), a[..KEY_PREFIX_LEN]);
    }

    #[test]
    fn passwords_verify_only_themselves() {
        let h = hash_password("correct horse").expect("hash");
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("correct horsE", &h));
        assert!(!verify_password("correct horse", "not a hash"));
        assert!(!verify_nobody("correct horse"));
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}

//! Keys, message authentication and nonces.
//!
//! Every recipient has its own random 256-bit key, shared only with the owner. Control parts are
//! authenticated with HMAC-SHA256 under that key; tags are compared in constant time. Nothing here does
//! I/O except drawing randomness from the operating system.

use std::fmt;

use hmac::{KeyInit, Mac};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::manifest::{hex, unhex};

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// Fills `buf` from the operating system's random source.
///
/// # Panics
/// When the operating system cannot provide randomness, which leaves nothing safe to do.
fn random(buf: &mut [u8]) {
    getrandom::fill(buf).expect("the operating system's random source failed");
}

/// A recipient's 256-bit secret key. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Key([u8; 32]);

impl Key {
    /// A fresh random key.
    pub fn generate() -> Key {
        let mut k = [0u8; 32];
        random(&mut k);
        Key(k)
    }

    /// Parses 64 hex digits.
    ///
    /// # Errors
    /// When `s` is not 64 hex digits.
    pub fn from_hex(s: &str) -> Result<Key, KeyError> {
        let bytes = unhex(s.trim()).ok_or(KeyError::NotHex)?;
        Ok(Key(bytes.try_into().map_err(|_| KeyError::WrongLength)?))
    }

    /// The key as 64 hex digits: a secret.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// A public identifier of the key (16 hex digits), safe to put in messages and logs.
    pub fn id(&self) -> String {
        let d = blake3::derive_key("mailferry key id v1", &self.0);
        hex(&d[..8])
    }

    /// HMAC-SHA256 of `data` under this key.
    pub fn mac(&self, data: &[u8]) -> [u8; 32] {
        let mut m = <HmacSha256 as KeyInit>::new_from_slice(&self.0).expect("HMAC accepts any key length");
        m.update(data);
        m.finalize().into_bytes().into()
    }

    /// Whether `tag` is the HMAC-SHA256 of `data` under this key, compared in constant time.
    pub fn verify(&self, data: &[u8], tag: &[u8]) -> bool {
        let mut m = <HmacSha256 as KeyInit>::new_from_slice(&self.0).expect("HMAC accepts any key length");
        m.update(data);
        m.verify_slice(tag).is_ok()
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key(id {})", self.id())
    }
}

/// A key that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not hex.
    #[error("key is not hex")]
    NotHex,
    /// Not 32 bytes.
    #[error("key is not 32 bytes (64 hex digits)")]
    WrongLength,
}

/// A fresh 128-bit value that ties a reply to the request it answers.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Nonce(pub [u8; 16]);

impl Nonce {
    /// A fresh random nonce.
    pub fn generate() -> Nonce {
        let mut n = [0u8; 16];
        random(&mut n);
        Nonce(n)
    }

    /// 32 hex digits.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// Parses 32 hex digits.
    ///
    /// # Errors
    /// When `s` is not 32 hex digits.
    pub fn from_hex(s: &str) -> Result<Nonce, String> {
        let b = unhex(s).ok_or_else(|| format!("nonce {s:?} is not hex"))?;
        Ok(Nonce(b.try_into().map_err(|_| format!("nonce {s:?} is not 16 bytes"))?))
    }
}

impl fmt::Debug for Nonce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Nonce({})", self.to_hex())
    }
}

impl fmt::Display for Nonce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl Serialize for Nonce {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Nonce {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Nonce, D::Error> {
        Nonce::from_hex(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// A random identifier of `n` bytes in hex, for reply ids and outbox names.
pub fn random_id(n: usize) -> String {
    let mut b = vec![0u8; n];
    random(&mut b);
    hex(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc4231_case_2() {
        // RFC 4231 test case 2 uses a 4-byte key; ours are 32 bytes, so check the primitive directly.
        let mut m = <HmacSha256 as KeyInit>::new_from_slice(b"Jefe").unwrap();
        m.update(b"what do ya want for nothing?");
        let tag: [u8; 32] = m.finalize().into_bytes().into();
        assert_eq!(hex(&tag), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }

    #[test]
    fn verify_detects_any_change() {
        let k = Key::generate();
        let tag = k.mac(b"control bytes");
        assert!(k.verify(b"control bytes", &tag));
        assert!(!k.verify(b"control bytez", &tag));
        assert!(!Key::generate().verify(b"control bytes", &tag), "another recipient's key must not verify");
        let mut bad = tag;
        bad[31] ^= 1;
        assert!(!k.verify(b"control bytes", &bad));
        assert!(!k.verify(b"control bytes", &tag[..16]), "a truncated tag must not verify");
    }

    #[test]
    fn key_hex_round_trip_and_debug_hides_secret() {
        let k = Key::generate();
        assert_eq!(Key::from_hex(&k.to_hex()).unwrap(), k);
        assert!(!format!("{k:?}").contains(&k.to_hex()));
        assert_eq!(Key::from_hex("abcd"), Err(KeyError::WrongLength));
        assert_eq!(Key::from_hex("zz"), Err(KeyError::NotHex));
        assert_ne!(Key::generate(), Key::generate());
    }
}

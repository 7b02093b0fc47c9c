//! Keys, message authentication and nonces.
//!
//! Every recipient has its own random 256-bit key, shared only with the owner. Control parts are
//! authenticated with HMAC-SHA256 under that key; tags are compared in constant time. A rotated key
//! travels sealed (ChaCha20-Poly1305) under a key derived from the one it replaces ([`Key::seal_key`]).
//! An owner may also sign replies with Ed25519 ([`SigningKey`]), so that a recipient that pinned the
//! owner's public key trusts only the owner, not anyone who learned its shared key. Nothing here does
//! I/O except drawing randomness from the operating system.

pub mod stream;

use std::fmt;

use hmac::{KeyInit, Mac};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// Lowercase hex encoding.
pub fn hex(bytes: &[u8]) -> String {
    ::hex::encode(bytes)
}

/// Decodes lowercase or uppercase hex; `None` if it is not hex (signs and odd lengths included).
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    ::hex::decode(s).ok()
}

/// Fills `buf` from the operating system's random source.
///
/// # Panics
/// When the operating system cannot provide randomness, which leaves nothing safe to do.
/// Fills `buf` from the operating system's random generator.
pub fn random(buf: &mut [u8]) {
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
    pub fn id(&self) -> KeyId {
        let d = blake3::derive_key("mailferry key id v1", &self.0);
        KeyId(hex(&d[..8]))
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

/// Implements the string-like conveniences shared by the id newtypes ([`KeyId`],
/// [`crate::protocol::ReplyId`]): `as_str`, `Display`, a `Debug` that shows the bare string (so log lines
/// and refusal details read exactly as they did when ids were strings), and comparisons with strings.
macro_rules! string_id {
    ($t:ident) => {
        impl $t {
            /// The id as it travels on the wire.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The id, without checking it. Only for values that were checked before they were stored, such
            /// as those read back from the node's own state database.
            pub(crate) fn unchecked(s: impl Into<String>) -> $t {
                $t(s.into())
            }
        }

        impl ::std::fmt::Display for $t {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl ::std::fmt::Debug for $t {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                ::std::fmt::Debug::fmt(&self.0, f)
            }
        }

        impl AsRef<str> for $t {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $t {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $t {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<String> for $t {
            fn eq(&self, other: &String) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<$t> for str {
            fn eq(&self, other: &$t) -> bool {
                self == other.0
            }
        }

        impl PartialEq<$t> for &str {
            fn eq(&self, other: &$t) -> bool {
                *self == other.0
            }
        }

        impl PartialEq<$t> for String {
            fn eq(&self, other: &$t) -> bool {
                *self == other.0
            }
        }
    };
}
pub(crate) use string_id;

/// The public id of a [`Key`] (16 lowercase hex digits, see [`Key::id`]), safe to put in messages and
/// logs. On the wire and in the state database it is the bare string; decoding accepts any string, and
/// [`crate::protocol::decode_control`] refuses those that are not ids.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KeyId(String);

impl KeyId {
    /// `s` as a key id, if it is 16 lowercase hex digits.
    pub fn new(s: impl Into<String>) -> Option<KeyId> {
        let s = s.into();
        (s.len() == 16 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))).then_some(KeyId(s))
    }
}

string_id!(KeyId);

/// Whether `a` and `b` are equal, compared in constant time (for secrets such as delivery tokens).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq as _;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// Domain separation for sealing a new key under an old one.
const REKEY_CONTEXT: &str = "mailferry rekey v1";

impl Key {
    /// Seals `new`, the key that replaces this one for `recipient`: ChaCha20-Poly1305 under a key derived
    /// from this one, with the recipient's name and the new key's id as associated data. Returns
    /// hex(nonce ‖ ciphertext ‖ tag), 120 hex digits.
    pub fn seal_key(&self, recipient: &str, new: &Key) -> String {
        let mut nonce = [0u8; 12];
        random(&mut nonce);
        self.seal_key_with_nonce(recipient, new, nonce)
    }

    /// [`Key::seal_key`] with the AEAD nonce given (a fresh random one for every sealing; the engine
    /// passes its own randomness in).
    pub fn seal_key_with_nonce(&self, recipient: &str, new: &Key, nonce: [u8; 12]) -> String {
        use chacha20poly1305::aead::{Aead, KeyInit as _, Payload};
        let cipher = chacha20poly1305::ChaCha20Poly1305::new(&self.rekey_cipher_key());
        let aad = rekey_aad(recipient, &new.id());
        let sealed = cipher
            .encrypt(&chacha20poly1305::Nonce::from(nonce), Payload { msg: &new.0, aad: &aad })
            .expect("ChaCha20-Poly1305 seals 32 bytes");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        hex(&out)
    }

    /// Opens a key sealed by [`Key::seal_key`] under this key for `recipient`, and checks it has the id
    /// `key_id`. `None` when it does not open or is not that key.
    pub fn open_key(&self, recipient: &str, key_id: &KeyId, sealed: &str) -> Option<Key> {
        use chacha20poly1305::aead::{Aead, KeyInit as _, Payload};
        let bytes = unhex(sealed)?;
        if bytes.len() != 12 + 32 + 16 {
            return None;
        }
        let (nonce, ct) = bytes.split_at(12);
        let nonce: [u8; 12] = nonce.try_into().ok()?;
        let cipher = chacha20poly1305::ChaCha20Poly1305::new(&self.rekey_cipher_key());
        let aad = rekey_aad(recipient, key_id);
        let plain = cipher.decrypt(&chacha20poly1305::Nonce::from(nonce), Payload { msg: ct, aad: &aad }).ok()?;
        let key = Key(plain.try_into().ok()?);
        (key.id() == *key_id).then_some(key)
    }

    fn rekey_cipher_key(&self) -> chacha20poly1305::Key {
        chacha20poly1305::Key::from(blake3::derive_key(REKEY_CONTEXT, &self.0))
    }
}

fn rekey_aad(recipient: &str, key_id: &KeyId) -> Vec<u8> {
    [recipient.as_bytes(), b"\0", key_id.as_str().as_bytes()].concat()
}

/// Domain separation for sealing a channel key under a recipient's key.
const CHANNEL_KEY_CONTEXT: &str = "mailferry channel key v1";

impl Key {
    /// Seals `channel_key`, epoch `epoch` of `channel`'s key, for `recipient` under this key (the
    /// recipient's): ChaCha20-Poly1305 under a key derived from this one (another derivation than
    /// [`Key::seal_key`]'s, so one sealing never opens as the other), with the recipient, channel and
    /// epoch as associated data, and the AEAD nonce given (fresh for every sealing). Returns
    /// hex(nonce ‖ ciphertext ‖ tag), 120 hex digits.
    pub fn seal_channel_key(
        &self,
        recipient: &str,
        channel: &str,
        epoch: u64,
        channel_key: &Key,
        nonce: [u8; 12],
    ) -> String {
        use chacha20poly1305::aead::{Aead, KeyInit as _, Payload};
        let cipher = chacha20poly1305::ChaCha20Poly1305::new(&self.derived(CHANNEL_KEY_CONTEXT));
        let aad = channel_key_aad(recipient, channel, epoch);
        let sealed = cipher
            .encrypt(&chacha20poly1305::Nonce::from(nonce), Payload { msg: &channel_key.0, aad: &aad })
            .expect("ChaCha20-Poly1305 seals 32 bytes");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        hex(&out)
    }

    /// Opens a channel key sealed by [`Key::seal_channel_key`] under this key for the same recipient,
    /// channel and epoch. `None` when it does not open.
    pub fn open_channel_key(&self, recipient: &str, channel: &str, epoch: u64, sealed: &str) -> Option<Key> {
        use chacha20poly1305::aead::{Aead, KeyInit as _, Payload};
        let bytes = unhex(sealed)?;
        if bytes.len() != 12 + 32 + 16 {
            return None;
        }
        let (nonce, ct) = bytes.split_at(12);
        let nonce: [u8; 12] = nonce.try_into().ok()?;
        let cipher = chacha20poly1305::ChaCha20Poly1305::new(&self.derived(CHANNEL_KEY_CONTEXT));
        let aad = channel_key_aad(recipient, channel, epoch);
        let plain = cipher.decrypt(&chacha20poly1305::Nonce::from(nonce), Payload { msg: ct, aad: &aad }).ok()?;
        Some(Key(plain.try_into().ok()?))
    }

    fn derived(&self, context: &str) -> chacha20poly1305::Key {
        chacha20poly1305::Key::from(blake3::derive_key(context, &self.0))
    }
}

fn channel_key_aad(recipient: &str, channel: &str, epoch: u64) -> Vec<u8> {
    serde_json::to_vec(&(recipient, channel, epoch)).expect("a tuple of strings and a number encodes")
}

/// Domain separation for reply signatures: a signature over anything else never verifies as one.
const SIGNATURE_CONTEXT: &[u8] = b"mailferry reply signature v1\0";

/// The owner's Ed25519 signing key (`signing = "hmac+ed25519"`). `Debug` never shows it.
#[derive(Clone)]
pub struct SigningKey(ed25519_dalek::SigningKey);

impl SigningKey {
    /// A fresh random signing key.
    pub fn generate() -> SigningKey {
        let mut seed = [0u8; 32];
        random(&mut seed);
        SigningKey(ed25519_dalek::SigningKey::from_bytes(&seed))
    }

    /// Parses the 64-hex-digit seed.
    ///
    /// # Errors
    /// When `s` is not 64 hex digits.
    pub fn from_hex(s: &str) -> Result<SigningKey, KeyError> {
        let bytes = unhex(s.trim()).ok_or(KeyError::NotHex)?;
        let seed: [u8; 32] = bytes.try_into().map_err(|_| KeyError::WrongLength)?;
        Ok(SigningKey(ed25519_dalek::SigningKey::from_bytes(&seed)))
    }

    /// The seed as 64 hex digits: a secret.
    pub fn to_hex(&self) -> String {
        hex(&self.0.to_bytes())
    }

    /// The public key recipients pin.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// The signature of a control part, 128 hex digits.
    pub fn sign(&self, control: &[u8]) -> String {
        self.sign_with(SIGNATURE_CONTEXT, control)
    }

    /// The signature of `context` ‖ `bytes`, 128 hex digits: each kind of signed message has its own
    /// context, so a signature of one kind never verifies as another.
    pub fn sign_with(&self, context: &[u8], bytes: &[u8]) -> String {
        use ed25519_dalek::Signer;
        hex(&self.0.sign(&[context, bytes].concat()).to_bytes())
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey(public {})", self.public().to_hex())
    }
}

/// An owner's Ed25519 public key, as pinned by a recipient.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct PublicKey(ed25519_dalek::VerifyingKey);

impl PublicKey {
    /// Parses 64 hex digits.
    ///
    /// # Errors
    /// When `s` is not 64 hex digits, or not a point on the curve.
    pub fn from_hex(s: &str) -> Result<PublicKey, KeyError> {
        let bytes = unhex(s.trim()).ok_or(KeyError::NotHex)?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| KeyError::WrongLength)?;
        ed25519_dalek::VerifyingKey::from_bytes(&bytes).map(PublicKey).map_err(|_| KeyError::NotAPublicKey)
    }

    /// 64 hex digits.
    pub fn to_hex(&self) -> String {
        hex(self.0.as_bytes())
    }

    /// Whether `signature` (128 hex digits) is this key's signature of `control`. Strict verification:
    /// no malleable or small-order forms.
    pub fn verify(&self, control: &[u8], signature: &str) -> bool {
        self.verify_with(SIGNATURE_CONTEXT, control, signature)
    }

    /// Whether `signature` is this key's signature of `context` ‖ `bytes` (strict verification).
    pub fn verify_with(&self, context: &[u8], bytes: &[u8], signature: &str) -> bool {
        let Some(sig) = unhex(signature).and_then(|b| ed25519_dalek::Signature::from_slice(&b).ok()) else {
            return false;
        };
        self.0.verify_strict(&[context, bytes].concat(), &sig).is_ok()
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
    /// Not a valid Ed25519 public key.
    #[error("not a valid Ed25519 public key")]
    NotAPublicKey,
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

    #[test]
    fn a_sealed_key_opens_only_under_the_old_key_for_the_same_recipient_and_id() {
        let (old, new) = (Key::generate(), Key::generate());
        let sealed = old.seal_key("site1", &new);
        assert_eq!(sealed.len(), 120);
        assert!(!sealed.contains(&new.to_hex()), "the new key must not travel in the clear");
        assert_eq!(old.open_key("site1", &new.id(), &sealed), Some(new.clone()));
        assert_eq!(Key::generate().open_key("site1", &new.id(), &sealed), None, "another key must not open it");
        assert_eq!(old.open_key("site2", &new.id(), &sealed), None, "bound to the recipient's name");
        assert_eq!(old.open_key("site1", &old.id(), &sealed), None, "bound to the new key's id");
        let mut flipped = unhex(&sealed).unwrap();
        flipped[20] ^= 1;
        assert_eq!(old.open_key("site1", &new.id(), &hex(&flipped)), None, "a changed byte must not open");
        assert_eq!(old.open_key("site1", &new.id(), &sealed[..100]), None);
        assert_ne!(old.seal_key("site1", &new), sealed, "each sealing uses a fresh nonce");
    }

    #[test]
    fn a_sealed_channel_key_opens_only_for_its_recipient_channel_and_epoch() {
        let (mine, theirs, ck) = (Key::generate(), Key::generate(), Key::generate());
        let sealed = mine.seal_channel_key("site1", "engine", 3, &ck, [5; 12]);
        assert_eq!(sealed.len(), 120);
        assert!(!sealed.contains(&ck.to_hex()), "the channel key must not travel in the clear");
        assert_eq!(mine.open_channel_key("site1", "engine", 3, &sealed), Some(ck.clone()));
        assert_eq!(theirs.open_channel_key("site1", "engine", 3, &sealed), None, "another recipient's key");
        assert_eq!(mine.open_channel_key("site2", "engine", 3, &sealed), None, "bound to the recipient");
        assert_eq!(mine.open_channel_key("site1", "rules", 3, &sealed), None, "bound to the channel");
        assert_eq!(mine.open_channel_key("site1", "engine", 4, &sealed), None, "bound to the epoch");
        // A rotated key sealed by `seal_key` never opens as a channel key, nor the other way round.
        let rekey = mine.seal_key("site1", &ck);
        assert_eq!(mine.open_channel_key("site1", "engine", 3, &rekey), None);
        assert_eq!(mine.open_key("site1", &ck.id(), &sealed), None);
        let mut flipped = unhex(&sealed).unwrap();
        flipped[30] ^= 1;
        assert_eq!(mine.open_channel_key("site1", "engine", 3, &hex(&flipped)), None);
    }

    #[test]
    fn signatures_verify_only_for_the_signed_bytes_and_key() {
        let sk = SigningKey::generate();
        let pk = PublicKey::from_hex(&sk.public().to_hex()).unwrap();
        let sig = sk.sign(b"control");
        assert_eq!(sig.len(), 128);
        assert!(pk.verify(b"control", &sig));
        assert!(!pk.verify(b"contro1", &sig));
        assert!(!SigningKey::generate().public().verify(b"control", &sig), "another key must not verify");
        assert!(!pk.verify(b"control", &sig[..126]));
        assert!(!pk.verify(b"control", "zz"));
        // Without the context, a plain Ed25519 signature of the same bytes is not a reply signature.
        use ed25519_dalek::Signer;
        let plain = hex(&sk.0.sign(b"control").to_bytes());
        assert!(!pk.verify(b"control", &plain));
        assert_eq!(SigningKey::from_hex(&sk.to_hex()).unwrap().public(), sk.public());
        assert!(!format!("{sk:?}").contains(&sk.to_hex()));
        assert_eq!(PublicKey::from_hex("00"), Err(KeyError::WrongLength));
    }
}

//! Digests, signatures and encryption at rest — all on aws-lc-rs, the binary's one crypto
//! provider.
//!
//! Key files are PEM: Ed25519 private keys as PKCS#8 (`PRIVATE KEY`), public keys as SPKI
//! (`PUBLIC KEY`); encryption keys are 32 random bytes, base64 (one line, Secret-friendly).
//!
//! Encryption is AES-256-GCM in the STREAM construction: the plaintext is cut into chunks, each
//! sealed with a nonce of (random prefix, chunk counter, last-chunk flag) and the header as
//! associated data. A reordered, dropped, truncated or altered chunk fails to open.

use std::io::{Read, Write};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::digest;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use aws_lc_rs::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: not a PEM {label} block")]
    Pem { what: String, label: &'static str },
    #[error("{0}: not an Ed25519 key")]
    BadKey(String),
    #[error("{0}: an encryption key must be 32 bytes, base64-encoded")]
    BadEncryptionKey(String),
    #[error("signature does not match: the manifest was altered or signed with another key")]
    BadSignature,
    #[error("not a Kasmina encrypted file (bad header)")]
    BadHeader,
    #[error(
        "decryption failed at chunk {0}: wrong key, or the file was altered, reordered or truncated"
    )]
    Decrypt(u64),
    #[error("the encrypted file ends early (truncated after chunk {0})")]
    Truncated(u64),
    #[error("too many chunks")]
    TooLong,
    #[error("random number generator failed")]
    Random,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    sha256_digest(digest::digest(&digest::SHA256, bytes))
}

/// `sha256:<hex>` of a finished SHA-256.
pub fn sha256_digest(digest: digest::Digest) -> String {
    format!("sha256:{}", hex(digest.as_ref()))
}

/// `sha256:<hex>` of everything `reader` yields, streamed.
pub fn sha256_reader(mut reader: impl Read) -> Result<String, Error> {
    let mut ctx = digest::Context::new(&digest::SHA256);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(sha256_digest(ctx.finish()))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    let body = BASE64.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn pem_decode(text: &str, label: &'static str, what: &str) -> Result<Vec<u8>, Error> {
    let err = || Error::Pem {
        what: what.into(),
        label,
    };
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin).ok_or_else(err)? + begin.len();
    let stop = text[start..].find(&end).ok_or_else(err)? + start;
    let body: String = text[start..stop].split_whitespace().collect();
    BASE64.decode(body).map_err(|_| err())
}

/// The DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410); the raw key follows.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// An Ed25519 signing key.
pub struct SigningKey(Ed25519KeyPair);

impl SigningKey {
    /// A new random key.
    pub fn generate() -> Result<Self, Error> {
        let pkcs8 =
            Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| Error::Random)?;
        Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
            .map(Self)
            .map_err(|_| Error::Random)
    }

    /// Reads a PEM `PRIVATE KEY` (PKCS#8) file's text.
    pub fn from_pem(text: &str, what: &str) -> Result<Self, Error> {
        let der = pem_decode(text, "PRIVATE KEY", what)?;
        Ed25519KeyPair::from_pkcs8(&der)
            .or_else(|_| Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der))
            .map(Self)
            .map_err(|_| Error::BadKey(what.into()))
    }

    pub fn to_pem(&self) -> Result<String, Error> {
        let doc = self.0.to_pkcs8v1().map_err(|_| Error::Random)?;
        Ok(pem_encode("PRIVATE KEY", doc.as_ref()))
    }

    pub fn public_key(&self) -> VerifyingKey {
        VerifyingKey(self.0.public_key().as_ref().to_vec())
    }

    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.0.sign(message).as_ref().to_vec()
    }
}

/// An Ed25519 public key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyingKey(Vec<u8>);

impl VerifyingKey {
    /// Reads a PEM `PUBLIC KEY` (SPKI) file's text.
    pub fn from_pem(text: &str, what: &str) -> Result<Self, Error> {
        let der = pem_decode(text, "PUBLIC KEY", what)?;
        match der.strip_prefix(&ED25519_SPKI_PREFIX[..]) {
            Some(raw) if raw.len() == 32 => Ok(Self(raw.to_vec())),
            _ => Err(Error::BadKey(what.into())),
        }
    }

    pub fn to_pem(&self) -> String {
        let mut der = ED25519_SPKI_PREFIX.to_vec();
        der.extend_from_slice(&self.0);
        pem_encode("PUBLIC KEY", &der)
    }

    /// A short, stable name for the key: the first 16 hex digits of its SHA-256.
    pub fn key_id(&self) -> String {
        sha256(&self.0)["sha256:".len()..][..16].to_owned()
    }

    pub fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), Error> {
        UnparsedPublicKey::new(&ED25519, &self.0)
            .verify(message, signature)
            .map_err(|_| Error::BadSignature)
    }
}

/// An AES-256-GCM key for artifacts at rest.
pub struct EncryptionKey([u8; 32]);

const MAGIC: &[u8; 8] = b"KSMENC01";
const PREFIX_LEN: usize = 7;
/// Plaintext bytes per chunk.
pub const CHUNK: usize = 64 * 1024;
const TAG_LEN: usize = 16;

impl EncryptionKey {
    pub fn generate() -> Result<Self, Error> {
        let mut key = [0u8; 32];
        SystemRandom::new()
            .fill(&mut key)
            .map_err(|_| Error::Random)?;
        Ok(Self(key))
    }

    /// Parses the base64 text of a key file (surrounding whitespace ignored).
    pub fn from_base64(text: &str, what: &str) -> Result<Self, Error> {
        let bytes = BASE64
            .decode(text.trim())
            .map_err(|_| Error::BadEncryptionKey(what.into()))?;
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|_| Error::BadEncryptionKey(what.into()))?;
        Ok(Self(key))
    }

    pub fn to_base64(&self) -> String {
        BASE64.encode(self.0)
    }

    /// A short name for the key that reveals nothing of it: 16 hex digits of a
    /// domain-separated SHA-256.
    pub fn key_id(&self) -> String {
        let mut input = b"kasmina encryption key id\0".to_vec();
        input.extend_from_slice(&self.0);
        sha256(&input)["sha256:".len()..][..16].to_owned()
    }

    fn aead(&self) -> Result<LessSafeKey, Error> {
        UnboundKey::new(&AES_256_GCM, &self.0)
            .map(LessSafeKey::new)
            .map_err(|_| Error::BadEncryptionKey("AES-256 key".into()))
    }

    /// Encrypts `input` to `output`, streamed chunk by chunk. Returns the bytes written.
    pub fn encrypt(&self, mut input: impl Read, mut output: impl Write) -> Result<u64, Error> {
        let key = self.aead()?;
        let mut prefix = [0u8; PREFIX_LEN];
        SystemRandom::new()
            .fill(&mut prefix)
            .map_err(|_| Error::Random)?;
        let mut header = MAGIC.to_vec();
        header.extend_from_slice(&prefix);
        header.extend_from_slice(&(CHUNK as u32).to_be_bytes());
        output.write_all(&header)?;
        let mut written = header.len() as u64;

        // Read one chunk ahead, so the last chunk is known when it is sealed.
        let mut current = read_chunk(&mut input)?;
        let mut counter: u32 = 0;
        loop {
            let next = if current.len() == CHUNK {
                read_chunk(&mut input)?
            } else {
                vec![]
            };
            let last = next.is_empty();
            let nonce = nonce(&prefix, counter, last);
            let mut sealed = current;
            key.seal_in_place_append_tag(nonce, Aad::from(&header[..]), &mut sealed)
                .map_err(|_| Error::Decrypt(u64::from(counter)))?;
            output.write_all(&sealed)?;
            written += sealed.len() as u64;
            if last {
                break;
            }
            current = next;
            counter = counter.checked_add(1).ok_or(Error::TooLong)?;
        }
        output.flush()?;
        Ok(written)
    }

    /// Decrypts what `encrypt` wrote, streamed; fails on any alteration or truncation.
    pub fn decrypt(&self, mut input: impl Read, mut output: impl Write) -> Result<u64, Error> {
        let key = self.aead()?;
        let mut header = [0u8; 8 + PREFIX_LEN + 4];
        input
            .read_exact(&mut header)
            .map_err(|_| Error::BadHeader)?;
        if &header[..8] != MAGIC {
            return Err(Error::BadHeader);
        }
        let prefix: [u8; PREFIX_LEN] = header[8..8 + PREFIX_LEN]
            .try_into()
            .map_err(|_| Error::BadHeader)?;
        let chunk = u32::from_be_bytes(
            header[8 + PREFIX_LEN..]
                .try_into()
                .map_err(|_| Error::BadHeader)?,
        ) as usize;
        if chunk == 0 || chunk > 16 << 20 {
            return Err(Error::BadHeader);
        }
        let mut written = 0u64;
        let mut counter: u32 = 0;
        let mut current = read_exact_or_eof(&mut input, chunk + TAG_LEN)?;
        loop {
            if current.len() < TAG_LEN {
                return Err(Error::Truncated(u64::from(counter)));
            }
            let next = if current.len() == chunk + TAG_LEN {
                read_exact_or_eof(&mut input, chunk + TAG_LEN)?
            } else {
                vec![]
            };
            let last = next.is_empty();
            let mut opened = current;
            let plain = key
                .open_in_place(
                    nonce(&prefix, counter, last),
                    Aad::from(&header[..]),
                    &mut opened,
                )
                .map_err(|_| {
                    // A full chunk that fails as "last" may be a file cut at a chunk boundary.
                    if last {
                        Error::Truncated(u64::from(counter))
                    } else {
                        Error::Decrypt(u64::from(counter))
                    }
                })?;
            output.write_all(plain)?;
            written += plain.len() as u64;
            if last {
                break;
            }
            current = next;
            counter = counter.checked_add(1).ok_or(Error::TooLong)?;
        }
        output.flush()?;
        Ok(written)
    }
}

fn nonce(prefix: &[u8; PREFIX_LEN], counter: u32, last: bool) -> Nonce {
    let mut bytes = [0u8; NONCE_LEN];
    bytes[..PREFIX_LEN].copy_from_slice(prefix);
    bytes[PREFIX_LEN..PREFIX_LEN + 4].copy_from_slice(&counter.to_be_bytes());
    bytes[NONCE_LEN - 1] = u8::from(last);
    Nonce::assume_unique_for_key(bytes)
}

fn read_chunk(input: &mut impl Read) -> Result<Vec<u8>, Error> {
    read_exact_or_eof(input, CHUNK)
}

/// Reads up to `len` bytes, fewer only at end of input.
fn read_exact_or_eof(input: &mut impl Read, len: usize) -> Result<Vec<u8>, Error> {
    let mut buf = vec![0u8; len];
    let mut filled = 0;
    while filled < len {
        let n = input.read(&mut buf[filled..])?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    buf.truncate(filled);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_tamper() {
        let key = SigningKey::generate().unwrap();
        let reloaded = SigningKey::from_pem(&key.to_pem().unwrap(), "test").unwrap();
        let public = VerifyingKey::from_pem(&key.public_key().to_pem(), "test").unwrap();
        assert_eq!(public, reloaded.public_key());
        let sig = reloaded.sign(b"manifest");
        public.verify(b"manifest", &sig).unwrap();
        assert!(public.verify(b"manifesT", &sig).is_err());
        let other = SigningKey::generate().unwrap().public_key();
        assert!(other.verify(b"manifest", &sig).is_err());
        assert!(VerifyingKey::from_pem("nope", "x").is_err());
    }

    fn roundtrip(len: usize) -> (EncryptionKey, Vec<u8>, Vec<u8>) {
        let key = EncryptionKey::generate().unwrap();
        let plain: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        let mut sealed = vec![];
        key.encrypt(&plain[..], &mut sealed).unwrap();
        let mut opened = vec![];
        key.decrypt(&sealed[..], &mut opened).unwrap();
        assert_eq!(opened, plain, "len {len}");
        (key, plain, sealed)
    }

    #[test]
    fn encrypts_any_length() {
        for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK] {
            roundtrip(len);
        }
    }

    #[test]
    fn truncation_reordering_and_flips_fail() {
        let (key, _, sealed) = roundtrip(3 * CHUNK + 100);
        let header = 8 + PREFIX_LEN + 4;
        let block = CHUNK + TAG_LEN;
        // Cut at a chunk boundary: the now-last chunk was not sealed as last.
        let cut = &sealed[..header + 2 * block];
        assert!(matches!(
            key.decrypt(cut, &mut vec![]),
            Err(Error::Truncated(_))
        ));
        // Cut mid-chunk.
        assert!(
            key.decrypt(&sealed[..sealed.len() - 7], &mut vec![])
                .is_err()
        );
        // Swap two chunks.
        let mut swapped = sealed.clone();
        let (a, b) = (header, header + block);
        let first = sealed[a..a + block].to_vec();
        swapped[a..a + block].copy_from_slice(&sealed[b..b + block]);
        swapped[b..b + block].copy_from_slice(&first);
        assert!(key.decrypt(&swapped[..], &mut vec![]).is_err());
        // One flipped bit.
        let mut flipped = sealed.clone();
        flipped[header + 10] ^= 1;
        assert!(key.decrypt(&flipped[..], &mut vec![]).is_err());
        // Wrong key.
        assert!(
            EncryptionKey::generate()
                .unwrap()
                .decrypt(&sealed[..], &mut vec![])
                .is_err()
        );
        assert!(EncryptionKey::from_base64("c2hvcnQ=", "k").is_err());
    }
}

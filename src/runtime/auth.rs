//! Bearer-token authentication for the inference routes (jsonwebtoken on aws-lc-rs).
//!
//! The algorithm is pinned by the key, never taken from the token: an RSA key verifies RS256
//! only, a P-256 key ES256, an Ed25519 key EdDSA, a shared secret HS256. That closes the
//! classic confusions (`alg: none`, an HS256 token "signed" with the RSA public key).
//! `exp` and `aud` are required; `nbf` and `iss` are checked when present / configured.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Shared secrets shorter than this are refused: HS256 needs a key as long as its hash.
pub const MIN_SECRET_BYTES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{path}: {message}")]
    Key { path: String, message: String },
    /// The request's token was refused; the message goes to the caller.
    #[error("{0}")]
    Rejected(String),
    #[error("signing the token: {0}")]
    Sign(String),
}

/// The claims Kasmina issues and reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    pub aud: String,
    pub exp: u64,
    pub iat: u64,
    pub nbf: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
}

struct VerifyKey {
    kid: Option<String>,
    key: DecodingKey,
    algorithm: Algorithm,
}

/// Verifies tokens against one key file or a JWKS file.
pub struct Verifier {
    keys: Vec<VerifyKey>,
    audience: String,
    issuer: Option<String>,
}

impl Verifier {
    /// A PEM public key (RSA, EC P-256 or Ed25519) or a shared secret (HS256).
    pub fn from_key_file(
        path: &Path,
        audience: &str,
        issuer: Option<&str>,
    ) -> Result<Self, AuthError> {
        let bytes = read(path)?;
        let (key, algorithm) = decoding_key(&bytes).map_err(|message| AuthError::Key {
            path: path.display().to_string(),
            message,
        })?;
        Ok(Self {
            keys: vec![VerifyKey {
                kid: None,
                key,
                algorithm,
            }],
            audience: audience.into(),
            issuer: issuer.map(str::to_owned),
        })
    }

    /// A JSON Web Key Set; each key's algorithm comes from its `alg`, or from its type.
    pub fn from_jwks_file(
        path: &Path,
        audience: &str,
        issuer: Option<&str>,
    ) -> Result<Self, AuthError> {
        let bad = |message: String| AuthError::Key {
            path: path.display().to_string(),
            message,
        };
        let set: JwkSet =
            serde_json::from_slice(&read(path)?).map_err(|e| bad(format!("not a JWK set: {e}")))?;
        let mut keys = vec![];
        for jwk in &set.keys {
            let algorithm = match (jwk.common.key_algorithm, &jwk.algorithm) {
                (Some(KeyAlgorithm::RS256), _) => Algorithm::RS256,
                (Some(KeyAlgorithm::ES256), _) => Algorithm::ES256,
                (Some(KeyAlgorithm::EdDSA), _) => Algorithm::EdDSA,
                (Some(KeyAlgorithm::HS256), _) => Algorithm::HS256,
                (Some(other), _) => return Err(bad(format!("unsupported key algorithm {other}"))),
                (None, AlgorithmParameters::RSA(_)) => Algorithm::RS256,
                (None, AlgorithmParameters::EllipticCurve(_)) => Algorithm::ES256,
                (None, AlgorithmParameters::OctetKeyPair(_)) => Algorithm::EdDSA,
                (None, AlgorithmParameters::OctetKey(_)) => Algorithm::HS256,
                (None, _) => return Err(bad("a key has an unsupported type".into())),
            };
            let key = DecodingKey::from_jwk(jwk).map_err(|e| bad(e.to_string()))?;
            keys.push(VerifyKey {
                kid: jwk.common.key_id.clone(),
                key,
                algorithm,
            });
        }
        if keys.is_empty() {
            return Err(bad("the key set is empty".into()));
        }
        Ok(Self {
            keys,
            audience: audience.into(),
            issuer: issuer.map(str::to_owned),
        })
    }

    /// Checks an `Authorization` header value.
    pub fn verify_header(&self, header: Option<&str>) -> Result<Claims, AuthError> {
        let header =
            header.ok_or_else(|| AuthError::Rejected("a bearer token is required".into()))?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or_else(|| AuthError::Rejected("the Authorization scheme must be Bearer".into()))?
            .trim();
        self.verify(token)
    }

    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let reject = |e: jsonwebtoken::errors::Error| AuthError::Rejected(describe(&e));
        let header = jsonwebtoken::decode_header(token).map_err(reject)?;
        let key = match &header.kid {
            Some(kid) => self
                .keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid.as_str()))
                .or_else(|| (self.keys.len() == 1).then(|| &self.keys[0])),
            None if self.keys.len() == 1 => self.keys.first(),
            None => None,
        }
        .ok_or_else(|| AuthError::Rejected("no key matches the token's kid".into()))?;
        if header.alg != key.algorithm {
            return Err(AuthError::Rejected(format!(
                "algorithm {:?} is not accepted; this key verifies {:?}",
                header.alg, key.algorithm
            )));
        }
        let mut validation = Validation::new(key.algorithm);
        validation.set_audience(&[&self.audience]);
        validation.validate_nbf = true;
        validation.leeway = 30;
        validation.set_required_spec_claims(&["exp", "aud"]);
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &key.key, &validation).map_err(reject)?;
        Ok(data.claims)
    }
}

fn describe(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind;
    match e.kind() {
        ErrorKind::ExpiredSignature => "the token has expired".into(),
        ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)".into(),
        ErrorKind::InvalidAudience => "the token's audience is not this model".into(),
        ErrorKind::InvalidIssuer => "the token's issuer is not accepted".into(),
        ErrorKind::InvalidSignature => "the token's signature is invalid".into(),
        ErrorKind::InvalidAlgorithm => "the token's algorithm is not accepted".into(),
        ErrorKind::MissingRequiredClaim(c) => format!("the token has no {c} claim"),
        _ => format!("the token is invalid: {e}"),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, AuthError> {
    std::fs::read(path).map_err(|e| AuthError::Key {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

fn is_pem(bytes: &[u8]) -> bool {
    bytes.trim_ascii_start().starts_with(b"-----BEGIN")
}

fn secret(bytes: &[u8]) -> Result<&[u8], String> {
    let secret = bytes.trim_ascii();
    if secret.len() < MIN_SECRET_BYTES {
        return Err(format!(
            "a shared secret must have at least {MIN_SECRET_BYTES} bytes; this one has {}",
            secret.len()
        ));
    }
    Ok(secret)
}

/// The verification key in a file, and the one algorithm it verifies.
fn decoding_key(bytes: &[u8]) -> Result<(DecodingKey, Algorithm), String> {
    if !is_pem(bytes) {
        return Ok((DecodingKey::from_secret(secret(bytes)?), Algorithm::HS256));
    }
    if let Ok(key) = DecodingKey::from_ed_pem(bytes) {
        return Ok((key, Algorithm::EdDSA));
    }
    if let Ok(key) = DecodingKey::from_ec_pem(bytes) {
        return Ok((key, Algorithm::ES256));
    }
    if let Ok(key) = DecodingKey::from_rsa_pem(bytes) {
        return Ok((key, Algorithm::RS256));
    }
    Err("not a PEM public key (RSA, EC P-256 or Ed25519)".into())
}

/// The signing key in a file, and its algorithm.
fn encoding_key(bytes: &[u8]) -> Result<(EncodingKey, Algorithm), String> {
    if !is_pem(bytes) {
        return Ok((EncodingKey::from_secret(secret(bytes)?), Algorithm::HS256));
    }
    if let Ok(key) = EncodingKey::from_ed_pem(bytes) {
        return Ok((key, Algorithm::EdDSA));
    }
    if let Ok(key) = EncodingKey::from_ec_pem(bytes) {
        return Ok((key, Algorithm::ES256));
    }
    if let Ok(key) = EncodingKey::from_rsa_pem(bytes) {
        return Ok((key, Algorithm::RS256));
    }
    Err("not a PEM private key (RSA, EC P-256 or Ed25519 in PKCS#8)".into())
}

/// What `kasmina token` signs.
pub struct TokenRequest<'a> {
    pub audience: &'a str,
    pub issuer: Option<&'a str>,
    pub subject: Option<&'a str>,
    pub lifetime: Duration,
    pub key_id: Option<&'a str>,
}

/// Issues a token with the private key (or secret) in `key_file`, valid from `now`.
pub fn issue(
    key_file: &Path,
    request: &TokenRequest,
    now: SystemTime,
) -> Result<String, AuthError> {
    issue_with(
        &read(key_file)?,
        &key_file.display().to_string(),
        request,
        now,
    )
}

/// Issues a token with the private key (or secret) `key`; `what` names it in errors (a file,
/// or a Secret's entry).
pub fn issue_with(
    key: &[u8],
    what: &str,
    request: &TokenRequest,
    now: SystemTime,
) -> Result<String, AuthError> {
    let (key, algorithm) = encoding_key(key).map_err(|message| AuthError::Key {
        path: what.to_owned(),
        message,
    })?;
    let iat = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let claims = Claims {
        aud: request.audience.into(),
        exp: iat + request.lifetime.as_secs(),
        iat,
        nbf: iat,
        iss: request.issuer.map(str::to_owned),
        sub: request.subject.map(str::to_owned),
    };
    let mut header = Header::new(algorithm);
    header.kid = request.key_id.map(str::to_owned);
    jsonwebtoken::encode(&header, &claims, &key).map_err(|e| AuthError::Sign(e.to_string()))
}

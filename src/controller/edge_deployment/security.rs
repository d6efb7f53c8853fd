//! The keys an EdgeDeployment's compliance rules call for, and what its pods mount of them.
//!
//! One Secret per EdgeDeployment, `<name>-kasmina-keys`, holds an Ed25519 pair that signs its
//! artifacts (`requireSignedArtifacts`), an AES-256 key that encrypts them at rest
//! (`requireEncryptionAtRest`) and an Ed25519 pair its runtime verifies JWTs with
//! (`requireAuthentication`; `kasmina token --key` mints from `jwt.key`). The build Job mounts
//! only the private signing key and the encryption key; runtime pods only the public halves and
//! the encryption key. Keys are made once and never replaced: the key ids are part of the
//! revision, so new keys (a deleted Secret) rebuild and roll out a revision that verifies.
//!
//! Everything here is pure except `complete`, which draws random keys.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{
    KeyToPath, PodSecurityContext, SeccompProfile, Secret, SecretVolumeSource, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};

use crate::api::compliance_profile::ComplianceRules;
use crate::api::edge_deployment::{ArtifactStatus, EdgeDeployment};
use crate::crypto::{self, EncryptionKey, SigningKey, VerifyingKey};

pub const SIGNING_KEY: &str = "signing.key";
pub const SIGNING_PUB: &str = "signing.pub";
pub const ENCRYPTION_KEY: &str = "encryption.key";
pub const JWT_KEY: &str = "jwt.key";
pub const JWT_PUB: &str = "jwt.pub";
/// Where the build Job and runtime pods find the keys.
pub const KEYS_DIR: &str = "/var/run/kasmina/keys";

/// Errors of reading or completing the keys Secret.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Secret {secret}, key {key}: {source}")]
    Key {
        secret: String,
        key: &'static str,
        #[source]
        source: crypto::Error,
    },
    #[error("Secret {secret}, key {key}: not UTF-8 text")]
    NotText { secret: String, key: &'static str },
}

/// The keys Secret of `ed`.
pub fn secret_name(ed: &EdgeDeployment) -> String {
    format!("{}-kasmina-keys", ed.name_any())
}

/// What the compliance rules ask of the artifact and the runtime.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Needs {
    pub sign: bool,
    pub encrypt: bool,
    pub authenticate: bool,
}

impl Needs {
    pub fn from_rules(rules: &ComplianceRules) -> Self {
        Self {
            sign: rules.require_signed_artifacts == Some(true),
            encrypt: rules.require_encryption_at_rest == Some(true),
            authenticate: rules.require_authentication == Some(true),
        }
    }

    pub fn any(self) -> bool {
        self.sign || self.encrypt || self.authenticate
    }
}

/// What the reconciler found: the needs and the keys Secret, if it was read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Security {
    pub needs: Needs,
    pub keys: Option<Keys>,
}

/// The keys Secret as observed: which keys it holds, named by their ids.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Keys {
    pub secret: String,
    pub signing_key_id: Option<String>,
    pub encryption_key_id: Option<String>,
    pub jwt: bool,
}

fn text<'a>(
    data: &'a BTreeMap<String, ByteString>,
    secret: &str,
    key: &'static str,
) -> Result<Option<&'a str>, Error> {
    data.get(key)
        .map(|b| {
            std::str::from_utf8(&b.0).map_err(|_| Error::NotText {
                secret: secret.into(),
                key,
            })
        })
        .transpose()
}

fn bad(secret: &str, key: &'static str) -> impl FnOnce(crypto::Error) -> Error {
    let secret = secret.to_owned();
    move |source| Error::Key {
        secret,
        key,
        source,
    }
}

impl Keys {
    /// Reads the ids of the keys a Secret holds; a key that does not parse is an error (it is
    /// never overwritten: it may be the user's own).
    pub fn read(name: &str, data: &BTreeMap<String, ByteString>) -> Result<Self, Error> {
        let signing_key_id = text(data, name, SIGNING_PUB)?
            .map(|pem| VerifyingKey::from_pem(pem, SIGNING_PUB))
            .transpose()
            .map_err(bad(name, SIGNING_PUB))?
            .map(|k| k.key_id());
        let encryption_key_id = text(data, name, ENCRYPTION_KEY)?
            .map(|b64| EncryptionKey::from_base64(b64, ENCRYPTION_KEY))
            .transpose()
            .map_err(bad(name, ENCRYPTION_KEY))?
            .map(|k| k.key_id());
        Ok(Self {
            secret: name.to_owned(),
            signing_key_id,
            encryption_key_id,
            jwt: data.contains_key(JWT_PUB),
        })
    }
}

/// Adds the keys `needs` calls for and `data` lacks (a missing public half is derived from
/// its private key). None when nothing is missing.
pub fn complete(
    name: &str,
    data: &BTreeMap<String, ByteString>,
    needs: Needs,
) -> Result<Option<BTreeMap<String, ByteString>>, Error> {
    let mut out = data.clone();
    let mut put = |key: &str, value: String| {
        out.insert(key.to_owned(), ByteString(value.into_bytes()));
    };
    let pairs = [
        (needs.sign, SIGNING_KEY, SIGNING_PUB),
        (needs.authenticate, JWT_KEY, JWT_PUB),
    ];
    for (wanted, private, public) in pairs {
        if !wanted || data.contains_key(public) {
            continue;
        }
        let key = match text(data, name, private)? {
            Some(pem) => SigningKey::from_pem(pem, private).map_err(bad(name, private))?,
            None => {
                let key = SigningKey::generate().map_err(bad(name, private))?;
                put(private, key.to_pem().map_err(bad(name, private))?);
                key
            }
        };
        put(public, key.public_key().to_pem());
    }
    if needs.encrypt && !data.contains_key(ENCRYPTION_KEY) {
        let key = EncryptionKey::generate().map_err(bad(name, ENCRYPTION_KEY))?;
        put(ENCRYPTION_KEY, key.to_base64());
    }
    Ok((out != *data).then_some(out))
}

/// The keys Secret to apply with `data`. It is owned by `ed` (deleted with it) unless it
/// existed before and someone else owns it — a user who brings their own keys keeps them.
pub fn key_secret(ed: &EdgeDeployment, data: BTreeMap<String, ByteString>, owned: bool) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(secret_name(ed)),
            namespace: ed.namespace(),
            labels: Some(BTreeMap::from([
                (super::names::NAME_LABEL.to_owned(), ed.name_any()),
                (
                    "app.kubernetes.io/managed-by".to_owned(),
                    "kasmina".to_owned(),
                ),
            ])),
            owner_references: owned.then(|| ed.controller_owner_ref(&()).into_iter().collect()),
            ..ObjectMeta::default()
        },
        data: Some(data),
        type_: Some("Opaque".into()),
        ..Secret::default()
    }
}

/// What the artifact of a revision built under `needs` is made with: the key ids, which are
/// part of the revision hash. None when the artifact is neither signed nor encrypted.
pub fn artifact_identity(needs: Needs, keys: Option<&Keys>) -> Option<(String, String)> {
    let id = |wanted: bool, id: Option<&String>| {
        if wanted {
            id.cloned().unwrap_or_else(|| "missing".into())
        } else {
            String::new()
        }
    };
    (needs.sign || needs.encrypt).then(|| {
        (
            id(needs.sign, keys.and_then(|k| k.signing_key_id.as_ref())),
            id(
                needs.encrypt,
                keys.and_then(|k| k.encryption_key_id.as_ref()),
            ),
        )
    })
}

/// Command-line flags and the keys volume for a container: `files` are (wanted, flag, Secret
/// key); the wanted ones are mounted and passed.
fn mount(
    keys: Option<&Keys>,
    files: &[(bool, &str, &'static str)],
) -> (Vec<String>, Option<(Volume, VolumeMount)>) {
    let files: Vec<(&str, &str)> = files
        .iter()
        .filter(|(wanted, _, _)| *wanted)
        .map(|(_, flag, key)| (*flag, *key))
        .collect();
    let Some(keys) = keys.filter(|_| !files.is_empty()) else {
        return (vec![], None);
    };
    let args = files
        .iter()
        .flat_map(|(flag, key)| [(*flag).to_owned(), format!("{KEYS_DIR}/{key}")])
        .collect();
    let volume = Volume {
        name: "keys".into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(keys.secret.clone()),
            items: Some(
                files
                    .iter()
                    .map(|(_, key)| KeyToPath {
                        key: (*key).to_owned(),
                        path: (*key).to_owned(),
                        ..KeyToPath::default()
                    })
                    .collect(),
            ),
            // Readable by the pod's group only (`fsGroup`, see `pod_security`).
            default_mode: Some(0o440),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    };
    let volume_mount = VolumeMount {
        name: "keys".into(),
        mount_path: KEYS_DIR.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    };
    (args, Some((volume, volume_mount)))
}

/// The image's user; the pod's group owns the keys volume, so that user can read it.
pub const IMAGE_USER: i64 = 65532;

/// The pod security context of the build Job and runtime pods.
pub fn pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        fs_group: Some(IMAGE_USER),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..SeccompProfile::default()
        }),
        ..PodSecurityContext::default()
    }
}

/// The builder's flags and volume: it signs and encrypts as `needs` says.
pub fn build_keys(
    needs: Needs,
    keys: Option<&Keys>,
) -> (Vec<String>, Option<(Volume, VolumeMount)>) {
    let has = |id: fn(&Keys) -> bool| keys.is_some_and(id);
    mount(
        keys,
        &[
            (
                needs.sign && has(|k| k.signing_key_id.is_some()),
                "--sign-key",
                SIGNING_KEY,
            ),
            (
                needs.encrypt && has(|k| k.encryption_key_id.is_some()),
                "--encrypt-key",
                ENCRYPTION_KEY,
            ),
        ],
    )
}

/// The runtime's flags and volume: it verifies the signature of a signed artifact, decrypts
/// an encrypted one, and checks JWTs when `authenticate`.
pub fn runtime_keys(
    artifact: &ArtifactStatus,
    authenticate: bool,
    keys: Option<&Keys>,
) -> (Vec<String>, Option<(Volume, VolumeMount)>) {
    let has = |id: fn(&Keys) -> bool| keys.is_some_and(id);
    let jwt = authenticate && has(|k| k.jwt);
    let (mut args, volume) = mount(
        keys,
        &[
            (
                artifact.signed && has(|k| k.signing_key_id.is_some()),
                "--public-key",
                SIGNING_PUB,
            ),
            (
                artifact.encrypted && has(|k| k.encryption_key_id.is_some()),
                "--decrypt-key",
                ENCRYPTION_KEY,
            ),
            (jwt, "--jwt-key", JWT_PUB),
        ],
    );
    if jwt {
        args.extend(["--auth".to_owned(), "jwt".to_owned()]);
    }
    (args, volume)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn needs(sign: bool, encrypt: bool, authenticate: bool) -> Needs {
        Needs {
            sign,
            encrypt,
            authenticate,
        }
    }

    #[test]
    fn keys_are_made_once_and_only_those_the_rules_need() {
        let empty = BTreeMap::new();
        assert_eq!(complete("k", &empty, Needs::default()).unwrap(), None);

        let signed = complete("k", &empty, needs(true, false, false))
            .unwrap()
            .unwrap();
        let names: Vec<&str> = signed.keys().map(String::as_str).collect();
        assert_eq!(names, [SIGNING_KEY, SIGNING_PUB]);
        assert_eq!(
            complete("k", &signed, needs(true, false, false)).unwrap(),
            None,
            "a complete Secret is left alone"
        );

        let all = complete("k", &signed, needs(true, true, true))
            .unwrap()
            .unwrap();
        let names: Vec<&str> = all.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [ENCRYPTION_KEY, JWT_KEY, JWT_PUB, SIGNING_KEY, SIGNING_PUB]
        );
        assert_eq!(all[SIGNING_KEY], signed[SIGNING_KEY], "never replaced");

        // The public half matches the private one; ids name the keys.
        let keys = Keys::read("k", &all).unwrap();
        let private =
            SigningKey::from_pem(std::str::from_utf8(&all[SIGNING_KEY].0).unwrap(), "").unwrap();
        assert_eq!(keys.signing_key_id, Some(private.public_key().key_id()));
        assert!(keys.jwt);
        assert_eq!(keys.encryption_key_id.as_ref().map(String::len), Some(16));

        // A user's own private key gets its public half derived, not a new pair.
        let own = BTreeMap::from([(SIGNING_KEY.to_owned(), all[SIGNING_KEY].clone())]);
        let completed = complete("k", &own, needs(true, false, false))
            .unwrap()
            .unwrap();
        assert_eq!(completed[SIGNING_PUB], all[SIGNING_PUB]);
    }

    #[test]
    fn a_broken_key_is_reported_not_replaced() {
        let data = BTreeMap::from([(SIGNING_KEY.to_owned(), ByteString(b"not a key".to_vec()))]);
        let error = complete("ml/s-kasmina-keys", &data, needs(true, false, false)).unwrap_err();
        assert_eq!(
            error.to_string(),
            "Secret ml/s-kasmina-keys, key signing.key: signing.key: not a PEM PRIVATE KEY block"
        );
        let data = BTreeMap::from([(ENCRYPTION_KEY.to_owned(), ByteString(b"c2hvcnQ=".to_vec()))]);
        assert!(Keys::read("s", &data).is_err());
    }

    #[test]
    fn pods_mount_only_the_halves_they_use() {
        let keys = Keys {
            secret: "s-kasmina-keys".into(),
            signing_key_id: Some("a".into()),
            encryption_key_id: Some("b".into()),
            jwt: true,
        };
        let (args, volume) = build_keys(needs(true, true, true), Some(&keys));
        assert_eq!(
            args.join(" "),
            "--sign-key /var/run/kasmina/keys/signing.key --encrypt-key /var/run/kasmina/keys/encryption.key"
        );
        let (volume, mount) = volume.unwrap();
        let items: Vec<String> = volume
            .secret
            .unwrap()
            .items
            .unwrap()
            .into_iter()
            .map(|i| i.key)
            .collect();
        assert_eq!(
            items,
            [SIGNING_KEY, ENCRYPTION_KEY],
            "no JWT key in the build"
        );
        assert_eq!(mount.read_only, Some(true));

        let artifact = ArtifactStatus {
            signed: true,
            encrypted: true,
            ..ArtifactStatus::default()
        };
        let (args, volume) = runtime_keys(&artifact, true, Some(&keys));
        assert_eq!(
            args.join(" "),
            "--public-key /var/run/kasmina/keys/signing.pub --decrypt-key /var/run/kasmina/keys/encryption.key --jwt-key /var/run/kasmina/keys/jwt.pub --auth jwt"
        );
        let items: Vec<String> = volume
            .unwrap()
            .0
            .secret
            .unwrap()
            .items
            .unwrap()
            .into_iter()
            .map(|i| i.key)
            .collect();
        assert_eq!(
            items,
            [SIGNING_PUB, ENCRYPTION_KEY, JWT_PUB],
            "no private key in the runtime"
        );

        // An unsigned, clear artifact with no authentication mounts nothing.
        let (args, volume) = runtime_keys(&ArtifactStatus::default(), false, Some(&keys));
        assert!(args.is_empty() && volume.is_none());
    }

    #[test]
    fn the_artifact_identity_follows_the_key_ids() {
        let keys = Keys {
            secret: "s".into(),
            signing_key_id: Some("a".into()),
            encryption_key_id: Some("b".into()),
            jwt: true,
        };
        assert_eq!(
            artifact_identity(needs(false, false, true), Some(&keys)),
            None
        );
        assert_eq!(
            artifact_identity(needs(true, false, false), Some(&keys)),
            Some(("a".into(), String::new()))
        );
        let other = Keys {
            signing_key_id: Some("c".into()),
            ..keys.clone()
        };
        assert_ne!(
            artifact_identity(needs(true, true, false), Some(&keys)),
            artifact_identity(needs(true, true, false), Some(&other))
        );
    }
}

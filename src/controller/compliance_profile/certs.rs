//! The webhook's certificates, self-managed: a CA and a serving certificate (rcgen on
//! aws-lc-rs) kept in a Secret, the CA bundle patched into the ValidatingWebhookConfiguration,
//! rotated before expiry. Every replica runs `ensure`; optimistic concurrency on the Secret
//! makes one of them win and the others adopt its certificate. With cert-manager the Secret
//! is cert-manager's and this module only reads it.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::{Timestamp, tz::TimeZone};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const TLS_CERT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";
const NOT_AFTER: &str = "kasmina.dev/not-after";
const CA_NOT_AFTER: &str = "kasmina.dev/ca-not-after";
const DNS_NAMES: &str = "kasmina.dev/dns-names";

/// Lifetimes, in days: the serving certificate is renewed with a month left, the CA with a
/// quarter left (its successor is trusted beside it until the old one expires).
const CA_DAYS: i64 = 5 * 365;
const CERT_DAYS: i64 = 365;
const CERT_RENEW_DAYS: i64 = 30;
const CA_RENEW_DAYS: i64 = 90;
const DAY: i64 = 86_400;

/// Errors issuing, storing or publishing the certificates.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("issuing the webhook certificate: {0}")]
    Issue(#[from] rcgen::Error),
    #[error("Secret {namespace}/{name}: {source}")]
    Secret {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("Secret {namespace}/{name} has no {key} (cert-manager not done yet?)")]
    Incomplete {
        namespace: String,
        name: String,
        key: &'static str,
    },
    #[error("patching caBundle of ValidatingWebhookConfiguration {name}: {source}")]
    CaBundle {
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// PEM certificates and keys, and when they expire (Unix seconds).
#[derive(Clone, Debug, PartialEq)]
pub struct Material {
    /// The trusted CAs, newest first (two during a CA rotation).
    pub ca_bundle: String,
    pub ca_key: String,
    pub cert: String,
    pub key: String,
    pub ca_not_after: i64,
    pub not_after: i64,
    pub dns_names: Vec<String>,
}

/// The DNS names the API server uses for the webhook Service.
pub fn service_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        service.to_owned(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ]
}

/// (year, month, day) of a Unix time, for rcgen's validity dates.
fn civil(at: i64) -> (i32, u8, u8) {
    let date = Timestamp::from_second(at)
        .unwrap_or(Timestamp::UNIX_EPOCH)
        .to_zoned(TimeZone::UTC)
        .date();
    (i32::from(date.year()), date.month() as u8, date.day() as u8)
}

fn validity(params: &mut CertificateParams, now: i64, days: i64) -> i64 {
    let (y, m, d) = civil(now - DAY);
    params.not_before = rcgen::date_time_ymd(y, m, d);
    let not_after = now + days * DAY;
    let (y, m, d) = civil(not_after);
    params.not_after = rcgen::date_time_ymd(y, m, d);
    // Whole days: the certificate ends at the start of that day.
    not_after - not_after.rem_euclid(DAY)
}

/// The CA's parameters. Rebuilt the same way each time, so a stored CA key signs as the
/// stored CA certificate without parsing it.
fn ca_params() -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "kasmina-webhook-ca");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

/// The material to serve at `now`: `existing` when it is good for the names, or a newly
/// issued one (true) where something was missing or due.
pub fn plan(
    existing: Option<Material>,
    dns_names: &[String],
    now: i64,
) -> Result<(Material, bool), Error> {
    let ca_due = existing
        .as_ref()
        .is_none_or(|m| m.ca_not_after - now < CA_RENEW_DAYS * DAY);
    let cert_due = existing
        .as_ref()
        .is_none_or(|m| m.not_after - now < CERT_RENEW_DAYS * DAY || m.dns_names != dns_names);
    if let Some(m) = existing.as_ref().filter(|_| !ca_due && !cert_due) {
        return Ok((m.clone(), false));
    }
    let existing = existing.as_ref();
    let (ca_bundle, ca_key, ca_not_after) = match existing {
        Some(m) if !ca_due => (m.ca_bundle.clone(), m.ca_key.clone(), m.ca_not_after),
        _ => {
            let key = KeyPair::generate()?;
            let mut params = ca_params()?;
            let not_after = validity(&mut params, now, CA_DAYS);
            let cert = params.self_signed(&key)?;
            // The old CA stays trusted until it expires: certificates it signed still verify.
            let mut bundle = cert.pem();
            if let Some(m) = existing.filter(|m| m.ca_not_after > now) {
                let newest_old = m
                    .ca_bundle
                    .split_inclusive("-----END CERTIFICATE-----\n")
                    .next();
                bundle.push_str(newest_old.unwrap_or_default());
            }
            (bundle, key.serialize_pem(), not_after)
        }
    };
    let ca_key_pair = KeyPair::from_pem(&ca_key)?;
    let ca = ca_params()?;
    let issuer = Issuer::from_params(&ca, &ca_key_pair);
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(dns_names.to_vec())?;
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        dns_names.first().cloned().unwrap_or_default(),
    );
    params.distinguished_name = dn;
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let not_after = validity(&mut params, now, CERT_DAYS).min(ca_not_after);
    let cert = params.signed_by(&key, &issuer)?;
    let material = Material {
        ca_bundle,
        ca_key,
        cert: cert.pem(),
        key: key.serialize_pem(),
        ca_not_after,
        not_after,
        dns_names: dns_names.to_vec(),
    };
    Ok((material, true))
}

fn text(secret: &Secret, key: &'static str) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(key)?;
    String::from_utf8(bytes.0.clone()).ok()
}

/// The material a Secret holds; None when it is not (all) ours.
pub fn from_secret(secret: &Secret) -> Option<Material> {
    let annotations = secret.metadata.annotations.as_ref()?;
    Some(Material {
        ca_bundle: text(secret, CA_CERT)?,
        ca_key: text(secret, CA_KEY)?,
        cert: text(secret, TLS_CERT)?,
        key: text(secret, TLS_KEY)?,
        ca_not_after: annotations.get(CA_NOT_AFTER)?.parse().ok()?,
        not_after: annotations.get(NOT_AFTER)?.parse().ok()?,
        dns_names: annotations
            .get(DNS_NAMES)?
            .split(',')
            .map(str::to_owned)
            .collect(),
    })
}

/// The Secret for `material`; `base` keeps name, namespace and resourceVersion.
pub fn to_secret(base: &Secret, material: &Material) -> Secret {
    let mut secret = base.clone();
    secret.type_ = Some("kubernetes.io/tls".into());
    let annotations = secret
        .metadata
        .annotations
        .get_or_insert_with(BTreeMap::new);
    annotations.insert(NOT_AFTER.into(), material.not_after.to_string());
    annotations.insert(CA_NOT_AFTER.into(), material.ca_not_after.to_string());
    annotations.insert(DNS_NAMES.into(), material.dns_names.join(","));
    secret.data = Some(BTreeMap::from([
        (
            CA_CERT.into(),
            ByteString(material.ca_bundle.clone().into_bytes()),
        ),
        (
            CA_KEY.into(),
            ByteString(material.ca_key.clone().into_bytes()),
        ),
        (
            TLS_CERT.into(),
            ByteString(material.cert.clone().into_bytes()),
        ),
        (
            TLS_KEY.into(),
            ByteString(material.key.clone().into_bytes()),
        ),
    ]));
    secret
}

/// Where the webhook's certificate lives and who publishes its CA.
#[derive(Clone, Debug)]
pub struct Location {
    pub namespace: String,
    pub secret: String,
    pub service: String,
    /// The ValidatingWebhookConfiguration whose caBundle we keep; None under cert-manager.
    pub webhook_configuration: Option<String>,
}

/// Makes sure a valid certificate is in the Secret (issuing or rotating it when we manage it)
/// and its CA in the webhook configuration; returns (certificate chain, key) in PEM.
pub async fn ensure(client: &Client, at: &Location, now: i64) -> Result<(String, String), Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &at.namespace);
    let secret_error = |source| Error::Secret {
        namespace: at.namespace.clone(),
        name: at.secret.clone(),
        source,
    };
    let Some(configuration) = &at.webhook_configuration else {
        // cert-manager: read only.
        let secret = secrets.get(&at.secret).await.map_err(secret_error)?;
        let get = |key| {
            text(&secret, key).ok_or_else(|| Error::Incomplete {
                namespace: at.namespace.clone(),
                name: at.secret.clone(),
                key,
            })
        };
        return Ok((get(TLS_CERT)?, get(TLS_KEY)?));
    };
    let names = service_names(&at.service, &at.namespace);
    let live = secrets.get_opt(&at.secret).await.map_err(secret_error)?;
    let existing = live.as_ref().and_then(from_secret);
    let material = match plan(existing, &names, now)? {
        (kept, false) => kept,
        (fresh, true) => {
            let base = live.clone().unwrap_or_else(|| Secret {
                metadata: kube::api::ObjectMeta {
                    name: Some(at.secret.clone()),
                    namespace: Some(at.namespace.clone()),
                    ..Default::default()
                },
                ..Default::default()
            });
            let secret = to_secret(&base, &fresh);
            // create, or replace at the resourceVersion read: a replica that lost the race
            // gets 409 and adopts the winner's certificate.
            let written = match live {
                None => secrets.create(&PostParams::default(), &secret).await,
                Some(_) => {
                    secrets
                        .replace(&at.secret, &PostParams::default(), &secret)
                        .await
                }
            };
            match written {
                Ok(_) => fresh,
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    let won = secrets.get(&at.secret).await.map_err(secret_error)?;
                    from_secret(&won).unwrap_or(fresh)
                }
                Err(source) => return Err(secret_error(source)),
            }
        }
    };
    publish_ca_bundle(client, configuration, &material.ca_bundle).await?;
    Ok((material.cert, material.key))
}

/// Sets `caBundle` on every webhook of the configuration, when it differs.
async fn publish_ca_bundle(client: &Client, name: &str, bundle: &str) -> Result<(), Error> {
    let api: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let error = |source| Error::CaBundle {
        name: name.to_owned(),
        source,
    };
    let live = api.get(name).await.map_err(error)?;
    let wanted = ByteString(bundle.as_bytes().to_vec());
    let webhooks = live.webhooks.unwrap_or_default();
    if webhooks
        .iter()
        .all(|w| w.client_config.ca_bundle.as_ref() == Some(&wanted))
    {
        return Ok(());
    }
    // Webhooks merge by name (strategic merge): only caBundle changes.
    let patch = serde_json::json!({"webhooks": webhooks.iter().map(|w| serde_json::json!({
        "name": w.name, "clientConfig": {"caBundle": wanted}})).collect::<Vec<_>>()});
    api.patch(name, &PatchParams::default(), &Patch::Strategic(patch))
        .await
        .map_err(error)?;
    Ok(())
}

//! The names, labels and ports an EdgeDeployment's children are known by: a leaf every other
//! module of the controller may use, importing nothing of theirs.

use kube::ResourceExt;

use crate::api::EdgeDeployment;

/// Label on every child and runtime pod: the EdgeDeployment's name.
pub const NAME_LABEL: &str = "kasmina.dev/edge-deployment";
/// Label with the revision hash on build Jobs, runtime Deployments and their pods.
pub const REVISION_LABEL: &str = "kasmina.dev/revision";
/// `build` or `runtime`.
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
/// The component of the serving pods (build, retention and cleanup Jobs' pods are `build`,
/// `retention`, `cleanup`).
pub const RUNTIME_COMPONENT: &str = "runtime";
/// The component of `kasmina gateway` pods.
pub const GATEWAY_COMPONENT: &str = "gateway";

/// The label selector of the runtime pods of `name` (of one revision, if given): the scale
/// subresource, the Services, scrapes. Build and retention pods carry the name too.
pub fn runtime_selector(name: &str, revision: Option<&str>) -> String {
    match revision {
        Some(rev) => format!(
            "{NAME_LABEL}={name},{COMPONENT_LABEL}={RUNTIME_COMPONENT},{REVISION_LABEL}={rev}"
        ),
        None => format!("{NAME_LABEL}={name},{COMPONENT_LABEL}={RUNTIME_COMPONENT}"),
    }
}

/// Hash of the object as Kasmina last applied it; equal hash, no write.
pub const HASH_ANNOTATION: &str = "kasmina.dev/applied-hash";
/// The runtime's HTTP port (OIP, health, /metrics).
pub const RUNTIME_PORT: i32 = 8080;
/// The port the Services expose.
pub const SERVICE_PORT: i32 = 80;

/// Short revision used in object names.
pub fn rev8(revision: &str) -> &str {
    &revision[..revision.len().min(8)]
}

pub fn deployment_name(ed: &EdgeDeployment, revision: &str) -> String {
    format!("{}-{}", ed.name_any(), rev8(revision))
}

pub fn job_name(ed: &EdgeDeployment, revision: &str) -> String {
    format!("{}-build-{}", ed.name_any(), rev8(revision))
}

/// FNV-1a: tiny, stable across platforms and releases, and plenty for naming revisions.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

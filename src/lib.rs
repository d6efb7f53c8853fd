//! Kasmina: a Kubernetes operator that takes ML models to production on edge and cluster nodes.
//!
//! `api` is what users write, `controller` is what the operator does with it, `manifests`
//! turns both into and out of YAML, `telemetry` is logs, metrics and health. `model` is the
//! network, `artifact` and `runtime` are its life before and after deployment. `plugin` is
//! `kubectl kasmina`.

pub mod api;
pub mod artifact;
pub mod controller;
pub mod crypto;
pub mod gateway;
pub mod manifests;
pub mod model;
pub mod plugin;
pub mod runtime;
pub mod telemetry;

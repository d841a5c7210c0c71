//! Keeps this pod's `controller.kubernetes.io/pod-deletion-cost` annotation
//! in step with how busy the worker is, so that when a Deployment shrinks
//! the ReplicaSet deletes idle workers first (docs/adr/0022).
//!
//! The cost is the number of tasks running (`0` when idle). It is written
//! with a JSON merge patch of the pod's own metadata, through the in-cluster
//! API with the pod's service-account token:
//!
//! - where: `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`,
//!   trusting only the service account's `ca.crt`; `SHOAL_KUBE_API_URL`
//!   overrides the base URL (an `http://` URL needs no CA; an `https://` one
//!   uses `SHOAL_KUBE_CA_FILE`, by default the service account's `ca.crt`);
//! - who: the token in `SHOAL_KUBE_TOKEN_FILE` (default
//!   `/var/run/secrets/kubernetes.io/serviceaccount/token`), read again for
//!   every request because bound tokens rotate;
//! - which pod: `POD_NAME` in `POD_NAMESPACE` (the chart sets both from the
//!   downward API). Without them the updater does not run.
//!
//! Changes are coalesced ([`updater`]), and a failing API never touches the
//! tasks: it is counted (`shoal_kube_patch_errors_total{class}`) and logged
//! at most once a minute per class.

mod client;
mod updater;

use std::path::PathBuf;

pub use client::{CostSink, PatchError, PodPatcher};
pub use updater::{run_updater, Timing};

/// The annotation the ReplicaSet controller reads when it picks pods to
/// delete (lowest first).
pub const DELETION_COST_ANNOTATION: &str = "controller.kubernetes.io/pod-deletion-cost";

const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The deletion cost of a worker running `running` tasks: the number of
/// tasks a deletion would interrupt. Idle is 0, the lowest a worker ever
/// sets, so idle pods go first; among busy ones the least busy goes first.
pub fn deletion_cost(running: usize) -> i32 {
    i32::try_from(running).unwrap_or(i32::MAX)
}

/// The pod to annotate and how to reach the API server about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodTarget {
    /// The API server's base URL, without a trailing slash.
    pub api_url: String,
    pub namespace: String,
    pub pod: String,
    /// Read for every request.
    pub token_file: PathBuf,
    /// The only trusted root for an `https` API URL.
    pub ca_file: Option<PathBuf>,
}

/// Why the environment names no usable pod target.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TargetError {
    #[error("not in a pod: POD_NAME and POD_NAMESPACE are not both set")]
    NotInPod,
    #[error(
        "no Kubernetes API: neither SHOAL_KUBE_API_URL nor KUBERNETES_SERVICE_HOST/PORT is set"
    )]
    NoApi,
    #[error("SHOAL_KUBE_API_URL must be an http:// or https:// URL, not {0:?}")]
    BadUrl(String),
}

impl PodTarget {
    /// The target the process environment describes.
    pub fn from_env() -> Result<Self, TargetError> {
        Self::from_lookup(|key| std::env::var(key).ok())
    }

    /// The target the variables `lookup` returns describe (empty counts as
    /// unset).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, TargetError> {
        let get = |key: &str| lookup(key).filter(|v| !v.trim().is_empty());
        let (Some(pod), Some(namespace)) = (get("POD_NAME"), get("POD_NAMESPACE")) else {
            return Err(TargetError::NotInPod);
        };
        let api_url = match get("SHOAL_KUBE_API_URL") {
            Some(url) => {
                let url = url.trim().trim_end_matches('/').to_owned();
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(TargetError::BadUrl(url));
                }
                url
            }
            None => {
                let (Some(host), Some(port)) = (
                    get("KUBERNETES_SERVICE_HOST"),
                    get("KUBERNETES_SERVICE_PORT"),
                ) else {
                    return Err(TargetError::NoApi);
                };
                // An IPv6 service address needs brackets in a URL.
                if host.contains(':') {
                    format!("https://[{host}]:{port}")
                } else {
                    format!("https://{host}:{port}")
                }
            }
        };
        let token_file = get("SHOAL_KUBE_TOKEN_FILE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(SERVICE_ACCOUNT_DIR).join("token"));
        let ca_file = api_url.starts_with("https://").then(|| {
            get("SHOAL_KUBE_CA_FILE")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(SERVICE_ACCOUNT_DIR).join("ca.crt"))
        });
        Ok(Self {
            api_url,
            namespace,
            pod,
            token_file,
            ca_file,
        })
    }

    /// `/api/v1/namespaces/{namespace}/pods/{pod}` on the API server.
    pub fn pod_url(&self) -> String {
        format!(
            "{}/api/v1/namespaces/{}/pods/{}",
            self.api_url, self.namespace, self.pod
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |key| pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
    }

    #[test]
    fn in_cluster_the_service_address_and_the_service_account_are_used() {
        let target = PodTarget::from_lookup(env(&[
            ("POD_NAME", "shoal-worker-7d9-abc"),
            ("POD_NAMESPACE", "shoal"),
            ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
            ("KUBERNETES_SERVICE_PORT", "443"),
        ]))
        .expect("a target");
        assert_eq!(
            target.pod_url(),
            "https://10.96.0.1:443/api/v1/namespaces/shoal/pods/shoal-worker-7d9-abc"
        );
        assert_eq!(
            target.token_file,
            PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/token")
        );
        assert_eq!(
            target.ca_file,
            Some(PathBuf::from(
                "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
            ))
        );
    }

    #[test]
    fn an_ipv6_service_address_is_bracketed() {
        let target = PodTarget::from_lookup(env(&[
            ("POD_NAME", "p"),
            ("POD_NAMESPACE", "n"),
            ("KUBERNETES_SERVICE_HOST", "fd00::1"),
            ("KUBERNETES_SERVICE_PORT", "443"),
        ]))
        .expect("a target");
        assert_eq!(target.api_url, "https://[fd00::1]:443");
    }

    #[test]
    fn the_overrides_replace_url_token_and_ca() {
        let target = PodTarget::from_lookup(env(&[
            ("POD_NAME", "p"),
            ("POD_NAMESPACE", "n"),
            ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
            ("KUBERNETES_SERVICE_PORT", "443"),
            ("SHOAL_KUBE_API_URL", "http://127.0.0.1:8001/"),
            ("SHOAL_KUBE_TOKEN_FILE", "/tmp/token"),
        ]))
        .expect("a target");
        assert_eq!(target.api_url, "http://127.0.0.1:8001");
        assert_eq!(target.token_file, PathBuf::from("/tmp/token"));
        assert_eq!(target.ca_file, None, "plain http needs no CA");
        let https = PodTarget::from_lookup(env(&[
            ("POD_NAME", "p"),
            ("POD_NAMESPACE", "n"),
            ("SHOAL_KUBE_API_URL", "https://kube.example:6443"),
            ("SHOAL_KUBE_CA_FILE", "/tmp/ca.crt"),
        ]))
        .expect("a target");
        assert_eq!(https.ca_file, Some(PathBuf::from("/tmp/ca.crt")));
    }

    #[test]
    fn outside_a_pod_or_without_an_api_there_is_no_target() {
        assert_eq!(
            PodTarget::from_lookup(env(&[("POD_NAME", "p")])),
            Err(TargetError::NotInPod)
        );
        assert_eq!(
            PodTarget::from_lookup(env(&[("POD_NAME", "p"), ("POD_NAMESPACE", "")])),
            Err(TargetError::NotInPod)
        );
        assert_eq!(
            PodTarget::from_lookup(env(&[("POD_NAME", "p"), ("POD_NAMESPACE", "n")])),
            Err(TargetError::NoApi)
        );
        assert!(matches!(
            PodTarget::from_lookup(env(&[
                ("POD_NAME", "p"),
                ("POD_NAMESPACE", "n"),
                ("SHOAL_KUBE_API_URL", "127.0.0.1:8001"),
            ])),
            Err(TargetError::BadUrl(_))
        ));
    }

    #[test]
    fn the_cost_is_the_number_of_running_tasks() {
        assert_eq!(deletion_cost(0), 0);
        assert_eq!(deletion_cost(8), 8);
        assert_eq!(deletion_cost(usize::MAX), i32::MAX);
    }
}

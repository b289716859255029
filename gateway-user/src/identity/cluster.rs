//! Pod identities from the cluster: a watch of the pods on this node (field selector
//! `spec.nodeName=<node>`), kept in a bounded cache by pod UID.
//!
//! The cache survives API server outages: while the watch fails, known pods keep resolving and
//! are marked stale, and the watch resumes with a fresh list once the API server responds again. A
//! deleted pod stays resolvable for [`DELETED_GRACE`], so connections its containers opened
//! just before the deletion still get a name.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{WatchStreamExt as _, watcher};
use tracing::{info, warn};

/// Pods the cache keeps at most. The kubelet's default is 110 pods per node and large nodes
/// run a few hundred, so this leaves room for deleted pods within their grace period.
const MAX_PODS: usize = 4096;
/// Time a deleted pod stays in the cache.
pub const DELETED_GRACE: Duration = Duration::from_secs(600);

/// Errors starting the watch.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("failed to read kubeconfig {path}")]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error("failed to load the in-cluster configuration (is gatewayd running in a pod?)")]
    InCluster(#[source] kube::config::InClusterError),
    #[error("failed to create the Kubernetes client")]
    Client(#[source] kube::Error),
}

/// The identity of one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodIdentity {
    pub namespace: String,
    pub name: String,
    pub service_account: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub node: Option<String>,
}

#[derive(Debug)]
struct Entry {
    identity: PodIdentity,
    deleted: Option<Instant>,
}

/// Pods of this node by UID.
#[derive(Debug, Default)]
pub struct PodCache {
    pods: RwLock<HashMap<String, Entry>>,
    /// Set while the watch is failing; cleared by the next complete list.
    stale: AtomicBool,
    /// Set once the first complete list arrived.
    synced: AtomicBool,
    changed: tokio::sync::Notify,
}

impl PodCache {
    /// Returns the pod with `uid` and whether the cache is stale.
    pub fn get(&self, uid: &str) -> Option<(PodIdentity, bool)> {
        let pods = self.pods.read().ok()?;
        let entry = pods.get(uid)?;
        Some((entry.identity.clone(), self.stale.load(Ordering::Acquire)))
    }

    /// Returns the pod with `uid`, waiting up to `wait` for the watch to deliver it.
    pub async fn wait_for(&self, uid: &str, wait: Duration) -> Option<(PodIdentity, bool)> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let changed = self.changed.notified();
            if let Some(found) = self.get(uid) {
                return Some(found);
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return None;
            }
        }
    }

    pub fn is_stale(&self) -> bool {
        self.stale.load(Ordering::Acquire)
    }

    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    pub fn len(&self) -> usize {
        self.pods.read().map(|pods| pods.len()).unwrap_or_default()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn apply(&self, uid: String, identity: PodIdentity) {
        let Ok(mut pods) = self.pods.write() else {
            return;
        };
        if !pods.contains_key(&uid) && pods.len() >= MAX_PODS {
            pods.retain(|_, entry| entry.deleted.is_none_or(|at| at.elapsed() < DELETED_GRACE));
            if pods.len() >= MAX_PODS {
                warn!(max = MAX_PODS, pod = %identity.name, "pod identity cache is full; pod not cached");
                return;
            }
        }
        pods.insert(
            uid,
            Entry {
                identity,
                deleted: None,
            },
        );
        drop(pods);
        self.changed.notify_waiters();
    }

    fn delete(&self, uid: &str) {
        if let Ok(mut pods) = self.pods.write() {
            if let Some(entry) = pods.get_mut(uid) {
                entry.deleted.get_or_insert_with(Instant::now);
            }
            pods.retain(|_, entry| entry.deleted.is_none_or(|at| at.elapsed() < DELETED_GRACE));
        }
    }

    /// Replaces the live set with a complete list: pods missing from it count as deleted.
    fn relisted(&self, listed: HashMap<String, PodIdentity>) {
        if let Ok(mut pods) = self.pods.write() {
            for (uid, entry) in pods.iter_mut() {
                if !listed.contains_key(uid) {
                    entry.deleted.get_or_insert_with(Instant::now);
                }
            }
            for (uid, identity) in listed {
                pods.insert(
                    uid,
                    Entry {
                        identity,
                        deleted: None,
                    },
                );
            }
        }
        self.stale.store(false, Ordering::Release);
        self.synced.store(true, Ordering::Release);
        self.changed.notify_waiters();
    }
}

/// How to reach the API server.
#[derive(Clone, Debug)]
pub struct ClusterSettings {
    /// kubeconfig file; the in-cluster configuration when `None`.
    pub kubeconfig: Option<PathBuf>,
    /// Node whose pods are watched.
    pub node: String,
}

/// Starts watching the pods of `settings.node`; the returned cache fills as events arrive.
pub async fn start(settings: &ClusterSettings) -> Result<Arc<PodCache>, ClusterError> {
    let client = client(settings.kubeconfig.as_deref()).await?;
    let api: kube::Api<Pod> = kube::Api::all(client);
    let selector = format!("spec.nodeName={}", settings.node);
    let cache = Arc::new(PodCache::default());
    tokio::spawn(run_watch(api, selector, Arc::clone(&cache)));
    Ok(cache)
}

/// Creates a Kubernetes client from `kubeconfig`, or from the in-cluster configuration (the
/// pod's service-account token and CA) when `None`.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client, ClusterError> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|source| {
                ClusterError::Kubeconfig {
                    path: path.to_path_buf(),
                    source,
                }
            })?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(|source| ClusterError::Kubeconfig {
                    path: path.to_path_buf(),
                    source,
                })?
        }
        None => kube::Config::incluster().map_err(ClusterError::InCluster)?,
    };
    kube::Client::try_from(config).map_err(ClusterError::Client)
}

async fn run_watch(api: kube::Api<Pod>, selector: String, cache: Arc<PodCache>) {
    let stream = watcher(api, watcher::Config::default().fields(&selector)).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut listing: HashMap<String, PodIdentity> = HashMap::new();
    let mut failures: u64 = 0;
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Init) => listing.clear(),
            Ok(watcher::Event::InitApply(pod)) => {
                if let Some((uid, identity)) = identity_of(&pod) {
                    listing.insert(uid, identity);
                }
            }
            Ok(watcher::Event::InitDone) => {
                let count = listing.len();
                cache.relisted(std::mem::take(&mut listing));
                if failures > 0 {
                    info!(pods = count, after_failures = failures, "pod watch resumed");
                } else {
                    info!(pods = count, selector = %selector, "pod identities listed");
                }
                failures = 0;
            }
            Ok(watcher::Event::Apply(pod)) => {
                if let Some((uid, identity)) = identity_of(&pod) {
                    cache.apply(uid, identity);
                }
            }
            Ok(watcher::Event::Delete(pod)) => {
                if let Some(uid) = pod.metadata.uid.as_deref() {
                    cache.delete(uid);
                }
            }
            Err(error) => {
                failures += 1;
                cache.stale.store(true, Ordering::Release);
                if failures.is_power_of_two() {
                    warn!(%error, consecutive_failures = failures, "pod watch failed; known pod identities are kept and marked stale");
                }
            }
        }
    }
    warn!("pod watch ended");
}

fn identity_of(pod: &Pod) -> Option<(String, PodIdentity)> {
    let metadata = &pod.metadata;
    let uid = metadata.uid.clone()?;
    let spec = pod.spec.as_ref();
    Some((
        uid,
        PodIdentity {
            namespace: metadata.namespace.clone().unwrap_or_default(),
            name: metadata.name.clone().unwrap_or_default(),
            service_account: spec.and_then(|spec| spec.service_account_name.clone()),
            labels: metadata.labels.clone().unwrap_or_default(),
            node: spec.and_then(|spec| spec.node_name.clone()),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str) -> PodIdentity {
        PodIdentity {
            namespace: "payments".into(),
            name: name.into(),
            service_account: Some("api".into()),
            labels: BTreeMap::new(),
            node: Some("node-a".into()),
        }
    }

    #[tokio::test]
    async fn waiter_sees_pod_applied_later() {
        let cache = Arc::new(PodCache::default());
        let writer = Arc::clone(&cache);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            writer.apply("uid-1".into(), pod("api-0"));
        });
        let found = cache.wait_for("uid-1", Duration::from_secs(5)).await;
        assert_eq!(
            found.map(|(identity, _)| identity.name),
            Some("api-0".into())
        );
        assert!(
            cache
                .wait_for("uid-2", Duration::from_millis(20))
                .await
                .is_none()
        );
    }

    #[test]
    fn relist_keeps_deleted_pods_for_grace() {
        let cache = PodCache::default();
        cache.apply("uid-1".into(), pod("api-0"));
        cache.relisted(HashMap::from([("uid-2".to_string(), pod("api-1"))]));
        assert!(
            cache.get("uid-1").is_some(),
            "a vanished pod stays for its grace period"
        );
        assert!(cache.get("uid-2").is_some());
        assert!(cache.is_synced());
    }
}

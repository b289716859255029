//! The in-memory object store: objects as JSON values keyed by resource, namespace and name,
//! one cluster-wide `resourceVersion` counter, and a bounded event history that watches
//! replay from before they follow the live broadcast.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Arc, Mutex},
};

use serde_json::{Value, json};
use tokio::sync::broadcast;

use super::status::ApiError;

/// Events kept for watches that start from an older `resourceVersion`. A watch from before
/// the oldest kept event gets 410 Gone, as from a real server after etcd compaction.
const HISTORY_LIMIT: usize = 4096;
/// Live events buffered per watcher before it is cut off as too slow.
const BROADCAST_CAPACITY: usize = 4096;

/// A core/v1 resource the server serves.
#[derive(Debug, PartialEq, Eq)]
pub struct Resource {
    /// Plural name, as in URLs.
    /// API group; empty for the core group (`/api/v1`).
    pub group: &'static str,
    pub name: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
}

/// The resources served: core `v1`, and `discovery.k8s.io/v1` for EndpointSlices.
pub const RESOURCES: &[Resource] = &[
    Resource {
        group: "",
        name: "pods",
        singular: "pod",
        kind: "Pod",
        namespaced: true,
        short_names: &["po"],
    },
    Resource {
        group: "",
        name: "configmaps",
        singular: "configmap",
        kind: "ConfigMap",
        namespaced: true,
        short_names: &["cm"],
    },
    Resource {
        group: "",
        name: "secrets",
        singular: "secret",
        kind: "Secret",
        namespaced: true,
        short_names: &[],
    },
    Resource {
        group: "",
        name: "serviceaccounts",
        singular: "serviceaccount",
        kind: "ServiceAccount",
        namespaced: true,
        short_names: &["sa"],
    },
    Resource {
        group: "",
        name: "namespaces",
        singular: "namespace",
        kind: "Namespace",
        namespaced: false,
        short_names: &["ns"],
    },
    Resource {
        group: "",
        name: "services",
        singular: "service",
        kind: "Service",
        namespaced: true,
        short_names: &["svc"],
    },
    Resource {
        group: DISCOVERY_GROUP,
        name: "endpointslices",
        singular: "endpointslice",
        kind: "EndpointSlice",
        namespaced: true,
        short_names: &[],
    },
];

/// The group of EndpointSlices.
pub const DISCOVERY_GROUP: &str = "discovery.k8s.io";

impl Resource {
    /// Returns the `apiVersion` of this resource's objects: `v1` or `GROUP/v1`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            "v1".to_string()
        } else {
            format!("{}/v1", self.group)
        }
    }
}

/// Looks up a resource by its plural name.
pub fn resource(name: &str) -> Option<&'static Resource> {
    resource_in("", name)
}

/// Finds the resource `name` of API group `group` (empty for the core group).
pub fn resource_in(group: &str, name: &str) -> Option<&'static Resource> {
    RESOURCES
        .iter()
        .find(|resource| resource.group == group && resource.name == name)
}

/// Kind of a watch event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One change to one object.
#[derive(Debug)]
pub struct Event {
    pub event_type: EventType,
    pub resource: &'static Resource,
    pub namespace: String,
    pub resource_version: u64,
    /// The object after the change; for a deletion, the last state with the new version.
    pub object: Value,
}

type Key = (&'static str, String, String);

#[derive(Debug, Default)]
struct Inner {
    resource_version: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Arc<Event>>,
}

/// The cluster state.
#[derive(Debug)]
pub struct Store {
    inner: Mutex<Inner>,
    events: broadcast::Sender<Arc<Event>>,
}

/// The start of a new watch: the recorded events it missed, then the live ones.
#[derive(Debug)]
pub struct Subscription {
    /// For a watch from now: the objects of the watched resource at the start, taken under
    /// the same lock as the subscription, so that no change is lost or sent twice.
    pub snapshot: Vec<Value>,
    pub backlog: Vec<Arc<Event>>,
    pub live: broadcast::Receiver<Arc<Event>>,
    /// The store's version when the watch started, for the first BOOKMARK.
    pub resource_version: u64,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    /// Creates a store holding the namespaces every cluster has.
    pub fn new() -> Self {
        let store = Self {
            inner: Mutex::new(Inner::default()),
            events: broadcast::channel(BROADCAST_CAPACITY).0,
        };
        for namespace in ["default", "kube-system", "kube-public"] {
            store
                .create(
                    resource("namespaces").expect("namespaces is served"),
                    "",
                    json!({"metadata": {"name": namespace}}),
                )
                .expect("a fresh store accepts the built-in namespaces");
        }
        store
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Returns the current `resourceVersion`.
    pub fn resource_version(&self) -> u64 {
        self.lock().resource_version
    }

    pub fn get(
        &self,
        resource: &'static Resource,
        namespace: &str,
        name: &str,
    ) -> Result<Value, ApiError> {
        self.lock()
            .objects
            .get(&(resource.name, namespace.to_string(), name.to_string()))
            .cloned()
            .ok_or_else(|| ApiError::not_found(resource, name))
    }

    /// Lists the objects of `resource`, in one namespace or (with `None`) in all, sorted by
    /// namespace and name, with the store's version at the time.
    pub fn list(
        &self,
        resource: &'static Resource,
        namespace: Option<&str>,
        filter: impl Fn(&Value) -> bool,
    ) -> (Vec<Value>, u64) {
        let inner = self.lock();
        let items = inner
            .objects
            .iter()
            .filter(|((kind, object_namespace, _), _)| {
                *kind == resource.name && namespace.is_none_or(|ns| ns == object_namespace)
            })
            .map(|(_, object)| object)
            .filter(|object| filter(object))
            .cloned()
            .collect();
        (items, inner.resource_version)
    }

    /// Stores a new object, filling in the metadata the server owns and the defaults of its
    /// kind.
    pub fn create(
        &self,
        resource: &'static Resource,
        namespace: &str,
        object: Value,
    ) -> Result<Value, ApiError> {
        self.create_with_uid(resource, namespace, object, None)
    }

    /// Stores a new object like [`create`](Self::create), with the UID `uid` when given
    /// instead of a new one. Seed objects use it, so that a pod's tokens and cgroup name the
    /// UID that watchers see in the ADDED event.
    pub fn create_with_uid(
        &self,
        resource: &'static Resource,
        namespace: &str,
        mut object: Value,
        uid: Option<String>,
    ) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let name = object_name(resource, &object, inner.resource_version + 1)?;
        if resource.namespaced
            && !inner
                .objects
                .contains_key(&("namespaces", String::new(), namespace.to_string()))
        {
            return Err(ApiError::not_found(
                self::resource("namespaces").expect("namespaces is served"),
                namespace,
            ));
        }
        let key = (resource.name, namespace.to_string(), name.clone());
        if inner.objects.contains_key(&key) {
            return Err(ApiError::already_exists(resource, &name));
        }

        inner.resource_version += 1;
        let version = inner.resource_version;
        let metadata = metadata_mut(&mut object);
        metadata.insert("name".into(), json!(name));
        metadata.remove("generateName");
        if resource.namespaced {
            metadata.insert("namespace".into(), json!(namespace));
        } else {
            metadata.remove("namespace");
        }
        let uid = uid.unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        metadata.insert("uid".into(), json!(uid));
        metadata.insert("resourceVersion".into(), json!(version.to_string()));
        metadata.insert("creationTimestamp".into(), json!(now_rfc3339()));
        apply_defaults(resource, &name, &mut object)?;
        set_type_meta(resource, &mut object);

        inner.objects.insert(key, object.clone());
        self.publish(&mut inner, EventType::Added, resource, namespace, &object);
        Ok(object)
    }

    /// Replaces an object. A `resourceVersion` in the new object must match the stored one.
    pub fn update(
        &self,
        resource: &'static Resource,
        namespace: &str,
        name: &str,
        mut object: Value,
    ) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let key = (resource.name, namespace.to_string(), name.to_string());
        let Some(current) = inner.objects.get(&key) else {
            return Err(ApiError::not_found(resource, name));
        };
        let given_name = object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or(name);
        if given_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({given_name}) does not match the name on the URL ({name})"
            )));
        }
        let current_version = current.pointer("/metadata/resourceVersion").cloned();
        if let Some(given) = object.pointer("/metadata/resourceVersion")
            && !given.is_null()
            && Some(given) != current_version.as_ref()
        {
            return Err(ApiError::conflict(
                resource,
                name,
                "the object has been modified; please apply your changes to the latest version and try again",
            ));
        }
        let preserved: Vec<(String, Value)> = ["uid", "creationTimestamp"]
            .iter()
            .filter_map(|field| {
                current
                    .pointer(&format!("/metadata/{field}"))
                    .map(|value| (field.to_string(), value.clone()))
            })
            .collect();

        inner.resource_version += 1;
        let version = inner.resource_version;
        let metadata = metadata_mut(&mut object);
        for (field, value) in preserved {
            metadata.insert(field, value);
        }
        metadata.insert("name".into(), json!(name));
        if resource.namespaced {
            metadata.insert("namespace".into(), json!(namespace));
        }
        metadata.insert("resourceVersion".into(), json!(version.to_string()));
        apply_defaults(resource, name, &mut object)?;
        set_type_meta(resource, &mut object);

        inner.objects.insert(key, object.clone());
        self.publish(
            &mut inner,
            EventType::Modified,
            resource,
            namespace,
            &object,
        );
        Ok(object)
    }

    /// Removes an object and returns its last state. Deleting a namespace removes its
    /// objects at once; a real server finalizes it in the background instead.
    pub fn delete(
        &self,
        resource: &'static Resource,
        namespace: &str,
        name: &str,
    ) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let key = (resource.name, namespace.to_string(), name.to_string());
        let Some(object) = inner.objects.remove(&key) else {
            return Err(ApiError::not_found(resource, name));
        };
        self.remove_with_event(&mut inner, resource, namespace, object.clone());

        if resource.name == "namespaces" {
            let contained: Vec<Key> = inner
                .objects
                .keys()
                .filter(|(_, object_namespace, _)| object_namespace == name)
                .cloned()
                .collect();
            for key in contained {
                let kind = RESOURCES
                    .iter()
                    .find(|candidate| candidate.name == key.0)
                    .expect("stored objects are of served resources");
                if let Some(child) = inner.objects.remove(&key) {
                    self.remove_with_event(&mut inner, kind, name, child);
                }
            }
        }
        Ok(object)
    }

    fn remove_with_event(
        &self,
        inner: &mut Inner,
        resource: &'static Resource,
        namespace: &str,
        mut object: Value,
    ) {
        inner.resource_version += 1;
        let version = inner.resource_version;
        metadata_mut(&mut object).insert("resourceVersion".into(), json!(version.to_string()));
        self.publish(inner, EventType::Deleted, resource, namespace, &object);
    }

    fn publish(
        &self,
        inner: &mut Inner,
        event_type: EventType,
        resource: &'static Resource,
        namespace: &str,
        object: &Value,
    ) {
        let event = Arc::new(Event {
            event_type,
            resource,
            namespace: namespace.to_string(),
            resource_version: inner.resource_version,
            object: object.clone(),
        });
        if inner.history.len() == HISTORY_LIMIT {
            inner.history.pop_front();
        }
        inner.history.push_back(event.clone());
        // A send without receivers fails, which is normal while no watch is open.
        let _ = self.events.send(event);
    }

    /// Starts a watch from `since` (exclusive): events after it that are still in the
    /// history come first. `None` starts from now with a snapshot of `resource`, which the
    /// caller sends as ADDED events, as for `resourceVersion` unset or "0".
    pub fn watch(
        &self,
        since: Option<u64>,
        resource: &'static Resource,
    ) -> Result<Subscription, ApiError> {
        let inner = self.lock();
        let live = self.events.subscribe();
        let snapshot = match since {
            None => inner
                .objects
                .iter()
                .filter(|((kind, _, _), _)| *kind == resource.name)
                .map(|(_, object)| object.clone())
                .collect(),
            Some(_) => Vec::new(),
        };
        let backlog = match since {
            None => Vec::new(),
            Some(version) => {
                let oldest = inner
                    .history
                    .front()
                    .map_or(inner.resource_version + 1, |event| event.resource_version);
                if version + 1 < oldest {
                    return Err(ApiError::gone(format!(
                        "too old resource version: {version} ({})",
                        oldest - 1
                    )));
                }
                inner
                    .history
                    .iter()
                    .filter(|event| event.resource_version > version)
                    .cloned()
                    .collect()
            }
        };
        Ok(Subscription {
            snapshot,
            backlog,
            live,
            resource_version: inner.resource_version,
        })
    }
}

fn metadata_mut(object: &mut Value) -> &mut serde_json::Map<String, Value> {
    if !object.is_object() {
        *object = json!({});
    }
    let map = object.as_object_mut().expect("made an object above");
    let metadata = map.entry("metadata").or_insert_with(|| json!({}));
    if !metadata.is_object() {
        *metadata = json!({});
    }
    metadata.as_object_mut().expect("made an object above")
}

fn set_type_meta(resource: &Resource, object: &mut Value) {
    if let Some(map) = object.as_object_mut() {
        map.insert("kind".into(), json!(resource.kind));
        map.insert("apiVersion".into(), json!(resource.api_version()));
    }
}

/// Finds the name of a new object: `metadata.name`, or `metadata.generateName` plus a suffix.
fn object_name(resource: &Resource, object: &Value, serial: u64) -> Result<String, ApiError> {
    let name = object.pointer("/metadata/name").and_then(Value::as_str);
    let generate = object
        .pointer("/metadata/generateName")
        .and_then(Value::as_str);
    let name = match (name, generate) {
        (Some(name), _) if !name.is_empty() => name.to_string(),
        (_, Some(prefix)) if !prefix.is_empty() => format!("{prefix}{:05x}", serial & 0xfffff),
        _ => {
            return Err(ApiError::invalid(
                resource,
                "",
                "metadata.name: Required value: name or generateName is required",
            ));
        }
    };
    if !is_dns_subdomain(&name) {
        return Err(ApiError::invalid(
            resource,
            &name,
            &format!(
                "metadata.name: Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
            ),
        ));
    }
    Ok(name)
}

/// Checks an RFC 1123 subdomain: at most 253 characters of `[a-z0-9.-]`, alphanumeric at
/// both ends.
pub fn is_dns_subdomain(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 253
        && bytes
            .iter()
            .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
}

/// Fills in what the real server's defaulting, admission and controllers would have set by
/// the time a client reads the object back.
fn apply_defaults(resource: &Resource, name: &str, object: &mut Value) -> Result<(), ApiError> {
    let map = object.as_object_mut().expect("metadata_mut made an object");
    match resource.name {
        "namespaces" => {
            map.insert("spec".into(), json!({"finalizers": ["kubernetes"]}));
            map.insert("status".into(), json!({"phase": "Active"}));
            let labels = map
                .get_mut("metadata")
                .and_then(Value::as_object_mut)
                .expect("metadata is an object")
                .entry("labels")
                .or_insert_with(|| json!({}));
            if let Some(labels) = labels.as_object_mut() {
                labels.insert("kubernetes.io/metadata.name".into(), json!(name));
            }
        }
        "secrets" => {
            if map
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .is_empty()
            {
                map.insert("type".into(), json!("Opaque"));
            }
            if let Some(Value::Object(string_data)) = map.remove("stringData") {
                let data = map.entry("data").or_insert_with(|| json!({}));
                let Some(data) = data.as_object_mut() else {
                    return Err(ApiError::bad_request("data: must be an object".to_string()));
                };
                for (key, value) in string_data {
                    let text = value.as_str().unwrap_or_default();
                    data.insert(
                        key,
                        json!(base64::Engine::encode(
                            &base64::engine::general_purpose::STANDARD,
                            text
                        )),
                    );
                }
            }
        }
        "pods" => {
            // NOTE: no scheduler or kubelet runs here, so every pod is Running and Ready at
            // once, on the node `test-node`.
            let containers: Vec<Value> = map
                .get("spec")
                .and_then(|spec| spec.get("containers"))
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if containers.is_empty() {
                return Err(ApiError::invalid(
                    self::resource("pods").expect("pods is served"),
                    name,
                    "spec.containers: Required value",
                ));
            }
            let spec = map.entry("spec").or_insert_with(|| json!({}));
            if let Some(spec) = spec.as_object_mut() {
                spec.entry("serviceAccountName")
                    .or_insert_with(|| json!("default"));
                spec.entry("nodeName").or_insert_with(|| json!("test-node"));
                spec.entry("restartPolicy")
                    .or_insert_with(|| json!("Always"));
            }
            let statuses: Vec<Value> = containers
                .iter()
                .map(|container| {
                    json!({
                        "name": container.get("name").cloned().unwrap_or(json!("main")),
                        "image": container.get("image").cloned().unwrap_or(json!("")),
                        "ready": true,
                        "started": true,
                        "restartCount": 0,
                        "state": {"running": {"startedAt": now_rfc3339()}},
                    })
                })
                .collect();
            map.entry("status").or_insert_with(|| {
                json!({
                    "phase": "Running",
                    "conditions": [{"type": "Ready", "status": "True"}],
                    "containerStatuses": statuses,
                    "startTime": now_rfc3339(),
                })
            });
        }
        _ => {}
    }
    Ok(())
}

/// Formats the current time the way `metav1.Time` serializes: RFC 3339, whole seconds, UTC.
pub fn now_rfc3339() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn configmaps() -> &'static Resource {
        resource("configmaps").expect("served")
    }

    #[test]
    fn create_twice_is_already_exists() {
        let store = Store::new();
        let object = json!({"metadata": {"name": "a"}, "data": {"k": "v"}});
        store
            .create(configmaps(), "default", object.clone())
            .expect("first create");
        let error = store
            .create(configmaps(), "default", object)
            .expect_err("second create");
        assert_eq!(error.code, 409);
        assert_eq!(error.reason, "AlreadyExists");
    }

    #[test]
    fn create_in_missing_namespace_is_not_found() {
        let store = Store::new();
        let error = store
            .create(configmaps(), "nowhere", json!({"metadata": {"name": "a"}}))
            .expect_err("no namespace");
        assert_eq!(error.code, 404);
        assert_eq!(error.message, "namespaces \"nowhere\" not found");
    }

    #[test]
    fn watch_replays_events_after_version() {
        let store = Store::new();
        let first = store
            .create(configmaps(), "default", json!({"metadata": {"name": "a"}}))
            .expect("create a");
        let version: u64 = first["metadata"]["resourceVersion"]
            .as_str()
            .expect("version")
            .parse()
            .expect("number");
        store
            .create(configmaps(), "default", json!({"metadata": {"name": "b"}}))
            .expect("create b");
        let subscription = store.watch(Some(version), configmaps()).expect("watch");
        assert_eq!(subscription.backlog.len(), 1);
        assert_eq!(subscription.backlog[0].object["metadata"]["name"], "b");
    }

    #[test]
    fn update_with_stale_version_conflicts() {
        let store = Store::new();
        store
            .create(configmaps(), "default", json!({"metadata": {"name": "a"}}))
            .expect("create");
        let error = store
            .update(
                configmaps(),
                "default",
                "a",
                json!({"metadata": {"name": "a", "resourceVersion": "1"}}),
            )
            .expect_err("stale");
        assert_eq!(error.code, 409);
        assert_eq!(error.reason, "Conflict");
    }
}

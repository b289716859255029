//! Targets named by a Service: for each `service:` target of the configuration, a watch of the
//! Service and of its EndpointSlices keeps the Service's cluster IPs and its endpoints'
//! addresses in the redirect's `TARGETS` map.
//!
//! Both kinds of address are redirected because a kube-proxy replacement (Cilium, for one)
//! may already have rewritten a connect to a cluster IP into one to an endpoint before the
//! gateway's hook runs. The Service port is the configured `port`; the endpoints are matched
//! through that port's name, as kube-proxy matches them. While the API server cannot be
//! reached the last addresses stay in the map, and a Service that is deleted loses them.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use futures_util::{StreamExt as _, stream};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::runtime::{WatchStreamExt as _, watcher};
use tracing::{info, warn};

use crate::{
    config::{Config, ServiceRef, TargetClass},
    redirect::Redirect,
};

/// The label that ties an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Starts one watch per Service target of `config`. Returns how many were started.
pub fn start(config: &Config, client: &kube::Client, redirect: &Arc<Redirect>) -> usize {
    let mut started = 0;
    for (index, target) in config.targets.iter().enumerate() {
        let Some(service) = target.service.clone() else {
            continue;
        };
        let follow = Follow {
            target_id: index as u32,
            class: target.class,
            port: target.port,
            service,
            proxy: config.proxy.clone(),
        };
        tokio::spawn(follow.run(client.clone(), Arc::clone(redirect)));
        started += 1;
    }
    started
}

/// One Service target being followed.
struct Follow {
    target_id: u32,
    class: TargetClass,
    port: u16,
    service: ServiceRef,
    proxy: crate::config::ProxyConfig,
}

/// An event of either watch.
enum Change {
    Service(Box<watcher::Result<watcher::Event<Service>>>),
    Slice(Box<watcher::Result<watcher::Event<EndpointSlice>>>),
}

/// The objects of one Service target as last listed and watched.
#[derive(Default)]
struct Seen {
    service: Option<Service>,
    slices: BTreeMap<String, EndpointSlice>,
    /// Objects of a list in progress, swapped in when it is complete.
    listing_services: Option<Vec<Service>>,
    listing_slices: Option<BTreeMap<String, EndpointSlice>>,
    /// Whether each watch has delivered one complete list.
    services_listed: bool,
    slices_listed: bool,
}

impl Follow {
    async fn run(self, client: kube::Client, redirect: Arc<Redirect>) {
        let namespace = &self.service.namespace;
        let services: kube::Api<Service> = kube::Api::namespaced(client.clone(), namespace);
        let slices: kube::Api<EndpointSlice> = kube::Api::namespaced(client, namespace);
        let service_config =
            watcher::Config::default().fields(&format!("metadata.name={}", self.service.name));
        let slice_config = watcher::Config::default()
            .labels(&format!("{SERVICE_NAME_LABEL}={}", self.service.name));
        let changes = stream::select(
            watcher(services, service_config)
                .default_backoff()
                .map(|event| Change::Service(Box::new(event))),
            watcher(slices, slice_config)
                .default_backoff()
                .map(|event| Change::Slice(Box::new(event))),
        );
        let mut changes = std::pin::pin!(changes);

        let mut seen = Seen::default();
        let mut current: Option<BTreeSet<SocketAddr>> = None;
        let mut failures: u64 = 0;
        while let Some(change) = changes.next().await {
            match seen.apply(change) {
                Ok(()) => failures = 0,
                Err(error) => {
                    failures += 1;
                    if failures.is_power_of_two() {
                        warn!(service = %self.service, %error, consecutive_failures = failures, "Service watch failed; its last addresses stay redirected");
                    }
                    continue;
                }
            }
            if !(seen.services_listed && seen.slices_listed) {
                continue;
            }
            let addresses = self.addresses(&seen);
            if current.as_ref() == Some(&addresses) {
                continue;
            }
            let list: Vec<SocketAddr> = addresses.iter().copied().collect();
            match redirect.set_service_addresses(self.target_id, self.class, &list) {
                Ok(()) => {
                    info!(service = %self.service, port = self.port, addresses = ?list, "Service target addresses updated");
                    current = Some(addresses);
                }
                Err(error) => {
                    warn!(service = %self.service, error = %crate::error_chain(&error), "failed to update the targets map; retrying on the next change");
                }
            }
        }
        warn!(service = %self.service, "Service watch ended");
    }

    /// Returns the addresses to redirect for what `seen` holds, leaving out those the proxy
    /// cannot take (a family it does not listen on, its own address).
    fn addresses(&self, seen: &Seen) -> BTreeSet<SocketAddr> {
        let found = service_addresses(seen.service.as_ref(), seen.slices.values(), self.port);
        found
            .into_iter()
            .filter(|addr| {
                let usable = crate::config::check_target_address(&self.proxy, *addr);
                if let Err(problem) = &usable {
                    warn!(service = %self.service, %addr, problem, "Service address not redirected");
                }
                usable.is_ok()
            })
            .collect()
    }
}

impl Seen {
    fn apply(&mut self, change: Change) -> Result<(), watcher::Error> {
        match change {
            Change::Service(event) => match (*event)? {
                watcher::Event::Init => self.listing_services = Some(Vec::new()),
                watcher::Event::InitApply(service) => {
                    self.listing_services.get_or_insert_default().push(service);
                }
                watcher::Event::InitDone => {
                    self.service = self.listing_services.take().unwrap_or_default().pop();
                    self.services_listed = true;
                }
                watcher::Event::Apply(service) => self.service = Some(service),
                watcher::Event::Delete(_) => self.service = None,
            },
            Change::Slice(event) => match (*event)? {
                watcher::Event::Init => self.listing_slices = Some(BTreeMap::new()),
                watcher::Event::InitApply(slice) => {
                    let name = slice.metadata.name.clone().unwrap_or_default();
                    self.listing_slices
                        .get_or_insert_default()
                        .insert(name, slice);
                }
                watcher::Event::InitDone => {
                    self.slices = self.listing_slices.take().unwrap_or_default();
                    self.slices_listed = true;
                }
                watcher::Event::Apply(slice) => {
                    let name = slice.metadata.name.clone().unwrap_or_default();
                    self.slices.insert(name, slice);
                }
                watcher::Event::Delete(slice) => {
                    self.slices.remove(&slice.metadata.name.unwrap_or_default());
                }
            },
        }
        Ok(())
    }
}

/// Collects the addresses a connect to Service port `port` can go to: the Service's cluster
/// IPs with `port`, and each endpoint address of `slices` with the endpoint port whose name
/// matches the Service port's name. A Service without that port, or without a spec, has none.
pub fn service_addresses<'a>(
    service: Option<&Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    port: u16,
) -> BTreeSet<SocketAddr> {
    let mut addresses = BTreeSet::new();
    let Some(spec) = service.and_then(|service| service.spec.as_ref()) else {
        return addresses;
    };
    let Some(service_port) = spec.ports.iter().flatten().find(|candidate| {
        candidate.port == i32::from(port) && is_tcp(candidate.protocol.as_deref())
    }) else {
        return addresses;
    };
    let port_name = service_port.name.clone().unwrap_or_default();

    let mut cluster_ips: Vec<&String> = spec.cluster_ips.iter().flatten().collect();
    if cluster_ips.is_empty() {
        cluster_ips.extend(spec.cluster_ip.as_ref());
    }
    for ip in cluster_ips {
        if let Ok(ip) = ip.parse::<IpAddr>() {
            addresses.insert(SocketAddr::new(ip, port));
        }
    }

    for slice in slices {
        let endpoint_port = slice.ports.iter().flatten().find(|candidate| {
            candidate.name.clone().unwrap_or_default() == port_name
                && is_tcp(candidate.protocol.as_deref())
        });
        let Some(number) = endpoint_port
            .and_then(|candidate| candidate.port)
            .and_then(|number| u16::try_from(number).ok())
        else {
            continue;
        };
        for endpoint in &slice.endpoints {
            for address in &endpoint.addresses {
                if let Ok(ip) = address.parse::<IpAddr>() {
                    addresses.insert(SocketAddr::new(ip, number));
                }
            }
        }
    }
    addresses
}

/// Tells whether a Service or endpoint port's protocol is TCP, the default when unset.
fn is_tcp(protocol: Option<&str>) -> bool {
    protocol.is_none_or(|protocol| protocol == "TCP")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(ports: serde_json::Value, cluster_ips: &[&str]) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": "db", "namespace": "payments" },
            "spec": {
                "clusterIP": cluster_ips.first(),
                "clusterIPs": cluster_ips,
                "ports": ports,
            },
        }))
        .expect("valid Service")
    }

    fn slice(name: &str, ports: serde_json::Value, addresses: &[&str]) -> EndpointSlice {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": name,
                "namespace": "payments",
                "labels": { SERVICE_NAME_LABEL: "db" },
            },
            "addressType": "IPv4",
            "ports": ports,
            "endpoints": addresses
                .iter()
                .map(|address| serde_json::json!({ "addresses": [address] }))
                .collect::<Vec<_>>(),
        }))
        .expect("valid EndpointSlice")
    }

    fn addrs(list: &[&str]) -> BTreeSet<SocketAddr> {
        list.iter()
            .map(|text| text.parse().expect("socket address"))
            .collect()
    }

    #[test]
    fn cluster_ips_and_named_endpoints() {
        let service = service(
            serde_json::json!([
                { "name": "sql", "port": 5432, "targetPort": 15432 },
                { "name": "metrics", "port": 9187 },
            ]),
            &["10.96.0.20", "fd00:96::20"],
        );
        let slices = [
            slice(
                "db-a",
                serde_json::json!([{ "name": "sql", "port": 15432 }, { "name": "metrics", "port": 9187 }]),
                &["10.244.1.7", "10.244.2.9"],
            ),
            slice(
                "db-b",
                serde_json::json!([{ "name": "sql", "port": 15432 }]),
                &["10.244.3.4"],
            ),
        ];
        assert_eq!(
            service_addresses(Some(&service), &slices, 5432),
            addrs(&[
                "10.96.0.20:5432",
                "[fd00:96::20]:5432",
                "10.244.1.7:15432",
                "10.244.2.9:15432",
                "10.244.3.4:15432",
            ])
        );
    }

    #[test]
    fn unnamed_port_matches_unnamed_endpoint_port() {
        let service = service(
            serde_json::json!([{ "port": 443, "targetPort": 6443 }]),
            &["10.96.0.1"],
        );
        let slices = [slice(
            "kubernetes",
            serde_json::json!([{ "name": "", "port": 6443 }]),
            &["172.18.0.2"],
        )];
        assert_eq!(
            service_addresses(Some(&service), &slices, 443),
            addrs(&["10.96.0.1:443", "172.18.0.2:6443"])
        );
    }

    #[test]
    fn missing_service_or_port_has_no_addresses() {
        let slices = [slice(
            "db-a",
            serde_json::json!([{ "name": "sql", "port": 15432 }]),
            &["10.244.1.7"],
        )];
        assert!(service_addresses(None, &slices, 5432).is_empty());
        let other_port = service(
            serde_json::json!([{ "name": "sql", "port": 5433 }]),
            &["10.96.0.20"],
        );
        assert!(service_addresses(Some(&other_port), &slices, 5432).is_empty());
        let udp = service(
            serde_json::json!([{ "name": "sql", "port": 5432, "protocol": "UDP" }]),
            &["10.96.0.20"],
        );
        assert!(service_addresses(Some(&udp), &slices, 5432).is_empty());
    }

    #[test]
    fn headless_service_keeps_endpoints_only() {
        let service = service(
            serde_json::json!([{ "name": "sql", "port": 5432 }]),
            &["None"],
        );
        let slices = [slice(
            "db-a",
            serde_json::json!([{ "name": "sql", "port": 5432 }]),
            &["10.244.1.7"],
        )];
        assert_eq!(
            service_addresses(Some(&service), &slices, 5432),
            addrs(&["10.244.1.7:5432"])
        );
    }
}

//! `meta.k8s.io/v1` Table responses, which kubectl requests on `get` and prints as is: the
//! server chooses the columns and formats the cells, as the real server's printers do.

use serde_json::{Value, json};

use super::store::Resource;

/// Builds the column definitions of `resource`'s table.
pub fn columns(resource: &Resource) -> Value {
    let names: &[(&str, &str)] = match resource.name {
        "pods" => &[
            ("Name", "name"),
            ("Ready", ""),
            ("Status", ""),
            ("Restarts", ""),
            ("Age", ""),
        ],
        "configmaps" | "serviceaccounts" => &[("Name", "name"), ("Data", ""), ("Age", "")],
        "secrets" => &[("Name", "name"), ("Type", ""), ("Data", ""), ("Age", "")],
        "namespaces" => &[("Name", "name"), ("Status", ""), ("Age", "")],
        _ => &[("Name", "name"), ("Age", "")],
    };
    Value::Array(
        names
            .iter()
            .map(|(name, format)| {
                let column_type = if matches!(*name, "Data" | "Restarts") {
                    "integer"
                } else {
                    "string"
                };
                json!({
                    "name": name,
                    "type": column_type,
                    "format": format,
                    "description": "",
                    "priority": 0,
                })
            })
            .collect(),
    )
}

/// Builds one row: the cells and, as `includeObject=Metadata` (the default) requests, the
/// object's metadata as a PartialObjectMetadata.
pub fn row(resource: &Resource, object: &Value) -> Value {
    let name = object
        .pointer("/metadata/name")
        .cloned()
        .unwrap_or(json!(""));
    let age = json!(age(object));
    let count = |field: &str| {
        json!(
            object
                .get(field)
                .and_then(Value::as_object)
                .map_or(0, |map| map.len())
        )
    };
    let cells = match resource.name {
        "pods" => {
            let statuses = object
                .pointer("/status/containerStatuses")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let ready = statuses
                .iter()
                .filter(|status| status.get("ready") == Some(&json!(true)))
                .count();
            let restarts: i64 = statuses
                .iter()
                .filter_map(|status| status.get("restartCount").and_then(Value::as_i64))
                .sum();
            let phase = object
                .pointer("/status/phase")
                .cloned()
                .unwrap_or(json!("Pending"));
            json!([
                name,
                format!("{ready}/{}", statuses.len()),
                phase,
                restarts,
                age
            ])
        }
        "configmaps" => {
            let data = object
                .get("data")
                .and_then(Value::as_object)
                .map_or(0, |m| m.len())
                + object
                    .get("binaryData")
                    .and_then(Value::as_object)
                    .map_or(0, |m| m.len());
            json!([name, data, age])
        }
        "serviceaccounts" => json!([name, count("secrets"), age]),
        "secrets" => {
            let secret_type = object.get("type").cloned().unwrap_or(json!("Opaque"));
            json!([name, secret_type, count("data"), age])
        }
        "namespaces" => {
            let phase = object
                .pointer("/status/phase")
                .cloned()
                .unwrap_or(json!("Active"));
            json!([name, phase, age])
        }
        _ => json!([name, age]),
    };
    json!({
        "cells": cells,
        "object": {
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": object.get("metadata").cloned().unwrap_or(json!({})),
        },
    })
}

/// Builds a Table; `with_columns` is false for watch events after the first, as the real
/// server leaves the definitions out there.
pub fn table(
    resource: &Resource,
    objects: &[Value],
    resource_version: u64,
    with_columns: bool,
) -> Value {
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version.to_string()},
        "columnDefinitions": if with_columns { columns(resource) } else { json!([]) },
        "rows": objects.iter().map(|object| row(resource, object)).collect::<Vec<_>>(),
    })
}

/// Formats the object's age the way kubectl's `HumanDuration` does in its common ranges:
/// seconds below two minutes, then minutes, hours and days.
fn age(object: &Value) -> String {
    let Some(created) = object
        .pointer("/metadata/creationTimestamp")
        .and_then(Value::as_str)
        .and_then(|text| chrono::DateTime::parse_from_rfc3339(text).ok())
    else {
        return "<unknown>".to_string();
    };
    let seconds = (chrono::Utc::now() - created.with_timezone(&chrono::Utc))
        .num_seconds()
        .max(0);
    match seconds {
        0..120 => format!("{seconds}s"),
        120..7200 => format!("{}m", seconds / 60),
        7200..172_800 => format!("{}h", seconds / 3600),
        _ => format!("{}d", seconds / 86_400),
    }
}

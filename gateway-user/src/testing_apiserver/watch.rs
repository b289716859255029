//! Watch responses: the current state or the missed history first, then live events, one
//! JSON object per chunk, each flushed as it is written, with BOOKMARK events on request.

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::BodyExt as _;
use serde_json::{Value, json};

use super::{
    ApiServer,
    api::{Body, Format, Query, RequestInfo},
    proto,
    select::Selector,
    status::ApiError,
    store::{EventType, Resource},
    table,
};

impl ApiServer {
    /// Streams watch events: one JSON object per chunk, each flushed as it is written.
    pub(super) fn watch(
        self: &Arc<Self>,
        info: &RequestInfo,
        query: &Query,
        format: Format,
    ) -> Result<Response<Body>, ApiError> {
        let labels = Selector::parse(query.get("labelSelector").unwrap_or_default())?;
        let fields = Selector::parse(query.get("fieldSelector").unwrap_or_default())?;
        fields.check_fields()?;
        let bookmarks = query.flag("allowWatchBookmarks")?;
        let timeout = match query.get("timeoutSeconds") {
            Some(text) => Some(Duration::from_secs(text.parse().map_err(|_| {
                ApiError::bad_request(format!("invalid timeoutSeconds {text:?}"))
            })?)),
            None => None,
        };
        let since =
            match query.get("resourceVersion") {
                None | Some("") | Some("0") => None,
                Some(text) => Some(text.parse::<u64>().map_err(|_| {
                    ApiError::bad_request(format!("invalid resourceVersion {text:?}"))
                })?),
            };

        let mut subscription = self.store.watch(since, info.resource)?;
        // A watch on `/.../NAME?watch=true` follows that one object.
        let name = info.name.clone();
        let matches = move |object: &Value| {
            name.as_deref().is_none_or(|name| {
                object.pointer("/metadata/name").and_then(Value::as_str) == Some(name)
            }) && labels.matches_labels(object)
                && fields.matches_fields(object)
        };
        // Without a starting version the watch begins with the current state, as ADDED
        // events, the way the real server serves `resourceVersion` unset or "0".
        let namespace_filter = info.namespace.clone();
        let initial: Vec<Value> = std::mem::take(&mut subscription.snapshot)
            .into_iter()
            .filter(|object| {
                namespace_filter.as_deref().is_none_or(|namespace| {
                    object
                        .pointer("/metadata/namespace")
                        .and_then(Value::as_str)
                        == Some(namespace)
                })
            })
            .filter(|object| matches(object))
            .collect();

        let (mut sender, body) = http_body_util::channel::Channel::<Bytes, Infallible>::new(16);
        let resource = info.resource;
        let namespace = info.namespace.clone();
        let bookmark_interval = self.bookmark_interval;
        let split_after = self.split_watch_after.clone();
        tokio::spawn(async move {
            let mut stream = WatchStream {
                resource,
                format,
                first: true,
                last_version: subscription.resource_version,
            };
            let deadline = timeout.map(|timeout| tokio::time::Instant::now() + timeout);
            let mut live = subscription.live;
            let mut bookmark = tokio::time::interval_at(
                tokio::time::Instant::now() + bookmark_interval,
                bookmark_interval,
            );

            for object in initial {
                let line = stream.event_line(EventType::Added.as_str(), &object);
                if send_line(&mut sender, line, split_after.as_deref())
                    .await
                    .is_err()
                {
                    return;
                }
            }
            for event in subscription.backlog {
                if event.resource.name != resource.name
                    || namespace.as_ref().is_some_and(|ns| *ns != event.namespace)
                    || !matches(&event.object)
                {
                    continue;
                }
                let line = stream.event_line(event.event_type.as_str(), &event.object);
                if send_line(&mut sender, line, split_after.as_deref())
                    .await
                    .is_err()
                {
                    return;
                }
            }

            loop {
                let sleep_until = deadline.unwrap_or_else(|| {
                    tokio::time::Instant::now() + Duration::from_secs(86_400 * 365)
                });
                let event = tokio::select! {
                    received = live.recv() => received,
                    _ = bookmark.tick(), if bookmarks => {
                        let line = stream.bookmark_line();
                        if sender.send_data(line).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    () = tokio::time::sleep_until(sleep_until) => return,
                };
                let event = match event {
                    Ok(event) => event,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        let error = ApiError::gone(
                            "watch fell too far behind; restart it from a new list".to_string(),
                        );
                        tracing::info!(resource = resource.name, "watch fell behind and ends");
                        if format != Format::Protobuf {
                            let line = stream.event_line("ERROR", &error.to_status());
                            let _ = sender.send_data(line).await;
                        }
                        return;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                stream.last_version = event.resource_version;
                if event.resource.name != resource.name
                    || namespace.as_ref().is_some_and(|ns| *ns != event.namespace)
                    || !matches(&event.object)
                {
                    continue;
                }
                let line = stream.event_line(event.event_type.as_str(), &event.object);
                if send_line(&mut sender, line, split_after.as_deref())
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });

        Ok(Response::builder()
            .status(StatusCode::OK)
            .header(
                header::CONTENT_TYPE,
                if format == Format::Protobuf {
                    proto::WATCH_CONTENT_TYPE
                } else {
                    "application/json"
                },
            )
            .header(header::CACHE_CONTROL, "no-cache, private")
            .body(body.boxed())
            .expect("static response parts are valid"))
    }
}

/// Pause between the two chunks of a split watch event, so that they leave in separate
/// TLS records and reads.
const SPLIT_PAUSE: Duration = Duration::from_millis(50);

/// Sends one watch event as one chunk or, when it contains `split_after`, as two chunks
/// divided right after the first occurrence of that text.
async fn send_line(
    sender: &mut http_body_util::channel::Sender<Bytes, Infallible>,
    line: Bytes,
    split_after: Option<&str>,
) -> Result<(), http_body_util::channel::SendError> {
    let split_at = split_after
        .filter(|text| !text.is_empty())
        .and_then(|text| {
            line.windows(text.len())
                .position(|window| window == text.as_bytes())
                .map(|start| start + text.len())
        });
    let Some(split_at) = split_at.filter(|at| *at < line.len()) else {
        return sender.send_data(line).await;
    };
    sender.send_data(line.slice(..split_at)).await?;
    tokio::time::sleep(SPLIT_PAUSE).await;
    sender.send_data(line.slice(split_at..)).await
}

/// Encoding state of one watch response.
struct WatchStream {
    resource: &'static Resource,
    format: Format,
    /// Whether no Table event was sent yet: only the first carries column definitions.
    first: bool,
    /// Version of the last event this watch has seen, for BOOKMARK events.
    last_version: u64,
}

impl WatchStream {
    fn event_line(&mut self, event_type: &str, object: &Value) -> Bytes {
        if self.format == Format::Protobuf {
            return Bytes::from(proto::watch_event_frame(event_type, object));
        }
        let object = if self.format == Format::Table && event_type != "ERROR" {
            let version = object
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                .and_then(|text| text.parse().ok())
                .unwrap_or(self.last_version);
            let table = table::table(
                self.resource,
                std::slice::from_ref(object),
                version,
                self.first,
            );
            self.first = false;
            table
        } else {
            object.clone()
        };
        let mut line = serde_json::to_vec(&json!({"type": event_type, "object": object}))
            .expect("JSON values always serialize");
        line.push(b'\n');
        Bytes::from(line)
    }

    fn bookmark_line(&mut self) -> Bytes {
        let object = json!({
            "kind": self.resource.kind,
            "apiVersion": self.resource.api_version(),
            "metadata": {"resourceVersion": self.last_version.to_string()},
        });
        if self.format == Format::Protobuf {
            return Bytes::from(proto::watch_event_frame("BOOKMARK", &object));
        }
        let mut line = serde_json::to_vec(&json!({"type": "BOOKMARK", "object": object}))
            .expect("JSON values always serialize");
        line.push(b'\n');
        Bytes::from(line)
    }
}

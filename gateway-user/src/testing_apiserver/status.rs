//! `Status` objects: the body of every error response, with the `reason` values and messages
//! the real server uses so that kubectl prints its usual errors.

use serde_json::{Value, json};

use super::store::Resource;

/// An API error, sent as a `Status` with HTTP status `code`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub code: u16,
    /// `metav1.StatusReason`, e.g. `NotFound`.
    pub reason: &'static str,
    pub message: String,
    /// `details.name` and `details.kind` (the resource's plural name).
    pub details: Option<(String, String)>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: String) -> Self {
        Self {
            code,
            reason,
            message,
            details: None,
        }
    }

    fn with_details(mut self, resource: &Resource, name: &str) -> Self {
        self.details = Some((name.to_string(), resource.name.to_string()));
        self
    }

    pub fn not_found(resource: &Resource, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", resource.name),
        )
        .with_details(resource, name)
    }

    pub fn already_exists(resource: &Resource, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", resource.name),
        )
        .with_details(resource, name)
    }

    pub fn conflict(resource: &Resource, name: &str, cause: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": {cause}",
                resource.name
            ),
        )
        .with_details(resource, name)
    }

    pub fn invalid(resource: &Resource, name: &str, cause: &str) -> Self {
        Self::new(
            422,
            "Invalid",
            format!("{} \"{name}\" is invalid: {cause}", resource.kind),
        )
        .with_details(resource, name)
    }

    pub fn bad_request(message: String) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub fn gone(message: String) -> Self {
        Self::new(410, "Expired", message)
    }

    pub fn unauthorized() -> Self {
        Self::new(401, "Unauthorized", "Unauthorized".to_string())
    }

    pub fn method_not_allowed(method: &str) -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource: {method}"),
        )
    }

    pub fn not_acceptable(accept: &str) -> Self {
        Self::new(
            406,
            "NotAcceptable",
            format!(
                "the server was unable to respond with a content type that the client supports ({accept})"
            ),
        )
    }

    pub fn unsupported_media_type(content_type: &str) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/merge-patch+json, application/strategic-merge-patch+json (got {content_type:?})"
            ),
        )
    }

    /// Builds the error for a path the server does not serve. The real server returns 404
    /// with the plain body `404 page not found` there, but clients decode a `Status`.
    pub fn path_not_found() -> Self {
        Self::new(
            404,
            "NotFound",
            "the server could not find the requested resource".to_string(),
        )
    }

    /// Builds the authorizer's denial, worded as the real RBAC authorizer words it.
    pub fn forbidden(
        user: &str,
        verb: &str,
        resource: &str,
        subresource: Option<&str>,
        namespace: Option<&str>,
        name: Option<&str>,
    ) -> Self {
        let target = match subresource {
            Some(sub) => format!("{resource}/{sub}"),
            None => resource.to_string(),
        };
        let subject = match name {
            Some(name) => format!("{target} \"{name}\""),
            None => target.clone(),
        };
        let scope = match namespace {
            Some(namespace) => format!(" in the namespace \"{namespace}\""),
            None => " at the cluster scope".to_string(),
        };
        let mut error = Self::new(
            403,
            "Forbidden",
            format!(
                "{subject} is forbidden: User \"{user}\" cannot {verb} resource \"{target}\" in API group \"\"{scope}"
            ),
        );
        error.details = Some((name.unwrap_or_default().to_string(), resource.to_string()));
        error
    }

    /// Builds the denial of a non-resource path such as `/api` for an anonymous request.
    pub fn forbidden_path(user: &str, verb: &str, path: &str) -> Self {
        Self::new(
            403,
            "Forbidden",
            format!("forbidden: User \"{user}\" cannot {verb} path \"{path}\""),
        )
    }

    pub fn internal(message: String) -> Self {
        Self::new(500, "InternalError", message)
    }

    /// Builds the `Status` object.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some((name, kind)) = &self.details {
            let mut details = json!({"kind": kind});
            if !name.is_empty() {
                details["name"] = json!(name);
            }
            status["details"] = details;
        }
        status
    }
}

/// The `Status` a successful delete of a non-pod object returns.
pub fn deleted_status(resource: &Resource, name: &str, uid: &Value) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": {"name": name, "kind": resource.name, "uid": uid},
    })
}

//! `pods/exec` and `pods/portforward`.

use std::sync::Arc;

use http::Request;
use hyper::body::Incoming;

use super::{
    ApiServer,
    api::{Body, Query, RequestInfo},
    status::ApiError,
};

pub async fn handle_exec(
    _server: Arc<ApiServer>,
    _request: Request<Incoming>,
    _info: &RequestInfo,
    _query: &Query,
) -> Result<http::Response<Body>, ApiError> {
    Err(ApiError::bad_request(
        "exec is not implemented yet".to_string(),
    ))
}

pub async fn handle_port_forward(
    _server: Arc<ApiServer>,
    _request: Request<Incoming>,
    _info: &RequestInfo,
    _query: &Query,
) -> Result<http::Response<Body>, ApiError> {
    Err(ApiError::bad_request(
        "port-forward is not implemented yet".to_string(),
    ))
}

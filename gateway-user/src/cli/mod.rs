//! Commands of `gatewayctl` that are more than a few lines: the binary parses its arguments
//! and calls these.

pub mod sessions;

//! Protocol handlers, one per target class. Each takes the accepted client connection and the
//! upstream connection and runs the session to its end.
//!
//! The Kubernetes API and MySQL classes are relayed byte for byte until their own handlers
//! land.

pub mod postgres;
pub mod tcp;

//! Protocol handlers, one per target class. Each takes the accepted client connection and the
//! upstream connection and runs the session to its end.
//!
//! The Kubernetes API class is relayed byte for byte until its own handler lands.

pub mod mysql;
pub mod postgres;
pub mod tcp;

//! Protocol handlers, one per target class. Each takes the accepted client connection and the
//! upstream connection and runs the session to its end.
pub mod kube;
pub mod mysql;
pub mod postgres;
pub mod tcp;

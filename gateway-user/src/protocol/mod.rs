//! Protocol handlers, one per target class. Each takes the accepted client connection and the
//! upstream connection and runs the session to its end.
//!
//! Only the byte relay exists so far; the Kubernetes API, PostgreSQL and MySQL classes are
//! relayed by it too until their own handlers land.

pub mod tcp;

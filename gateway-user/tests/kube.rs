//! The Kubernetes API handler end to end.

//! Empty library target: `gateway-user` names this crate as a build dependency so cargo
//! rebuilds the daemon when the programs in `main.rs` change.
#![no_std]

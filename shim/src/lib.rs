//! User-space side of warmpool's kernel assist.
//!
//! [`assist`] loads warmpool's eBPF programs (built from `shim-ebpf`, embedded),
//! attaches them to cgroups and reads their maps. Cgroup discovery lives in the
//! `warmpool-tenancy` crate.

pub mod assist;

//! Who a client is, from the kernel only: its cgroup v2 membership ([`cgroup`]) and its
//! network namespace ([`netns`]), and what a pidfd says about its process ([`pidfd`]).
//!
//! Nothing here needs the eBPF build: the pool manager, the kernel assist (`shim`) and
//! the experiments share it. Nothing a client says is an input: every answer comes from a
//! pid the kernel reported (`SO_PEERCRED`) checked against a pidfd (`SO_PEERPIDFD`), or from
//! the pidfd itself.

pub mod cgroup;
pub mod netns;
pub mod pidfd;

pub use cgroup::CgroupError;
pub use netns::{NetNs, NetNsError, NetNsId};

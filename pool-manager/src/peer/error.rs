//! Typed errors of the peer module: what a name, a range, an admission check, a link request
//! or the control connection to the rendezvous server can fail with. Each `Display`s as the
//! text a client or log line shows.

use super::link::LinkError;
use super::PeerName;
use std::time::Duration;

/// A peer name (`JOB/NAME[:PORT]`) that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// No `/`.
    #[error("{0:?}: expected JOB/NAME")]
    NoSlash(String),
    /// A part is empty, too long or holds other characters.
    #[error("{0:?}: JOB and NAME must each be 1-{max} characters of A-Z a-z 0-9 . _ -", max = super::MAX_PART)]
    BadPart(String),
    /// The `:PORT` is not a port.
    #[error("{0:?}: {1:?} is not a port")]
    BadPort(String, String),
}

/// A virtual range (`A.B.C.D/N`) that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// No `/`.
    #[error("{0:?}: expected A.B.C.D/N")]
    NoSlash(String),
    /// The address part is not an IPv4 address.
    #[error("{0:?}: {1:?} is not an IPv4 address")]
    BadAddress(String, String),
    /// The prefix length is not 8-30.
    #[error("{0:?}: prefix length must be 8-30")]
    BadPrefix(String),
}

/// Why a tenant may not have peer links (the text is the refusal told to the client).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The uid is not allowed.
    #[error("uid {uid} may not have peer links of job {job} ({hint})")]
    Uid {
        /// The asking uid.
        uid: u32,
        /// The job.
        job: String,
        /// Where the allowed uids come from.
        hint: &'static str,
    },
    /// The cgroup is outside every allowed one.
    #[error("cgroup {cgroup} may not have peer links of job {job} (see [peer] allow_cgroups)")]
    Cgroup {
        /// The asking cgroup.
        cgroup: String,
        /// The job.
        job: String,
    },
}

/// Why [`super::agent::Agent::acquire`] has no link to give.
#[derive(Debug, thiserror::Error)]
pub enum AcquireError {
    /// The peer is in another job.
    #[error("{peer} is not in job {job}")]
    OtherJob {
        /// The asked-for peer.
        peer: PeerName,
        /// This node's job.
        job: String,
    },
    /// The peer is this node.
    #[error("{0} is this node itself")]
    Itself(PeerName),
    /// No control connection to the rendezvous server.
    #[error("not connected to the rendezvous server")]
    NotConnected,
    /// The rendezvous server does not know the peer.
    #[error("{0} is not registered with the rendezvous server")]
    NotRegistered(PeerName),
    /// The control connection dropped while waiting.
    #[error("lost the rendezvous server")]
    LostServer,
    /// The rendezvous server did not answer the request in time.
    #[error("the rendezvous server did not answer")]
    NoAnswer,
    /// Making the link failed.
    #[error("the link to {0} could not be made")]
    NotMade(PeerName),
    /// No link within the link timeout.
    #[error("no link to {0} within {1:?}")]
    Timeout(PeerName, Duration),
    /// Every link made was taken by another function first.
    #[error("no link to {0}: links kept being taken by other functions")]
    Contended(PeerName),
}

/// Why the control connection to the rendezvous server ended.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Connecting, reading or writing failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The handshake did not finish in time.
    #[error("handshake timed out")]
    HandshakeTimeout,
    /// The handshake failed.
    #[error(transparent)]
    Handshake(#[from] LinkError),
    /// The server refused this member.
    #[error("refused: {0}")]
    Refused(String),
}

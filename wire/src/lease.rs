//! Lease ids and the offer limit: the numbers both ends must agree on.
//!
//! A lease id travels as a `u64`, but valid ids are `1..=LeaseId::MAX` (48 bits), so a client
//! can keep one in a word together with flag bits (the preload's fd table does). The daemon
//! hands out ids from 1 upward and never one outside that range.

/// Most `Offer`s in one reply to `Prefetch`: the daemon sends at most this many, and a client
/// keeps this many slots.
pub const MAX_OFFERS: usize = 8;

/// A lease id the daemon granted, checked to be in range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(u64);

impl LeaseId {
    /// Bits a lease id may use.
    pub const BITS: u32 = 48;
    /// The largest valid id.
    pub const MAX: Self = Self((1 << Self::BITS) - 1);

    /// `id` if it is a valid lease id (not 0, at most [`Self::MAX`]).
    #[must_use]
    pub const fn new(id: u64) -> Option<Self> {
        if id != 0 && id <= Self::MAX.0 {
            Some(Self(id))
        } else {
            None
        }
    }

    /// The id as sent on the wire.
    #[must_use]
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl TryFrom<u64> for LeaseId {
    type Error = LeaseIdOutOfRange;
    fn try_from(id: u64) -> Result<Self, Self::Error> {
        Self::new(id).ok_or(LeaseIdOutOfRange(id))
    }
}

impl From<LeaseId> for u64 {
    fn from(id: LeaseId) -> Self {
        id.0
    }
}

impl core::fmt::Display for LeaseId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        self.0.fmt(f)
    }
}

/// A `u64` that is not a valid [`LeaseId`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseIdOutOfRange(pub u64);

impl core::fmt::Display for LeaseIdOutOfRange {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "lease id {} is outside 1..={}", self.0, LeaseId::MAX.0)
    }
}

impl std::error::Error for LeaseIdOutOfRange {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_is_checked() {
        assert_eq!(LeaseId::new(0), None);
        assert_eq!(LeaseId::new(1).map(LeaseId::get), Some(1));
        assert_eq!(LeaseId::new((1 << 48) - 1), Some(LeaseId::MAX));
        assert_eq!(LeaseId::try_from(1 << 48), Err(LeaseIdOutOfRange(1 << 48)));
    }
}

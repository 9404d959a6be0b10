//! Clock types: compact points in time kept per connection and in atomics.

use std::{
    num::{NonZeroU32, NonZeroU64},
    sync::OnceLock,
    time::{Duration, Instant},
};

/// A point in time in 8 bytes: nanoseconds since the first one this process made (plus one,
/// so `Option<When>` needs no extra space). Deadlines are kept per connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct When(NonZeroU64);

static EPOCH: OnceLock<Instant> = OnceLock::new();

impl When {
    pub(crate) fn from_instant(at: Instant) -> Self {
        let epoch = *EPOCH.get_or_init(Instant::now);
        let nanos = at.saturating_duration_since(epoch).as_nanos();
        let nanos = u64::try_from(nanos).unwrap_or(u64::MAX - 1);
        Self(NonZeroU64::MIN.saturating_add(nanos))
    }

    pub(crate) fn instant(self) -> Instant {
        let epoch = *EPOCH.get_or_init(Instant::now);
        epoch + Duration::from_nanos(self.0.get() - 1)
    }

    /// As a plain number, for an atomic (never 0).
    pub(crate) fn as_nanos(self) -> u64 {
        self.0.get()
    }

    /// Back from [`When::as_nanos`]; 0 reads as the epoch.
    pub(crate) fn from_nanos(nanos: u64) -> Self {
        Self(NonZeroU64::new(nanos).unwrap_or(NonZeroU64::MIN))
    }
}

/// A coarse point in time in 4 bytes: milliseconds since the process's epoch, wrapping every
/// 49 days (never zero, so `Option<Stamp>` is 4 bytes too). Only differences are read, so
/// the intervals compared stay under 24 days (the config caps liveness timeouts at 1 day).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp(NonZeroU32);

impl Stamp {
    /// A placeholder until the first real stamp.
    pub(crate) const START: Stamp = Stamp(NonZeroU32::MIN);

    pub(crate) fn now() -> Self {
        Self::from_instant(Instant::now())
    }

    pub(crate) fn from_instant(at: Instant) -> Self {
        let epoch = *EPOCH.get_or_init(Instant::now);
        // Truncation is the wrap; the one zero value in each wrap reads as 1 ms later.
        let millis = at.saturating_duration_since(epoch).as_millis() as u32;
        Self(NonZeroU32::new(millis).unwrap_or(NonZeroU32::MIN))
    }

    /// Time from `self` to `later` (zero if `later` is earlier).
    pub(crate) fn until(self, later: Stamp) -> Duration {
        let diff = later.0.get().wrapping_sub(self.0.get());
        if diff > u32::MAX / 2 {
            return Duration::ZERO; // `later` is before `self`
        }
        Duration::from_millis(u64::from(diff))
    }

    /// Whether `self` is at or after `other`.
    pub(crate) fn at_or_after(self, other: Stamp) -> bool {
        self.0.get().wrapping_sub(other.0.get()) <= u32::MAX / 2
    }
}

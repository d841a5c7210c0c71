use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A task's identity: a UUIDv7, so ids sort by creation time and carry no
/// coordination between schedulers.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(transparent)]
pub struct TaskId(Uuid);

impl TaskId {
    /// A fresh, time-ordered id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// The smallest UUIDv7 id of millisecond `time`: every id created at or
    /// after `time` sorts after it, as text too (ids are fixed-width hex).
    pub fn earliest_at(time: chrono::DateTime<chrono::Utc>) -> Self {
        let ms = u128::from(time.timestamp_millis().max(0) as u64) & ((1 << 48) - 1);
        Self(Uuid::from_u128((ms << 80) | (0x7 << 76)))
    }

    /// The underlying UUID.
    pub fn as_uuid(&self) -> &Uuid {
        &self.0
    }
}

impl Default for TaskId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The text was not a task id.
#[derive(Debug, thiserror::Error)]
#[error("invalid task id {0:?}: expected a UUID")]
pub struct ParseTaskIdError(String);

impl FromStr for TaskId {
    type Err = ParseTaskIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s)
            .map(Self)
            .map_err(|_| ParseTaskIdError(s.chars().take(64).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_sort_by_creation() {
        let first = TaskId::new();
        let second = TaskId::new();
        assert!(first < second);
        assert_eq!(first.to_string().parse::<TaskId>().unwrap(), first);
        assert!("not-a-uuid".parse::<TaskId>().is_err());
    }
}

#[cfg(test)]
mod earliest_tests {
    use super::*;

    #[test]
    fn ids_sort_around_the_earliest_id_of_their_millisecond_as_text() {
        let now = chrono::Utc::now();
        let before = TaskId::earliest_at(now - chrono::Duration::milliseconds(2));
        let cutoff = TaskId::earliest_at(now);
        let after = TaskId::new();
        assert!(before.to_string() < cutoff.to_string(), "{before} {cutoff}");
        assert!(cutoff.to_string() <= after.to_string(), "{cutoff} {after}");
        // The cutoff is a well-formed v7 id.
        assert_eq!(cutoff.to_string().as_bytes()[14], b'7');
        assert_eq!(cutoff.as_uuid().get_version_num(), 7);
    }
}

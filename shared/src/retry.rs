//! The one way to retry: an exponential [`Backoff`] policy on `backon`, with
//! jitter drawn from a real random generator (never the clock), and the rule
//! for a server that asked us to wait (`Retry-After`): its wait, capped,
//! replaces ours.
//!
//! Every client (broker connection, LLM providers, Daytona) builds its
//! schedule here and runs it with `backon::Retryable`:
//!
//! ```
//! # async fn demo() -> Result<(), std::io::Error> {
//! use backon::Retryable;
//! use shoal_shared::retry::Backoff;
//! use std::time::Duration;
//!
//! let policy = Backoff::exponential(Duration::from_millis(100), Duration::from_secs(2))
//!     .with_max_retries(3);
//! let cap = Duration::from_secs(60);
//! let value = (|| async { Ok::<_, std::io::Error>(7) })
//!     .retry(policy.builder())
//!     // The error would say what the server asked for; none here.
//!     .adjust(|_e: &std::io::Error, delay| policy.next_wait(delay, None, cap))
//!     .await?;
//! assert_eq!(value, 7);
//! # Ok(()) }
//! ```

use std::time::Duration;

use backon::ExponentialBuilder;

/// How a scheduled delay is randomised, so that many clients that failed
/// together do not retry together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// The delay as scheduled (tests that count milliseconds).
    None,
    /// Uniform in `[0, delay]` ("full jitter"): the scheduled delay is a
    /// ceiling.
    Full,
    /// Uniform in `[delay, 2 × delay)`: backon's own jitter, which never waits
    /// less than scheduled.
    Added,
}

/// An exponential backoff: `initial`, then × `factor` per retry up to
/// `max_delay`, for at most `max_retries` retries and (when set) at most
/// `total` of waiting in all; each wait randomised by `jitter`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// The first scheduled delay.
    pub initial: Duration,
    /// The growth per retry (at least 1).
    pub factor: f32,
    /// No scheduled delay grows beyond this.
    pub max_delay: Duration,
    /// Retries after the first attempt; `None` retries until `total` is spent.
    pub max_retries: Option<usize>,
    /// The most waiting in all (jitter included); `None` has no such bound.
    pub total: Option<Duration>,
    pub jitter: Jitter,
}

impl Backoff {
    /// Doubling from `initial` to `max_delay`, three retries, backon's
    /// [`Jitter::Added`] (backon's defaults, with our delays).
    pub const fn exponential(initial: Duration, max_delay: Duration) -> Self {
        Self {
            initial,
            factor: 2.0,
            max_delay,
            max_retries: Some(3),
            total: None,
            jitter: Jitter::Added,
        }
    }

    pub const fn with_factor(mut self, factor: f32) -> Self {
        self.factor = factor;
        self
    }

    pub const fn with_max_retries(mut self, max_retries: usize) -> Self {
        self.max_retries = Some(max_retries);
        self
    }

    /// Retries for as long as the waits add up to at most `total`, however
    /// many retries that is.
    pub const fn for_at_most(mut self, total: Duration) -> Self {
        self.max_retries = None;
        self.total = Some(total);
        self
    }

    pub const fn with_jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// The schedule for `backon::Retryable::retry`. With [`Jitter::Full`] it
    /// yields the ceilings: pass each through [`Backoff::next_wait`] (in
    /// `adjust`) to draw the wait.
    pub fn builder(&self) -> ExponentialBuilder {
        let builder = ExponentialBuilder::default()
            .with_min_delay(self.initial)
            .with_factor(self.factor.max(1.0))
            .with_max_delay(self.max_delay)
            .with_total_delay(self.total);
        let builder = match self.max_retries {
            Some(retries) => builder.with_max_times(retries),
            None => builder.without_max_times(),
        };
        match self.jitter {
            Jitter::Added => builder.with_jitter(),
            Jitter::None | Jitter::Full => builder,
        }
    }

    /// The wait before the next attempt, for `backon`'s `adjust`: what the
    /// server asked (`asked`, at most `cap`) when it asked, else `scheduled`
    /// with this policy's full jitter drawn. `None` (retries used up) stays
    /// `None`.
    pub fn next_wait(
        &self,
        scheduled: Option<Duration>,
        asked: Option<Duration>,
        cap: Duration,
    ) -> Option<Duration> {
        let scheduled = scheduled?;
        Some(match asked {
            Some(wait) => wait.min(cap),
            None if self.jitter == Jitter::Full => full_jitter(scheduled),
            None => scheduled,
        })
    }
}

/// Uniform in `[0, 1)`, from a generator seeded from the operating system
/// (not the clock): a fraction to spread waits with.
pub fn unit_jitter() -> f64 {
    fastrand::f64()
}

/// Uniform in `[0, ceiling]`.
pub fn full_jitter(ceiling: Duration) -> Duration {
    ceiling.mul_f64(unit_jitter())
}

#[cfg(test)]
mod tests {
    use super::*;
    use backon::Retryable;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::time::Instant;

    const CAP: Duration = Duration::from_secs(60);

    /// Fails `failures` times, then succeeds; returns how many attempts were
    /// made and how long (paused clock) it all took.
    async fn run(
        policy: Backoff,
        failures: usize,
        asked: Option<Duration>,
    ) -> (Result<(), ()>, usize, Duration) {
        let attempts = AtomicUsize::new(0);
        let started = Instant::now();
        let result = (|| async {
            if attempts.fetch_add(1, Ordering::Relaxed) < failures {
                Err(())
            } else {
                Ok(())
            }
        })
        .retry(policy.builder())
        .adjust(|_: &(), delay| policy.next_wait(delay, asked, CAP))
        .await;
        (result, attempts.load(Ordering::Relaxed), started.elapsed())
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// backon scales delays in `f32` and the timer rounds up to the
    /// millisecond: a millisecond per wait either way.
    fn about(took: Duration, expected: Duration, waits: u32) {
        assert!(
            took.abs_diff(expected) <= ms(1) * waits,
            "took {took:?}, expected {expected:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn without_jitter_the_waits_double_up_to_the_ceiling() {
        let policy = Backoff::exponential(ms(100), ms(300))
            .with_max_retries(4)
            .with_jitter(Jitter::None);
        let (result, attempts, took) = run(policy, 4, None).await;
        assert_eq!(result, Ok(()));
        assert_eq!(attempts, 5);
        about(took, ms(100 + 200 + 300 + 300), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn the_retries_end_at_the_limit_with_the_last_error() {
        let policy = Backoff::exponential(ms(10), ms(10))
            .with_max_retries(2)
            .with_jitter(Jitter::None);
        let (result, attempts, took) = run(policy, 10, None).await;
        assert_eq!(result, Err(()));
        assert_eq!(attempts, 3);
        about(took, ms(20), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn added_jitter_waits_between_the_delay_and_twice_it() {
        let policy = Backoff::exponential(ms(100), ms(100)).with_max_retries(50);
        let (_, attempts, took) = run(policy, 50, None).await;
        assert_eq!(attempts, 51);
        assert!(took >= ms(50 * 100) && took <= ms(50 * 201), "{took:?}");
        assert!(took > ms(50 * 101), "jitter was drawn: {took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn full_jitter_waits_at_most_the_ceiling() {
        let policy = Backoff::exponential(ms(100), ms(100))
            .with_max_retries(50)
            .with_jitter(Jitter::Full);
        let (_, attempts, took) = run(policy, 50, None).await;
        assert_eq!(attempts, 51);
        assert!(took <= ms(50 * 101), "{took:?}");
        assert!(took > Duration::ZERO, "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_servers_wait_replaces_ours_and_is_capped() {
        let policy = Backoff::exponential(ms(100), ms(100))
            .with_max_retries(2)
            .with_jitter(Jitter::Full);
        let (_, _, took) = run(policy, 2, Some(ms(1_500))).await;
        about(took, ms(3_000), 2);
        let (_, _, took) = run(policy, 2, Some(Duration::from_secs(3_600))).await;
        about(took, CAP * 2, 2); // an hour-long Retry-After is cut to the cap
    }

    #[tokio::test(start_paused = true)]
    async fn a_total_bounds_the_waiting_not_the_count() {
        let policy = Backoff::exponential(ms(100), ms(100))
            .for_at_most(ms(1_000))
            .with_jitter(Jitter::None);
        let (result, attempts, took) = run(policy, 1_000, None).await;
        assert_eq!(result, Err(()));
        assert_eq!(attempts, 11);
        about(took, ms(1_000), 10);
    }

    #[test]
    fn retries_used_up_stay_used_up() {
        let policy = Backoff::exponential(ms(1), ms(1));
        assert_eq!(policy.next_wait(None, Some(ms(5)), CAP), None);
    }

    #[test]
    fn unit_jitter_is_spread_over_zero_to_one() {
        let draws: Vec<f64> = (0..200).map(|_| unit_jitter()).collect();
        assert!(draws.iter().all(|d| (0.0..1.0).contains(d)));
        assert!(draws.iter().any(|d| *d < 0.5));
        assert!(draws.iter().any(|d| *d > 0.5));
    }
}

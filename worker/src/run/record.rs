//! Writing what a run must record before its message is settled (ADR 0032):
//! a store write that fails is retried with backoff until it succeeds or the
//! drain deadline passes. Until then the message stays unacked; after the
//! deadline the caller gives it back to the broker instead of acking
//! something Redis does not know.

use std::future::Future;
use std::time::Duration;

use backon::Retryable;
use shoal_shared::retry::Backoff;
use shoal_shared::store::StoreError;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// First and longest wait between attempts.
const FIRST: Duration = Duration::from_millis(200);
const LONGEST: Duration = Duration::from_secs(5);

/// Runs `write` until it succeeds (`Some`) or `abort` fires (`None`).
/// `what` names the write in the logs.
pub async fn until_recorded<T, F, Fut>(
    abort: &CancellationToken,
    what: &'static str,
    write: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let policy = Backoff {
        max_retries: None,
        total: None,
        ..Backoff::exponential(FIRST, LONGEST)
    };
    let mut failed = false;
    let retried = write
        .retry(policy.builder())
        .sleep(tokio::time::sleep)
        .notify(|error: &StoreError, wait: Duration| {
            if !failed {
                warn!(%error, what, "recording failed (redis unavailable?); the message stays unacked and the write is retried");
            }
            failed = true;
            tracing::debug!(%error, what, wait_ms = wait.as_millis() as u64, "retrying");
        });
    let written = tokio::select! {
        biased;
        _ = abort.cancelled() => None,
        written = retried => written.ok(),
    };
    match &written {
        Some(_) if failed => info!(what, "recorded after redis came back"),
        None => warn!(
            what,
            "not recorded before the drain deadline; the message goes back to the broker"
        ),
        Some(_) => {}
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn down() -> StoreError {
        StoreError::Corrupt("redis is down".into())
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_write_is_retried_until_it_succeeds() {
        let calls = AtomicU32::new(0);
        let abort = CancellationToken::new();
        let written = until_recorded(&abort, "test", || async {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            if n < 20 {
                Err(down())
            } else {
                Ok(n)
            }
        })
        .await;
        assert_eq!(written, Some(20));
    }

    #[tokio::test(start_paused = true)]
    async fn the_drain_deadline_ends_the_retries_without_a_record() {
        let abort = CancellationToken::new();
        let deadline = abort.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            deadline.cancel();
        });
        let written: Option<()> = until_recorded(&abort, "test", || async { Err(down()) }).await;
        assert_eq!(written, None);
    }
}

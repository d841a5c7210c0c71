//! Keeps the broker's dead-letter queue (`{ns}.dead`) bounded (ADR 0027).
//!
//! The dead-letter log in Redis is the operator's view: it holds why each
//! message died and, for a task, its message, and `/v1/dead` reads, replays
//! and purges from it. The broker queue is a raw copy nobody consumes, so
//! each scheduler trims it to the newest [`KEEP`] messages now and then
//! (oldest first, like `x-max-length` with `drop-head`, but without changing
//! the queue's declared arguments, which a running fleet could not redeclare).

use std::time::Duration;

use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::Channel;
use shoal_shared::broker::{Broker, Topology};
use tokio_util::sync::CancellationToken;

/// Messages the broker's dead-letter queue keeps.
pub const KEEP: u32 = 10_000;
/// How often a scheduler trims it.
pub const EVERY: Duration = Duration::from_secs(300);

/// Removes the oldest messages of `queue` until at most `keep` are left;
/// returns how many it removed.
pub async fn trim(channel: &Channel, queue: &str, keep: u32) -> Result<u32, lapin::Error> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let declared = channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await?;
    let surplus = declared.message_count().saturating_sub(keep);
    let mut removed = 0;
    while removed < surplus {
        let got = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await?;
        if got.is_none() {
            break;
        }
        removed += 1;
    }
    Ok(removed)
}

/// Trims the namespace's dead-letter queue every [`EVERY`] until `stop`.
pub async fn run(broker: Broker, topology: Topology, stop: CancellationToken) {
    let queue = topology.dead_queue();
    loop {
        let round = async {
            let channel = broker.channel().await.map_err(|e| e.to_string())?;
            let removed = trim(&channel, &queue, KEEP)
                .await
                .map_err(|e| e.to_string());
            let _ = channel.close(200, "trimmed".into()).await;
            removed
        };
        match round.await {
            Ok(0) => {}
            Ok(removed) => {
                tracing::info!(removed, queue = %queue, keep = KEEP, "dead-letter queue trimmed")
            }
            Err(error) => tracing::warn!(%error, queue = %queue, "dead-letter queue not trimmed"),
        }
        tokio::select! {
            () = stop.cancelled() => {
                broker.close().await;
                return;
            }
            () = tokio::time::sleep(EVERY) => {}
        }
    }
}

//! `shoal watch` and `shoal logs`: following a task's live event stream
//! (reconnecting with `Last-Event-ID`), reading its whole log, and rendering
//! events as readable lines.

use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use futures::StreamExt;
use serde_json::Value;
use shoal_shared::task::{TaskId, TaskState};

use crate::client::{Client, ClientError, StreamedEvent};

/// A stream that carries nothing, not even the scheduler's keep-alive
/// comments (every 15 s), for this long is taken as lost.
const SILENT_FOR: Duration = Duration::from_secs(45);
/// A stream that stayed open this long counts as got back, even without an
/// event (a queued task is quiet); one closed sooner does not, so a scheduler
/// that answers and hangs up at once is still given up on in time.
const STABLE: Duration = Duration::from_secs(5);

/// A stream id (`<ms>-<seq>`) as a comparable pair; `None` if it is not one.
fn stream_position(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// Whether `event` ends the task's log: a change to a terminal state.
pub fn is_final(event: &Value) -> bool {
    str_of(event, "type") == "state_changed"
        && serde_json::from_value::<TaskState>(event.get("to").cloned().unwrap_or(Value::Null))
            .is_ok_and(|state| state.is_terminal())
}

/// Whether a failed call is worth repeating (the scheduler is away or busy),
/// rather than an answer that will not change (an unknown task, a bad token).
fn retryable(error: &ClientError) -> bool {
    match error {
        ClientError::Transport { .. } => true,
        ClientError::Api { status, .. } => *status >= 500 || *status == 429 || *status == 408,
    }
}

/// Follows task `id`'s live event stream and hands `on_event` every event,
/// each exactly once and in order, until the task's final event. A dropped
/// connection or a scheduler going away is survived: the stream is reopened
/// with `Last-Event-ID` after a bounded exponential backoff, for at most
/// `give_up_after` without progress. `on_notice` hears about reconnects.
pub async fn follow(
    client: &Client,
    id: &TaskId,
    give_up_after: Duration,
    mut on_event: impl FnMut(&StreamedEvent) -> anyhow::Result<()>,
    mut on_notice: impl FnMut(&str),
) -> anyhow::Result<()> {
    let schedule = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .with_total_delay(Some(give_up_after));
    let mut backoff = schedule.build();
    // The last event handed on: its id (sent as `Last-Event-ID`) and position.
    let mut last: Option<(String, (u64, u64))> = None;
    // Since when the stream has been lost, and why, while it is.
    let mut lost: Option<(Instant, String)> = None;
    loop {
        let mut delivered = 0usize;
        let mut opened: Option<Instant> = None;
        let why = match client
            .event_stream(id, last.as_ref().map(|(sid, _)| sid.as_str()))
            .await
        {
            Err(ClientError::Transport { error, .. }) => crate::client::transport_cause(&error),
            Err(error) if retryable(&error) => error.to_string(),
            Err(error) => return Err(error.into()),
            Ok(stream) => {
                opened = Some(Instant::now());
                let mut stream = std::pin::pin!(stream);
                loop {
                    match tokio::time::timeout(SILENT_FOR, stream.next()).await {
                        Err(_) => break format!("nothing arrived for {} s", SILENT_FOR.as_secs()),
                        Ok(Some(Err(error))) => break error.to_string(),
                        Ok(None) => {
                            if delivered == 0 {
                                // Closed at once: the task is over and nothing
                                // follows what was delivered, or the scheduler
                                // is going away. The record says which.
                                match client.get(id).await {
                                    Ok(record) if record.state.is_terminal() => return Ok(()),
                                    Ok(_) => {}
                                    Err(error) if retryable(&error) => {}
                                    Err(error) => return Err(error.into()),
                                }
                            }
                            break "the scheduler closed the stream".to_owned();
                        }
                        Ok(Some(Ok(event))) => {
                            let position = stream_position(&event.id).ok_or_else(|| {
                                anyhow::anyhow!("the scheduler sent event id {:?}", event.id)
                            })?;
                            if last.as_ref().is_some_and(|(_, seen)| position <= *seen) {
                                continue; // already handed on before a reconnect
                            }
                            on_event(&event)?;
                            last = Some((event.id.clone(), position));
                            delivered += 1;
                            if lost.take().is_some() {
                                on_notice("reconnected");
                            }
                            backoff = schedule.build();
                            if is_final(&event.event) {
                                return Ok(());
                            }
                        }
                    }
                }
            }
        };
        if delivered > 0 || opened.is_some_and(|at| at.elapsed() >= STABLE) {
            // This connection made progress, or held while the task had
            // nothing to say: this is a fresh loss, with a fresh schedule.
            lost = None;
            backoff = schedule.build();
        }
        let since = lost.get_or_insert_with(|| (Instant::now(), String::new()));
        since.1 = why;
        let delay = backoff
            .next()
            .filter(|delay| since.0.elapsed() + *delay <= give_up_after);
        let Some(delay) = delay else {
            anyhow::bail!(
                "lost the event stream of task {id} at {url} and could not get it back \
                 within {secs} s: {why} (is the scheduler running? name another with \
                 --server or SHOAL_SERVER; `shoal logs {id}` prints what is logged)",
                url = client.base(),
                secs = give_up_after.as_secs(),
                why = since.1,
            );
        };
        on_notice(&format!(
            "{}; reconnecting in {} ms",
            since.1,
            delay.as_millis()
        ));
        tokio::time::sleep(delay).await;
    }
}

/// Reads task `id`'s whole event log as it stands, page by page, handing
/// `on_event` each event in order; returns the task's state when the last
/// page was read.
pub async fn log(
    client: &Client,
    id: &TaskId,
    mut on_event: impl FnMut(&Value) -> anyhow::Result<()>,
) -> anyhow::Result<TaskState> {
    let mut after: Option<String> = None;
    loop {
        let page = client.events(id, after.as_deref()).await?;
        for event in &page.events {
            on_event(event)?;
            after = event.get("id").and_then(Value::as_str).map(str::to_owned);
        }
        if page.done || page.events.is_empty() {
            return Ok(page.state);
        }
        if after.is_none() {
            anyhow::bail!("the scheduler sent events without ids");
        }
    }
}

/// Characters of tool output shown per observation.
const SHOWN: usize = 600;

fn clip(text: &str, max: usize) -> String {
    let text = text.trim_end();
    let count = text.chars().count();
    if count <= max {
        return text.to_owned();
    }
    let head: String = text.chars().take(max).collect();
    format!("{head}… ({} more characters)", count - max)
}

fn indent(text: &str) -> String {
    text.lines().collect::<Vec<_>>().join("\n           ")
}

fn str_of<'a>(event: &'a Value, key: &str) -> &'a str {
    event.get(key).and_then(Value::as_str).unwrap_or("")
}

fn u64_of(event: &Value, key: &str) -> u64 {
    event.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// One event as a line (or a few); `None` for events not worth showing.
pub fn render(event: &Value) -> Option<String> {
    let time = str_of(event, "ts")
        .get(11..19)
        .unwrap_or("        ")
        .to_owned();
    let body = match str_of(event, "type") {
        "state_changed" => {
            let reason = str_of(event, "reason");
            let reason = if reason.is_empty() {
                String::new()
            } else {
                format!(" — {reason}")
            };
            let from = str_of(event, "from");
            if from.is_empty() {
                // A task's first state (a delayed task's `scheduled`).
                format!("state    {}{reason}", str_of(event, "to"))
            } else {
                format!(
                    "state    {from} → {} (attempt {}){reason}",
                    str_of(event, "to"),
                    u64_of(event, "attempt")
                )
            }
        }
        "sandbox_leased" => format!(
            "sandbox  {} ({}, {}, leased in {:.2} ms)",
            str_of(event, "sandbox_id"),
            str_of(event, "template"),
            if event.get("warm").and_then(Value::as_bool).unwrap_or(false) {
                "warm"
            } else {
                "cold"
            },
            event.get("lease_ms").and_then(Value::as_f64).unwrap_or(0.0)
        ),
        "exec_started" => format!("exec     $ {}", clip(str_of(event, "command"), 200)),
        "exec_finished" => format!(
            "exec     exit {} in {} ms ({} bytes out, {} err){}{}",
            event
                .get("exit_code")
                .and_then(Value::as_i64)
                .map_or("killed".into(), |c| c.to_string()),
            u64_of(event, "duration_ms"),
            u64_of(event, "stdout_bytes"),
            u64_of(event, "stderr_bytes"),
            flag(event, "timed_out", " — timed out"),
            flag(
                event,
                "memory_exceeded",
                " — a process was killed: the sandbox reached its memory limit"
            ),
        ),
        "system_prompt" => return None,
        "message" => format!(
            "{:8} {}",
            str_of(event, "role"),
            indent(&clip(str_of(event, "content"), SHOWN))
        ),
        "action" => {
            let tool = str_of(event, "tool");
            let args: Value =
                serde_json::from_str(str_of(event, "arguments")).unwrap_or(Value::Null);
            let shown = match tool {
                "terminal" | "execute_bash" => format!("$ {}", str_of(&args, "command")),
                "file_editor" | "str_replace_editor" => {
                    format!("{} {}", str_of(&args, "command"), str_of(&args, "path"))
                }
                "think" => str_of(&args, "thought").to_owned(),
                "finish" => str_of(&args, "message").to_owned(),
                _ => str_of(event, "arguments").to_owned(),
            };
            let thought = str_of(event, "thought");
            let thought = if thought.is_empty() {
                String::new()
            } else {
                format!("{}\n           ", indent(&clip(thought, 300)))
            };
            format!("▶ {tool:7} {thought}{}", indent(&clip(&shown, 400)))
        }
        "observation" => {
            let exit = event
                .get("exit_code")
                .and_then(Value::as_i64)
                .map(|c| format!(" [exit {c}]"))
                .unwrap_or_default();
            format!(
                "◀ {:7}{exit} {}",
                str_of(event, "tool"),
                indent(&clip(str_of(event, "content"), SHOWN))
            )
        }
        "agent_error" => format!("✗ error   {}", clip(str_of(event, "error"), 400)),
        "llm_call" => {
            let usage = event.get("usage").cloned().unwrap_or(Value::Null);
            format!(
                "llm      {} — {} in + {} out tokens, ${:.4}, {} ms",
                str_of(event, "model"),
                u64_of(&usage, "prompt_tokens")
                    + u64_of(&usage, "cache_read_tokens")
                    + u64_of(&usage, "cache_write_tokens"),
                u64_of(&usage, "completion_tokens"),
                u64_of(event, "cost_micros") as f64 / 1e6,
                u64_of(event, "latency_ms")
            )
        }
        "condensation" => format!(
            "condense {} messages summarised",
            u64_of(event, "forgotten_messages")
        ),
        "conversation_error" => format!("✗ failed  {}", str_of(event, "error")),
        "conversation_finished" => {
            let usage = event.get("usage").cloned().unwrap_or(Value::Null);
            format!(
                "■ {}  {} LLM calls, {} tokens in, {} out, ${:.4}{}",
                str_of(event, "outcome"),
                u64_of(event, "steps"),
                u64_of(&usage, "prompt_tokens")
                    + u64_of(&usage, "cache_read_tokens")
                    + u64_of(&usage, "cache_write_tokens"),
                u64_of(&usage, "completion_tokens"),
                u64_of(event, "cost_micros") as f64 / 1e6,
                event
                    .get("message")
                    .and_then(Value::as_str)
                    .map(|m| format!("\n           {}", indent(m)))
                    .unwrap_or_default()
            )
        }
        "duplicate_delivery" => format!(
            "note     duplicate delivery ignored: {}",
            str_of(event, "reason")
        ),
        "requeued" => format!("requeued {}", str_of(event, "reason")),
        "cancel_requested" => format!("cancel   requested by {}", str_of(event, "by")),
        other => other.to_owned(),
    };
    Some(format!("{time} {body}"))
}

/// `text` when the event's boolean `key` is true, else nothing.
fn flag(event: &Value, key: &str, text: &'static str) -> &'static str {
    if event.get(key).and_then(Value::as_bool).unwrap_or(false) {
        text
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn stream_ids_order_by_time_then_sequence() {
        assert!(stream_position("9-1") < stream_position("10-0"));
        assert!(stream_position("10-2") < stream_position("10-10"));
        assert_eq!(stream_position("7"), Some((7, 0)));
        assert_eq!(stream_position("x-1"), None);
    }

    #[test]
    fn only_a_terminal_state_change_is_final() {
        assert!(is_final(
            &json!({"type": "state_changed", "from": "running", "to": "succeeded"})
        ));
        assert!(!is_final(
            &json!({"type": "state_changed", "from": "running", "to": "retrying"})
        ));
        assert!(!is_final(&json!({"type": "exec_finished", "to": "failed"})));
    }

    #[test]
    fn a_delayed_task_reads_as_scheduled_then_promoted() {
        let first = json!({"type": "state_changed", "to": "scheduled", "attempt": 0,
                           "reason": "due at 2026-12-03T12:00:00.000Z"});
        assert_eq!(
            render(&first).as_deref().map(str::trim_start),
            Some("state    scheduled — due at 2026-12-03T12:00:00.000Z")
        );
        let promoted = json!({"type": "state_changed", "from": "scheduled", "to": "queued",
                              "attempt": 0, "reason": "due at 2026-12-03T12:00:00.000Z"});
        assert_eq!(
            render(&promoted).as_deref().map(str::trim_start),
            Some("state    scheduled → queued (attempt 0) — due at 2026-12-03T12:00:00.000Z")
        );
        assert!(!is_final(&first) && !is_final(&promoted));
    }

    #[test]
    fn actions_and_observations_read_like_a_terminal() {
        let action = json!({"type": "action", "ts": "2026-11-22T04:41:09.123Z", "tool": "terminal",
                            "arguments": "{\"command\":\"python3 fib.py\"}", "action_id": "c1"});
        assert_eq!(
            render(&action).unwrap(),
            "04:41:09 ▶ terminal $ python3 fib.py"
        );
        let observation = json!({"type": "observation", "ts": "2026-11-22T04:41:10Z", "tool": "terminal",
                                 "content": "0 1 1 2", "exit_code": 0, "action_id": "c1"});
        assert_eq!(
            render(&observation).unwrap(),
            "04:41:10 ◀ terminal [exit 0] 0 1 1 2"
        );
        assert!(render(&json!({"type": "system_prompt"})).is_none());
    }

    #[test]
    fn an_exec_that_hit_the_memory_limit_says_so() {
        let finished = json!({"type": "exec_finished", "ts": "2026-12-02T12:38:04Z", "exit_code": 137,
                              "duration_ms": 900, "stdout_bytes": 0, "stderr_bytes": 7,
                              "timed_out": false, "memory_exceeded": true});
        assert_eq!(
            render(&finished).unwrap(),
            "12:38:04 exec     exit 137 in 900 ms (0 bytes out, 7 err) — a process was killed: the sandbox reached its memory limit"
        );
        let fine = json!({"type": "exec_finished", "ts": "2026-12-02T12:38:04Z", "exit_code": 0,
                          "duration_ms": 5, "stdout_bytes": 3, "stderr_bytes": 0, "timed_out": false});
        assert!(!render(&fine).unwrap().contains("memory"));
    }
}

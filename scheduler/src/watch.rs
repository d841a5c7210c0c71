//! Renders a task's events as readable lines for `shoal watch`.

use serde_json::Value;

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
            format!(
                "state    {} → {} (attempt {}){reason}",
                str_of(event, "from"),
                str_of(event, "to"),
                u64_of(event, "attempt")
            )
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

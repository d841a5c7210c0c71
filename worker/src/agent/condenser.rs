//! The condenser: when the history grows past a threshold (or the model's
//! context window overflows), the middle is summarised by the LLM. The
//! system prompt and the task stay, the recent tail stays, and the cut never
//! separates a tool call from its result (the tail starts at an assistant turn).

use super::llm::{ChatMessage, LlmClient, LlmError, LlmRequest, LlmResponse, Role};
use tokio_util::sync::CancellationToken;

/// Messages at the start that always stay (system prompt, task).
const HEAD: usize = 2;
/// Characters of each message shown to the summariser.
const PER_MESSAGE: usize = 2_000;
/// Messages at the end kept as they are when condensing.
pub const KEEP_TAIL: usize = 6;
/// The shortest tail: the last call and its result (after a context overflow
/// the usual tail did not help).
pub const MIN_TAIL: usize = 2;

/// Size of a history in characters.
pub fn size(messages: &[ChatMessage]) -> usize {
    messages
        .iter()
        .map(|m| {
            m.content.len()
                + m.tool_calls
                    .iter()
                    .map(|c| c.arguments.len() + c.name.len())
                    .sum::<usize>()
        })
        .sum()
}

/// The range of messages to summarise, if any: after the head, before a tail
/// of at least `keep_tail` messages that starts at an assistant turn.
pub fn middle(messages: &[ChatMessage], keep_tail: usize) -> Option<std::ops::Range<usize>> {
    if messages.len() <= HEAD + keep_tail {
        return None;
    }
    let mut start = messages.len() - keep_tail;
    while start > HEAD && messages[start].role != Role::Assistant {
        start -= 1;
    }
    (start > HEAD + 1).then_some(HEAD..start)
}

fn render(messages: &[ChatMessage]) -> String {
    let mut text = String::new();
    for message in messages {
        let who = match message.role {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool result",
        };
        let content: String = message.content.chars().take(PER_MESSAGE).collect();
        text.push_str(&format!("[{who}] {content}\n"));
        for call in &message.tool_calls {
            let args: String = call.arguments.chars().take(PER_MESSAGE).collect();
            text.push_str(&format!("[tool call] {}({args})\n", call.name));
        }
    }
    text
}

/// A condensed history and what it cost.
pub struct Condensed {
    pub messages: Vec<ChatMessage>,
    pub summary: String,
    pub forgotten: usize,
    /// The summarising call (for cost accounting).
    pub response: LlmResponse,
}

/// Summarises `range` of `messages` with `llm`.
pub async fn condense(
    llm: &dyn LlmClient,
    messages: &[ChatMessage],
    range: std::ops::Range<usize>,
    cancel: &CancellationToken,
) -> Result<Condensed, LlmError> {
    let request = LlmRequest {
        messages: vec![
            ChatMessage::system(
                "You summarise the work history of a coding agent so it can continue without the full log. \
                 Keep: what was done, files created or changed (paths), commands run and their key results, \
                 errors met and what fixed them, and what remains to do. Be concise and factual.",
            ),
            ChatMessage::user(format!(
                "Summarise this part of the agent's history:\n\n{}",
                render(&messages[range.clone()])
            )),
        ],
        tools: Vec::new(),
        max_tokens: Some(1024),
        temperature: Some(0.0),
        response_format: None,
    };
    let response = llm.complete(&request, cancel).await?;
    let summary = response.message.content.trim().to_owned();
    let mut condensed = messages[..range.start].to_vec();
    // Folded into the task message so roles keep alternating.
    if let Some(task) = condensed.last_mut() {
        task.content.push_str(&format!(
            "\n\n[Summary of earlier steps, condensed to save space]\n{summary}"
        ));
    }
    condensed.extend_from_slice(&messages[range.end..]);
    Ok(Condensed {
        messages: condensed,
        summary,
        forgotten: range.len(),
        response,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::llm::ToolCall;

    fn call(id: &str) -> ChatMessage {
        ChatMessage {
            role: Role::Assistant,
            content: String::new(),
            tool_calls: vec![ToolCall {
                id: id.into(),
                name: "terminal".into(),
                arguments: "{}".into(),
            }],
            tool_call_id: None,
            thinking: Vec::new(),
        }
    }

    #[test]
    fn the_cut_never_separates_a_call_from_its_result() {
        let mut messages = vec![ChatMessage::system("s"), ChatMessage::user("task")];
        for i in 0..10 {
            messages.push(call(&i.to_string()));
            messages.push(ChatMessage::tool_result(i.to_string(), "out"));
        }
        // keep_tail = 3 would start at a tool result: the cut moves back.
        let range = middle(&messages, 3).unwrap();
        assert_eq!(messages[range.end].role, Role::Assistant);
        assert_eq!(range.start, 2);
        assert!(messages.len() - range.end >= 3);
        // Too short to condense.
        assert!(middle(&messages[..5], 3).is_none());
    }
}

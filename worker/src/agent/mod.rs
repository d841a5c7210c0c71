//! The agent: an OpenHands-style conversation loop in which an LLM calls
//! tools that execute inside the task's sandbox.

pub mod checkpoint;
pub mod condenser;
pub mod conversation;
pub mod llm;
pub mod prompt;
pub mod secrets;
pub mod sink;
pub mod spend_guard;
pub mod stuck;
pub mod tools;

pub use conversation::{AgentConfig, Billing, Conversation, Ended, Outcome};

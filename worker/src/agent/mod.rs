//! The agent: an OpenHands-style conversation loop in which an LLM calls
//! tools that execute inside the task's sandbox.

pub mod llm;

//! A 2xx body from the Anthropic Messages API, turned
//! into the response the agent loop sees. Errors are fine; a panic is a bug.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_worker::agent::llm::anthropic::parse_response_body;
use shoal_worker::agent::llm::Role;

fuzz_target!(|data: &[u8]| {
    if let Ok(response) = parse_response_body(data) {
        assert_eq!(response.message.role, Role::Assistant);
        assert!(response.message.tool_calls.iter().all(|c| !c.id.is_empty()));
    }
});

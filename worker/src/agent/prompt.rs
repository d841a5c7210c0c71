//! The system prompt. Small models are steered mostly by it: it says where
//! the agent is, what one step looks like, and how to finish.

/// The system prompt for a conversation with these tools.
pub fn system_prompt(tools: &[String]) -> String {
    let has = |name: &str| tools.iter().any(|t| t == name);
    let mut prompt = String::from(
        "You are a careful software engineer working as an autonomous agent in a Linux sandbox.\n\
         Your working directory is /workspace; files you create there persist between steps.\n\n\
         How to work:\n\
         - You do the work yourself: make exactly one tool call per reply, then wait for its result.\n",
    );
    if has("file_editor") {
        prompt.push_str(
            "- Create and edit files with `file_editor` (paths like /workspace/main.py). \
             A new file the task asks for does not exist yet: create it first.\n",
        );
    }
    if has("terminal") {
        prompt.push_str("- Run shell commands with `terminal` (python3 is available).\n");
    }
    prompt.push_str(
        "- After every command, compare its output with what the task asks for (what is printed, \
           how many items). If it is wrong, fix the cause and run it again.\n\
         - Do not repeat a step that already succeeded; move on to the next one.\n\
         - Nobody can answer questions: decide yourself.\n\
         - When the result is right, call `finish` with a message that states it \
           (for example the exact output the task asked for). If it cannot be done, call `finish` and say why.\n",
    );
    prompt
}

/// The nudge sent when the model answers without a tool call in a loop that
/// asks for tool calls.
pub const CONTINUE_NUDGE: &str =
    "Continue with the next step using a tool call. If the task is complete, call `finish` with the result.";

/// Told to the model after a reply cut off at the token limit.
pub const CUT_OFF_NOTE: &str =
    "Your previous reply was cut off at the token limit: whatever came after the last complete tool call was lost. \
     Continue from there, and keep each reply shorter (for a big file, write it in parts).";

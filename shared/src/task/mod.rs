//! The task model: what a user submits ([`TaskSpec`]), how it is identified
//! ([`TaskId`]), the state machine it moves through ([`TaskState`]) and the record
//! kept for it ([`TaskRecord`]).

mod id;
mod record;
mod spec;
mod state;
mod validate;

pub use id::{ParseTaskIdError, TaskId};
pub use record::{
    format_time, AgentResult, ExecResult, RecordError, TaskRecord, TaskRef, TaskResult,
};
pub use spec::{
    AgentLimits, AgentSpec, ExecSpec, FileSpec, Language, Priority, RepoSpec, SpecLimits, TaskKind,
    TaskSpec,
};
pub use state::TaskState;
pub use validate::{kernel_limits, workspace_path_components, SpecError, WorkspacePathError};

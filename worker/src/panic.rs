//! Panics caught at a boundary (a task run, a sandbox create) are turned
//! into errors; this reads what they said.

/// The message of a caught panic's payload.
pub fn message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

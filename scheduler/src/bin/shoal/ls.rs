//! `shoal ls`: find tasks, newest first.

use chrono::{DateTime, Utc};
use shoal_scheduler::client::{Client, ListQuery};
use shoal_shared::store::TaskPage;
use shoal_shared::task::{TaskId, TaskRecord, TaskState};

use super::{parse_label, print_json, Output};

/// The most tasks one request asks for (the API's page cap).
const PAGE: usize = 1000;

#[derive(clap::Args)]
pub struct LsArgs {
    /// Only tasks in these states (repeat, or comma-separated: queued,running).
    #[arg(long = "state", value_delimiter = ',')]
    states: Vec<TaskState>,
    /// Only this tenant's tasks (a token lists its own tenant only).
    #[arg(long)]
    tenant: Option<String>,
    /// Only tasks of this kind: exec or agent.
    #[arg(long)]
    kind: Option<String>,
    /// Only tasks with this label, as key=value (repeat: all must match).
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Show at most this many tasks.
    #[arg(long, default_value_t = 50, conflicts_with = "all")]
    limit: usize,
    /// Show every matching task, page after page.
    #[arg(long)]
    all: bool,
    /// Continue a listing: the cursor an earlier `shoal ls` printed.
    #[arg(long)]
    cursor: Option<TaskId>,
}

pub async fn ls(client: &Client, output: Output, args: LsArgs) -> anyhow::Result<()> {
    if args.limit == 0 && !args.all {
        anyhow::bail!("--limit must be at least 1 (or use --all)");
    }
    let mut query = ListQuery {
        states: args.states,
        tenant: args.tenant,
        kind: args.kind,
        labels: args.labels,
        limit: None,
        cursor: args.cursor,
    };
    let mut shown = TaskPage::default();
    loop {
        let wanted = if args.all {
            PAGE
        } else {
            (args.limit - shown.tasks.len()).min(PAGE)
        };
        query.limit = Some(wanted);
        let page = client.list(&query).await?;
        shown.tasks.extend(page.tasks);
        shown.next_cursor = page.next_cursor;
        let done = !args.all && shown.tasks.len() >= args.limit;
        match shown.next_cursor {
            Some(cursor) if !done => query.cursor = Some(cursor),
            _ => break,
        }
    }
    match output {
        Output::Json => print_json(&shown),
        Output::Text => {
            print!("{}", render(&shown.tasks, Utc::now()));
            if let Some(cursor) = shown.next_cursor {
                eprintln!("(more: shoal ls --cursor {cursor} with the same filters, or --all)");
            } else if shown.tasks.is_empty() {
                eprintln!("(no tasks match)");
            }
            Ok(())
        }
    }
}

/// The listing as a table for people.
fn render(tasks: &[TaskRecord], now: DateTime<Utc>) -> String {
    let mut rows = vec![[
        "ID".to_owned(),
        "STATE".to_owned(),
        "KIND".to_owned(),
        "TENANT".to_owned(),
        "TRIES".to_owned(),
        "CREATED".to_owned(),
        "LABELS".to_owned(),
    ]];
    for task in tasks {
        let labels: Vec<String> = task
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        rows.push([
            task.id.to_string(),
            task.state.to_string(),
            task.kind.clone(),
            task.tenant.clone(),
            format!("{}/{}", task.attempts, task.max_attempts),
            ago(now, task.created_at),
            labels.join(","),
        ]);
    }
    let mut widths = [0usize; 7];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    for row in &rows {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(widths) {
            line.push_str(&format!("{cell:<width$}  "));
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

/// "12s ago", "5m ago", "3h ago", "2d ago".
fn ago(now: DateTime<Utc>, then: DateTime<Utc>) -> String {
    let seconds = (now - then).num_seconds().max(0);
    match seconds {
        0..60 => format!("{seconds}s ago"),
        60..3600 => format!("{}m ago", seconds / 60),
        3600..86_400 => format!("{}h ago", seconds / 3600),
        _ => format!("{}d ago", seconds / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_shared::task::TaskSpec;

    #[test]
    fn the_table_aligns_columns_and_shows_labels() {
        let now = Utc::now();
        let mut spec = TaskSpec::exec("true");
        spec.labels.insert("team".into(), "search".into());
        let a = TaskRecord::queued(
            TaskId::new(),
            &spec,
            "acme",
            now - chrono::Duration::seconds(90),
        );
        let b = TaskRecord::queued(TaskId::new(), &TaskSpec::exec("true"), "b", now);
        let table = render(&[a.clone(), b], now);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("ID "));
        assert!(lines[1].contains(&a.id.to_string()));
        assert!(lines[1].contains("1m ago"));
        assert!(lines[1].ends_with("team=search"));
        // Every row's STATE column starts at the same offset.
        let column = lines[0].find("STATE").unwrap();
        assert_eq!(&lines[1][column..column + 6], "queued");
        assert_eq!(&lines[2][column..column + 6], "queued");
    }
}

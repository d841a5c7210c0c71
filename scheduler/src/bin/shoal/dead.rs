//! `shoal dead`: dead letters — list, show, replay as a new task, purge.

use std::io::{BufRead, IsTerminal, Write};

use shoal_scheduler::client::{Client, DeadQuery};
use shoal_shared::store::dead_letters::DeadLetter;

use super::{print_json, Output};

#[derive(clap::Subcommand)]
pub enum DeadCommand {
    /// List dead letters, newest first.
    Ls {
        /// Only this reason (attempts_exhausted, malformed, too_large, ...).
        #[arg(long)]
        reason: Option<String>,
        /// Only this tenant's (a token lists its own tenant only).
        #[arg(long)]
        tenant: Option<String>,
        /// Show at most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Continue a listing: the cursor an earlier `shoal dead ls` printed.
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Show one dead letter: why it died, and its spec.
    Show {
        /// The dead letter's id, or the id of the task it names.
        id: String,
    },
    /// Run a dead letter's spec again as a new task (labelled replay_of).
    Replay(BulkArgs),
    /// Remove dead letters without running them.
    Purge(BulkArgs),
}

#[derive(clap::Args)]
pub struct BulkArgs {
    /// The dead letter's id, or the id of the task it names.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    id: Option<String>,
    /// Every dead letter with --reason (newest first, up to --limit).
    #[arg(long, requires = "reason")]
    all: bool,
    /// With --all: the reason of the dead letters to act on.
    #[arg(long, requires = "all")]
    reason: Option<String>,
    /// With --all: only this tenant's.
    #[arg(long, requires = "all")]
    tenant: Option<String>,
    /// With --all: at most this many.
    #[arg(long, requires = "all", default_value_t = 100)]
    limit: usize,
    /// With --all: do not ask for confirmation (needed without a terminal).
    #[arg(long, short = 'y')]
    yes: bool,
}

pub async fn dead(client: &Client, output: Output, command: DeadCommand) -> anyhow::Result<()> {
    match command {
        DeadCommand::Ls {
            reason,
            tenant,
            limit,
            cursor,
        } => {
            if limit == 0 {
                anyhow::bail!("--limit must be at least 1");
            }
            let page = client
                .dead_list(&DeadQuery {
                    reason,
                    tenant,
                    limit: Some(limit.min(500)),
                    cursor,
                })
                .await?;
            match output {
                Output::Json => print_json(&page),
                Output::Text => {
                    print!("{}", render(&page.dead));
                    if let Some(cursor) = page.next_cursor {
                        eprintln!("(more: shoal dead ls --cursor {cursor} with the same filters)");
                    } else if page.dead.is_empty() {
                        eprintln!("(no dead letters match)");
                    }
                    Ok(())
                }
            }
        }
        DeadCommand::Show { id } => {
            let letter = client.dead_get(&id).await?;
            match output {
                Output::Json => print_json(&letter),
                Output::Text => {
                    print!("{}", describe(&letter));
                    Ok(())
                }
            }
        }
        DeadCommand::Replay(args) => match args.id {
            Some(id) => {
                let replayed = client.dead_replay(&id).await?;
                match output {
                    Output::Json => print_json(&replayed),
                    Output::Text => {
                        println!(
                            "replayed {} as task {} ({})",
                            replayed.dead_id, replayed.task.id, replayed.task.state
                        );
                        Ok(())
                    }
                }
            }
            None => {
                let reason = args.reason.unwrap_or_default();
                confirm(
                    &format!(
                        "replay every dead letter with reason {reason:?} (up to {})",
                        args.limit
                    ),
                    args.yes,
                )?;
                let done = client
                    .dead_replay_all(&reason, args.tenant.as_deref(), Some(args.limit))
                    .await?;
                match output {
                    Output::Json => print_json(&done),
                    Output::Text => {
                        for r in &done.replayed {
                            println!("replayed {} as task {}", r.dead_id, r.task.id);
                        }
                        for s in &done.skipped {
                            println!("skipped {}: {}", s.dead_id, s.detail);
                        }
                        println!(
                            "{} replayed, {} skipped",
                            done.replayed.len(),
                            done.skipped.len()
                        );
                        Ok(())
                    }
                }
            }
        },
        DeadCommand::Purge(args) => match args.id {
            Some(id) => {
                client.dead_purge(&id).await?;
                match output {
                    Output::Json => print_json(&serde_json::json!({ "purged": [id] })),
                    Output::Text => {
                        println!("purged {id}");
                        Ok(())
                    }
                }
            }
            None => {
                let reason = args.reason.unwrap_or_default();
                confirm(
                    &format!(
                        "purge every dead letter with reason {reason:?} (up to {})",
                        args.limit
                    ),
                    args.yes,
                )?;
                let done = client
                    .dead_purge_all(&reason, args.tenant.as_deref(), Some(args.limit))
                    .await?;
                match output {
                    Output::Json => print_json(&done),
                    Output::Text => {
                        println!("{} purged", done.purged.len());
                        Ok(())
                    }
                }
            }
        },
    }
}

/// Asks on the terminal unless `yes`; refuses without a terminal.
fn confirm(what: &str, yes: bool) -> anyhow::Result<()> {
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        anyhow::bail!("refusing to {what} without confirmation: no terminal to ask on; pass --yes");
    }
    eprint!("{what}? [y/N] ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    if matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes") {
        Ok(())
    } else {
        anyhow::bail!("not confirmed; nothing done")
    }
}

/// The listing as a table for people.
fn render(letters: &[DeadLetter]) -> String {
    let mut rows = vec![[
        "ID".to_owned(),
        "TASK".to_owned(),
        "TENANT".to_owned(),
        "REASON".to_owned(),
        "TRIES".to_owned(),
        "DIED".to_owned(),
        "ERROR".to_owned(),
    ]];
    for letter in letters {
        let error: String = letter
            .error
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .take(60)
            .collect();
        rows.push([
            letter.id.clone(),
            letter
                .task_id
                .map(|t| t.to_string())
                .unwrap_or_else(|| "-".into()),
            letter.tenant.clone().unwrap_or_else(|| "-".into()),
            letter.reason.clone(),
            letter.attempts.to_string(),
            letter.dead_at.clone(),
            error,
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

/// One dead letter for people.
fn describe(letter: &DeadLetter) -> String {
    let mut text = String::new();
    let mut line = |k: &str, v: &str| text.push_str(&format!("{k:<9} {v}\n"));
    line("id", &letter.id);
    line(
        "task",
        &letter
            .task_id
            .map(|t| t.to_string())
            .unwrap_or_else(|| "-".into()),
    );
    line("tenant", letter.tenant.as_deref().unwrap_or("-"));
    line("reason", &letter.reason);
    line("attempts", &letter.attempts.to_string());
    line("died", &letter.dead_at);
    line("worker", &letter.worker);
    line("error", &letter.error);
    match &letter.spec {
        Some(spec) => {
            let spec = serde_json::to_string_pretty(spec).unwrap_or_default();
            line("spec", &spec);
            line("replay", &format!("shoal dead replay {}", letter.id));
        }
        None => {
            line("body", &letter.body_preview);
            line(
                "replay",
                &format!(
                    "not possible (no readable spec); remove with shoal dead purge {}",
                    letter.id
                ),
            );
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(spec: bool) -> DeadLetter {
        DeadLetter {
            id: "1733222222222-0".into(),
            task_id: None,
            tenant: None,
            reason: "malformed".into(),
            error: "not json\nmore".into(),
            attempts: 0,
            worker: "w1".into(),
            dead_at: "2026-12-03T10:00:00Z".into(),
            body_preview: "garbage".into(),
            spec: spec.then(|| shoal_shared::task::TaskSpec::exec("true")),
        }
    }

    #[test]
    fn the_table_shows_one_line_per_dead_letter() {
        let table = render(&[letter(false)]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("ID "));
        assert!(lines[1].contains("malformed"));
        assert!(lines[1].ends_with("not json"));
    }

    #[test]
    fn show_says_what_to_do_with_a_dead_letter() {
        assert!(describe(&letter(false)).contains("shoal dead purge 1733222222222-0"));
        assert!(describe(&letter(true)).contains("shoal dead replay 1733222222222-0"));
    }
}

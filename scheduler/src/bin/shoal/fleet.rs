//! `shoal workers` and `shoal top`: the fleet from the workers' heartbeats
//! (`GET /v1/workers`, `GET /v1/fleet`; docs/adr/0029).

use std::io::{IsTerminal, Read, Write};
use std::time::Duration;

use shoal_scheduler::client::{Client, ClientError};
use shoal_scheduler::fleet::{render_fleet, render_workers, FleetSummary, WorkerList};

use super::{print_json, Output};

#[derive(clap::Args)]
pub struct TopArgs {
    /// Seconds between refreshes.
    #[arg(long, default_value_t = 2.0, value_parser = parse_interval)]
    interval: f64,
    /// Print one frame and exit (a script's snapshot).
    #[arg(long)]
    once: bool,
}

fn parse_interval(text: &str) -> Result<f64, String> {
    let seconds: f64 = text
        .parse()
        .map_err(|_| format!("expected seconds, like 2 or 0.5, got {text:?}"))?;
    if !(0.1..=3600.0).contains(&seconds) {
        return Err("must be between 0.1 and 3600 seconds".to_owned());
    }
    Ok(seconds)
}

/// `shoal workers`: a table, or the API's JSON.
pub async fn workers(client: &Client, output: Output) -> anyhow::Result<()> {
    let list = client.workers().await?;
    match output {
        Output::Json => print_json(&list),
        Output::Text => {
            print!("{}", render_workers(&list));
            Ok(())
        }
    }
}

/// One frame's data: the summary and the workers.
#[derive(serde::Serialize)]
struct Frame {
    fleet: FleetSummary,
    workers: WorkerList,
}

async fn frame(client: &Client) -> Result<Frame, ClientError> {
    let (fleet, workers) = tokio::join!(client.fleet(), client.workers());
    Ok(Frame {
        fleet: fleet?,
        workers: workers?,
    })
}

/// `shoal top`: a frame every `--interval` seconds until q or Ctrl-C (on a
/// terminal: the screen is redrawn); `--once`: one frame. `-o json`: one
/// JSON object (`{"fleet": ..., "workers": ...}`) per line and refresh. An
/// unreachable scheduler is reported and tried again at the next refresh.
pub async fn top(client: &Client, output: Output, args: TopArgs) -> anyhow::Result<()> {
    if args.once {
        let frame = frame(client).await?;
        return print_frame(output, &frame, false);
    }
    let interactive =
        output == Output::Text && std::io::stdout().is_terminal() && std::io::stdin().is_terminal();
    let keys = if interactive {
        KeyReader::start()
    } else {
        None
    };
    let interval = Duration::from_secs_f64(args.interval);
    // One future for the whole loop: a Ctrl-C during a fetch is not lost.
    let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
    let result = async {
        loop {
            match frame(client).await {
                Ok(frame) => print_frame(output, &frame, interactive)?,
                Err(error) => report(output, interactive, &error)?,
            }
            let quit = async {
                match &keys {
                    Some(keys) => keys.quit().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = &mut ctrl_c => return Ok(()),
                () = quit => return Ok(()),
            }
        }
    }
    .await;
    drop(keys);
    result
}

fn print_frame(output: Output, frame: &Frame, redraw: bool) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match output {
        Output::Json => writeln!(stdout, "{}", serde_json::to_string(frame)?)?,
        Output::Text => {
            if redraw {
                // Home, draw, clear what the last frame left below.
                write!(stdout, "\x1b[H\x1b[2J")?;
                write!(
                    stdout,
                    "{}",
                    render_fleet(&frame.fleet, &frame.workers).replace('\n', "\r\n")
                )?;
                write!(stdout, "\r\n(q or Ctrl-C quits)")?;
            } else {
                write!(stdout, "{}", render_fleet(&frame.fleet, &frame.workers))?;
                writeln!(stdout)?;
            }
        }
    }
    stdout.flush()?;
    Ok(())
}

/// The scheduler did not answer: said where the frame would be (text) or
/// on stderr (json, so stdout stays JSON lines); top keeps trying.
fn report(output: Output, redraw: bool, error: &ClientError) -> anyhow::Result<()> {
    let message = format!("shoal top: {error}; retrying");
    if output == Output::Text && redraw {
        let mut stdout = std::io::stdout().lock();
        write!(stdout, "\x1b[H\x1b[2J{message}\r\n(q or Ctrl-C quits)")?;
        stdout.flush()?;
    } else {
        eprintln!("{message}");
    }
    Ok(())
}

/// Reads single keys from a terminal put in non-canonical mode (`stty`),
/// restored when dropped.
struct KeyReader {
    saved: String,
    quit: tokio::sync::watch::Receiver<bool>,
}

impl KeyReader {
    /// `None` when the terminal's mode cannot be read or set (then only
    /// Ctrl-C quits).
    fn start() -> Option<Self> {
        let saved = stty(&["-g"])?;
        stty(&["-icanon", "-echo", "min", "1"])?;
        let (tx, quit) = tokio::sync::watch::channel(false);
        std::thread::spawn(move || {
            let mut stdin = std::io::stdin();
            let mut byte = [0u8; 1];
            while let Ok(1) = stdin.read(&mut byte) {
                if matches!(byte[0], b'q' | b'Q') {
                    let _ = tx.send(true);
                    return;
                }
            }
        });
        Some(Self {
            saved: saved.trim().to_owned(),
            quit,
        })
    }

    async fn quit(&self) {
        let mut quit = self.quit.clone();
        let _ = quit.wait_for(|q| *q).await;
    }
}

impl Drop for KeyReader {
    fn drop(&mut self) {
        let _ = stty(&[self.saved.as_str()]);
        println!();
    }
}

/// Runs `stty` on our terminal; its output, or `None` when it failed.
fn stty(args: &[&str]) -> Option<String> {
    let output = std::process::Command::new("stty")
        .args(args)
        .stdin(std::process::Stdio::inherit())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::parse_interval;

    #[test]
    fn the_interval_is_bounded() {
        assert_eq!(parse_interval("0.5"), Ok(0.5));
        assert!(parse_interval("0").is_err());
        assert!(parse_interval("soon").is_err());
    }
}

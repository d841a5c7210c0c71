//! Issue 12, part 3: what an idle fleet costs the broker, and how many broker
//! operations one submission causes, at 64, 256 and 1,024 idle slots (4
//! worker processes on this machine), for the build under test ("after") and,
//! with `--idle-before DIR`, for the `shoal-worker`/`shoal-scheduler`
//! binaries in DIR ("before", e.g. a build of the commit before ADR 0031).
//!
//! Broker CPU is the RabbitMQ node's `beam.smp` utime+stime from `/proc`
//! (the pid from the services script's pid file) over a fixed window; it is
//! the whole node's, so other users of the same broker add noise. Operations
//! are RabbitMQ's own counters for this run's namespace (management API,
//! refreshed about every 5 s): `basic.get` (empty or not) on the work queues,
//! and publish/deliver/ack on the wake queue. The doorbell of the old design
//! goes to private auto-delete queues that the namespace query cannot name,
//! so its fan-out is counted from `/api/overview` (broker-wide) too.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use shoal_scheduler::client::Client;
use shoal_shared::task::{TaskSpec, TaskState};
use shoal_shared::Priority;
use shoal_tests::broker_stats::{broker_pid, process_cpu, Management, Ops};

use crate::Args;

/// Idle slots in all, spread over [`WORKERS`] worker processes.
const FLEETS: [usize; 3] = [64, 256, 1024];
const WORKERS: usize = 4;
/// The idle measurement window.
const WINDOW: Duration = Duration::from_secs(20);
/// Submissions (one at a time, each waited for) in the per-submission phase.
const SUBMISSIONS: usize = 10;
/// Longer than the management database's refresh interval (5 s).
const STATS_LAG: Duration = Duration::from_secs(6);

struct Side {
    name: &'static str,
    dir: PathBuf,
}

struct Row {
    side: &'static str,
    slots: usize,
    cpu_ms_per_s: Option<f64>,
    idle_gets_per_s: f64,
    idle_overview_per_s: f64,
    per_submission: f64,
    per_submission_overview: f64,
}

pub async fn section(args: &Args, report: &mut String) -> anyhow::Result<()> {
    let mgmt = Management::from_env();
    let pid = broker_pid();
    let here = std::env::current_exe()?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let mut sides = vec![Side {
        name: "after",
        dir: here,
    }];
    if let Some(dir) = &args.idle_before {
        sides.insert(
            0,
            Side {
                name: "before",
                dir: dir.clone(),
            },
        );
    }
    let mut rows = Vec::new();
    for slots in FLEETS {
        for side in &sides {
            eprintln!("idle: {} with {slots} slots", side.name);
            rows.push(measure(side, slots, &mgmt, pid).await?);
        }
    }

    writeln!(report, "## Idle fleet: broker cost (issue 12, ADR 0031)\n")?;
    writeln!(report, "{} worker processes on this machine share the slots; nothing runs during the {} s idle window. Broker CPU is the RabbitMQ node's utime+stime over the window (ms of CPU per second; the whole node, so other users of the broker add noise); gets are `basic.get` calls on this run's work queues (management API counters); overview is every publish/get/get_empty/deliver/ack of the whole broker. Per submission: {SUBMISSIONS} single `true` tasks one after another, each waited for; the broker operations of that phase minus the idle rate over the same time, divided by {SUBMISSIONS}. `before` = the binaries given with `--idle-before` (ADR 0001: per-slot backoff to 200 ms, doorbell fanout), `after` = this build (ADR 0031).\n", WORKERS, WINDOW.as_secs())?;
    writeln!(report, "| side | idle slots | broker CPU ms/s | work-queue gets/s | broker ops/s (overview) | ops per submission (namespace) | ops per submission (overview) |")?;
    writeln!(report, "|---|---:|---:|---:|---:|---:|---:|")?;
    for row in &rows {
        writeln!(
            report,
            "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
            row.side,
            row.slots,
            row.cpu_ms_per_s
                .map(|c| format!("{c:.1}"))
                .unwrap_or_else(|| "n/a".into()),
            row.idle_gets_per_s,
            row.idle_overview_per_s,
            row.per_submission,
            row.per_submission_overview,
        )?;
    }
    writeln!(report)?;
    Ok(())
}

async fn measure(
    side: &Side,
    slots: usize,
    mgmt: &Management,
    pid: Option<u32>,
) -> anyhow::Result<Row> {
    let id = uuid::Uuid::now_v7().simple().to_string();
    let namespace = format!("bench-idle-{}-{}", side.name, &id[id.len() - 8..]);
    let root = std::env::temp_dir().join(format!("shoal-bench-idle-{}", &id[id.len() - 8..]));
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o711)
        .create(&root)?;
    let broker = std::env::var("SHOAL__BROKER__URL")?;
    let redis = std::env::var("SHOAL__REDIS__URL")?;
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
        probe.local_addr()?.port()
    };
    let base = format!(
        "namespace = \"{namespace}\"\nbroker.url = \"{broker}\"\nredis.url = \"{redis}\"\n\
         sandbox.root = \"{}\"\nworker.metrics_listen = \"\"\nworker.drain_timeout_s = 5\n\
         scheduler.listen = \"127.0.0.1:{port}\"\n",
        root.display()
    );
    let mut children = Children(Vec::new());
    let scheduler_config = root.join("scheduler.toml");
    std::fs::write(&scheduler_config, &base)?;
    children
        .0
        .push(spawn(&side.dir.join("shoal-scheduler"), &scheduler_config)?);
    for w in 0..WORKERS {
        let config = root.join(format!("w{w}.toml"));
        std::fs::write(
            &config,
            format!(
                "{base}worker.id = \"idle-{w}\"\nworker.slots = {}\n",
                slots / WORKERS
            ),
        )?;
        children
            .0
            .push(spawn(&side.dir.join("shoal-worker"), &config)?);
    }
    let url = format!("http://127.0.0.1:{port}");
    let client = Client::new(&url, None);
    let work: Vec<String> = Priority::ALL
        .iter()
        .map(|p| format!("{namespace}.work.{}", p.as_str()))
        .collect();
    let mut queues = work.clone();
    queues.push(format!("{namespace}.wake"));

    // Ready: the scheduler answers, and every slot's first gets are counted.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ready = reqwest::get(format!("{url}/readyz"))
            .await
            .map(|r| r.status().is_success())
            .unwrap_or(false);
        let gets = mgmt.queues_ops(&work).await.map(|o| o.gets()).unwrap_or(0);
        if ready && gets >= 3 * slots as u64 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the fleet did not start in 2 min"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Settle past start-up, then the idle window.
    tokio::time::sleep(STATS_LAG).await;
    let cpu0 = pid.and_then(process_cpu);
    let ns0 = mgmt.queues_ops(&work).await.map_err(anyhow::Error::msg)?;
    let all0 = mgmt.overview_ops().await.map_err(anyhow::Error::msg)?;
    let started = Instant::now();
    tokio::time::sleep(WINDOW).await;
    let cpu1 = pid.and_then(process_cpu);
    let ns1 = mgmt.queues_ops(&work).await.map_err(anyhow::Error::msg)?;
    let all1 = mgmt.overview_ops().await.map_err(anyhow::Error::msg)?;
    let window = started.elapsed().as_secs_f64();
    let cpu_ms_per_s = match (cpu0, cpu1) {
        (Some(a), Some(b)) => Some((b - a).as_secs_f64() * 1000.0 / window),
        _ => None,
    };
    let idle_gets_per_s = ns1.since(&ns0).gets() as f64 / window;
    let idle_ns_total_per_s = ns1.since(&ns0).total() as f64 / window;
    let idle_overview_per_s = all1.since(&all0).total() as f64 / window;

    // Submissions, one at a time.
    let sub0 = mgmt.queues_ops(&queues).await.map_err(anyhow::Error::msg)?;
    let suball0 = mgmt.overview_ops().await.map_err(anyhow::Error::msg)?;
    let phase = Instant::now();
    for _ in 0..SUBMISSIONS {
        let task = client.submit(&TaskSpec::exec("true"), None).await?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let record = client.get(&task.id).await?;
            if record.state.is_terminal() {
                anyhow::ensure!(
                    record.state == TaskState::Succeeded,
                    "task {} {}",
                    task.id,
                    record.state
                );
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "task {} never finished", task.id);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    tokio::time::sleep(STATS_LAG).await;
    let sub1 = mgmt.queues_ops(&queues).await.map_err(anyhow::Error::msg)?;
    let suball1 = mgmt.overview_ops().await.map_err(anyhow::Error::msg)?;
    let phase_s = phase.elapsed().as_secs_f64();
    let per = |delta: Ops, idle_per_s: f64| {
        ((delta.total() as f64 - idle_per_s * phase_s) / SUBMISSIONS as f64).max(0.0)
    };
    let per_submission = per(sub1.since(&sub0), idle_ns_total_per_s);
    let per_submission_overview = per(suball1.since(&suball0), idle_overview_per_s);

    children.stop().await;
    teardown(&namespace).await;
    let _ = std::fs::remove_dir_all(&root);
    Ok(Row {
        side: side.name,
        slots,
        cpu_ms_per_s,
        idle_gets_per_s,
        idle_overview_per_s,
        per_submission,
        per_submission_overview,
    })
}

/// The fleet's processes: stopped with SIGTERM by [`Children::stop`], and
/// killed when dropped (a failed measurement leaves nothing running).
struct Children(Vec<std::process::Child>);

impl Children {
    async fn stop(&mut self) {
        for child in &self.0 {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        for child in &mut self.0 {
            let deadline = Instant::now() + Duration::from_secs(60);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn spawn(binary: &Path, config: &Path) -> anyhow::Result<std::process::Child> {
    anyhow::ensure!(binary.exists(), "no binary at {}", binary.display());
    Ok(std::process::Command::new(binary)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?)
}

/// Deletes the namespace's queues and exchanges (both designs') and keys.
async fn teardown(namespace: &str) {
    let Ok(url) = std::env::var("SHOAL__BROKER__URL") else {
        return;
    };
    let broker = shoal_shared::broker::Broker::new(&url, "shoal-bench idle teardown");
    if let Ok(channel) = broker.channel().await {
        let mut queues: Vec<String> = Priority::ALL
            .iter()
            .map(|p| format!("{namespace}.work.{}", p.as_str()))
            .collect();
        for tier in [5, 30, 120, 600] {
            queues.push(format!("{namespace}.retry.{tier}s"));
        }
        queues.push(format!("{namespace}.dead"));
        queues.push(format!("{namespace}.wake"));
        for queue in queues {
            let _ = channel
                .queue_delete(queue.as_str().into(), Default::default())
                .await;
        }
        for exchange in ["work", "retry", "dead", "doorbell"] {
            let _ = channel
                .exchange_delete(
                    format!("{namespace}.{exchange}").as_str().into(),
                    Default::default(),
                )
                .await;
        }
    }
    broker.close().await;
    if let Ok(url) = std::env::var("SHOAL__REDIS__URL") {
        if let Ok(client) = redis::Client::open(url) {
            if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                let keys: Vec<String> = redis::cmd("KEYS")
                    .arg(format!("{namespace}:*"))
                    .query_async(&mut conn)
                    .await
                    .unwrap_or_default();
                if !keys.is_empty() {
                    let _: Result<(), _> = redis::cmd("DEL").arg(keys).query_async(&mut conn).await;
                }
            }
        }
    }
}

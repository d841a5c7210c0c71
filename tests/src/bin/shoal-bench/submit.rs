//! Submit throughput: Shoal's whole submit path against raw lapin
//! publish-with-confirms on the same broker.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::future::try_join_all;
use shoal_scheduler::client::Client;
use shoal_shared::broker::{publish_confirmed, Broker, OutgoingMessage, Topology};
use shoal_shared::settings::Settings;
use shoal_shared::task::{TaskId, TaskSpec};
use shoal_shared::TaskMessage;
use tokio_util::sync::CancellationToken;

use crate::stats::{fmt_rounds, median};
use crate::Args;

/// Issue 2: Shoal's submit path against raw publish-with-confirms.
pub async fn section(args: &Args, report: &mut String) -> anyhow::Result<()> {
    let broker_url =
        std::env::var("SHOAL__BROKER__URL").context("SHOAL__BROKER__URL (run via `make bench`)")?;
    let redis_url =
        std::env::var("SHOAL__REDIS__URL").context("SHOAL__REDIS__URL (run via `make bench`)")?;

    let mut raw = Vec::new();
    let mut shoal = Vec::new();
    let mut raw_cpu = CpuTally::default();
    let mut shoal_cpu = CpuTally::default();
    // One warm-up of each, then alternate so drift hits both sides alike.
    for round in 0..=args.rounds {
        let before = CpuSample::take();
        let r = raw_publish(&broker_url, args).await?;
        let middle = CpuSample::take();
        let s = shoal_submit(&broker_url, &redis_url, args).await?;
        let after = CpuSample::take();
        if round > 0 {
            eprintln!("round {round}: raw {r:.0} msg/s, shoal {s:.0} tasks/s");
            raw.push(r);
            shoal.push(s);
            raw_cpu.add(&before, &middle);
            shoal_cpu.add(&middle, &after);
        }
    }
    let raw_median = median(&mut raw);
    let shoal_median = median(&mut shoal);

    writeln!(report, "## Submit throughput (issue 2)\n")?;
    writeln!(report, "{} tasks per run, batches of {}, {} batches in flight. Both sides publish persistent messages to a quorum queue (same arguments as Shoal's work queues) and wait for publisher confirms. The Shoal side is the whole submit path: HTTP `POST /v1/tasks/batch` -> JSON parse -> validation -> publish with confirms -> Redis records and events (one pipeline per batch) -> response.\n", args.tasks, args.batch, args.concurrency)?;
    writeln!(report, "| path | median | rounds |")?;
    writeln!(report, "|---|---:|---|")?;
    writeln!(
        report,
        "| raw lapin publish + confirms (broker limit) | {raw_median:.0} msg/s | {} |",
        fmt_rounds(&raw)
    )?;
    writeln!(
        report,
        "| Shoal batch submit (HTTP -> confirmed + recorded) | {shoal_median:.0} tasks/s | {} |",
        fmt_rounds(&shoal)
    )?;
    writeln!(
        report,
        "\n**Ratio: Shoal submit reaches {:.0}% of the raw publish rate** (target: at least 70%).\n",
        100.0 * shoal_median / raw_median
    )?;
    let per_k = |cpu: f64| 1000.0 * cpu / (args.tasks * args.rounds) as f64 * 1000.0;
    writeln!(
        report,
        "CPU per 1000 tasks by process, over the measured rounds (ms; {} cores shared by all three):\n",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    )?;
    writeln!(
        report,
        "| path | RabbitMQ (beam) | Redis | bench process (client + scheduler) |"
    )?;
    writeln!(report, "|---|---:|---:|---:|")?;
    for (name, cpu) in [("raw publish", &raw_cpu), ("Shoal submit", &shoal_cpu)] {
        writeln!(
            report,
            "| {name} | {:.0} | {:.0} | {:.0} |",
            per_k(cpu.beam),
            per_k(cpu.redis),
            per_k(cpu.own)
        )?;
    }
    Ok(())
}

fn namespace(tag: &str) -> String {
    let id = uuid::Uuid::now_v7().simple().to_string();
    format!("bench-{tag}-{}", &id[id.len() - 8..])
}

fn bench_settings(broker: &str, redis: &str, namespace: &str) -> anyhow::Result<Settings> {
    Ok(Settings::from_toml(&format!(
        "namespace = \"{namespace}\"\nbroker.url = \"{broker}\"\nredis.url = \"{redis}\"\nscheduler.max_batch = 10000\n"
    ))?)
}

/// The same message bodies Shoal publishes, straight through lapin.
async fn raw_publish(broker_url: &str, args: &Args) -> anyhow::Result<f64> {
    let ns = namespace("raw");
    let topology = Topology::new(&ns, 20, vec![Duration::from_secs(5)]);
    let broker = Broker::new(broker_url, "shoal-bench raw");
    let channel = broker.channel().await?;
    topology.declare(&channel).await?;
    channel.confirm_select(Default::default()).await?;
    let messages: Vec<OutgoingMessage> = (0..args.tasks)
        .map(|i| {
            let message = TaskMessage::new(
                TaskId::new(),
                "bench".into(),
                TaskSpec::exec(format!("echo {i}")),
            );
            OutgoingMessage {
                exchange: topology.work_exchange(),
                routing_key: "normal".into(),
                body: message.to_bytes(),
                message_id: Some(message.id.to_string()),
                headers: Vec::new(),
            }
        })
        .collect();
    let started = Instant::now();
    for wave in messages.chunks(args.batch * args.concurrency) {
        try_join_all(
            wave.chunks(args.batch)
                .map(|batch| publish_confirmed(&channel, batch)),
        )
        .await?;
    }
    let rate = args.tasks as f64 / started.elapsed().as_secs_f64();
    cleanup(&broker, &topology, None).await;
    Ok(rate)
}

/// Shoal's whole submit path through a scheduler running in this process.
async fn shoal_submit(broker_url: &str, redis_url: &str, args: &Args) -> anyhow::Result<f64> {
    let ns = namespace("shoal");
    let settings = bench_settings(broker_url, redis_url, &ns)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(shoal_scheduler::run(
        settings.clone(),
        listener,
        shutdown.clone(),
    ));
    let client = Client::new(&url, None);
    // Wait for readiness.
    let http = reqwest::Client::new();
    for _ in 0..300 {
        if http
            .get(format!("{url}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let specs: Vec<TaskSpec> = (0..args.tasks)
        .map(|i| TaskSpec::exec(format!("echo {i}")))
        .collect();
    let started = Instant::now();
    for wave in specs.chunks(args.batch * args.concurrency) {
        try_join_all(
            wave.chunks(args.batch)
                .map(|batch| client.submit_batch(batch)),
        )
        .await?;
    }
    let rate = args.tasks as f64 / started.elapsed().as_secs_f64();
    shutdown.cancel();
    server.await??;
    let topology = Topology::new(
        &ns,
        settings.broker.delivery_limit,
        settings.broker.retry_tiers.clone(),
    );
    cleanup(
        &Broker::new(broker_url, "shoal-bench cleanup"),
        &topology,
        Some(&settings),
    )
    .await;
    Ok(rate)
}

async fn cleanup(broker: &Broker, topology: &Topology, settings: Option<&Settings>) {
    if let Ok(channel) = broker.channel().await {
        for queue in topology.all_queues() {
            let _ = channel
                .queue_delete(queue.as_str().into(), Default::default())
                .await;
        }
        for exchange in topology.all_exchanges() {
            let _ = channel
                .exchange_delete(exchange.as_str().into(), Default::default())
                .await;
        }
    }
    broker.close().await;
    if let Some(settings) = settings {
        if let Ok(client) = redis::Client::open(settings.redis.url.as_str()) {
            if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                let pattern = format!("{}:*", settings.namespace);
                let mut cursor: u64 = 0;
                loop {
                    let Ok((next, keys)): Result<(u64, Vec<String>), _> = redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut conn)
                        .await
                    else {
                        break;
                    };
                    if !keys.is_empty() {
                        let _: Result<(), _> =
                            redis::cmd("UNLINK").arg(&keys).query_async(&mut conn).await;
                    }
                    if next == 0 {
                        break;
                    }
                    cursor = next;
                }
            }
        }
    }
}

/// CPU seconds used so far by the broker, Redis and this process.
#[derive(Default, Clone, Copy)]
struct CpuSample {
    beam: f64,
    redis: f64,
    own: f64,
}

impl CpuSample {
    fn take() -> Self {
        let pid_of = |file: &str| {
            std::fs::read_to_string(file)
                .ok()
                .map(|p| p.trim().to_owned())
        };
        Self {
            beam: pid_of(".local/rabbitmq/rabbitmq.pid").map_or(0.0, |p| cpu_seconds(&p)),
            redis: pid_of(".local/redis/redis.pid").map_or(0.0, |p| cpu_seconds(&p)),
            own: cpu_seconds("self"),
        }
    }
}

#[derive(Default)]
struct CpuTally {
    beam: f64,
    redis: f64,
    own: f64,
}

impl CpuTally {
    fn add(&mut self, from: &CpuSample, to: &CpuSample) {
        self.beam += to.beam - from.beam;
        self.redis += to.redis - from.redis;
        self.own += to.own - from.own;
    }
}

/// utime + stime of a process from /proc, in seconds (100 ticks per second).
fn cpu_seconds(pid: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let rest = stat.rsplit_once(") ")?.1.to_owned();
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let user: f64 = fields.get(11)?.parse().ok()?;
            let system: f64 = fields.get(12)?.parse().ok()?;
            Some((user + system) / 100.0)
        })
        .unwrap_or(0.0)
}

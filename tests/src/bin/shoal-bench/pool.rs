//! Warm-pool lease latency against cold local sandbox creation, measured in
//! the same run on the same provider.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::registry::Registry;
use shoal_shared::settings::{CgroupMode, Settings};
use shoal_worker::pool::{Pool, PoolMetrics};
use shoal_worker::sandbox::{ExecRequest, LocalProvider, SandboxProvider};
use tokio_util::sync::CancellationToken;

use crate::stats::quantile;
use crate::Args;

/// Cold creates measured one at a time.
const COLD_SAMPLES: usize = 40;
/// Creates measured at the template's create concurrency.
const PARALLEL_CREATES: usize = 40;
/// Commands run in one sandbox, with and without its cgroup.
const EXEC_SAMPLES: usize = 60;
/// Warm leases measured.
const WARM_SAMPLES: usize = 20_000;

/// Issue 3: warm lease vs cold create, and creates per second.
pub async fn section(_args: &Args, report: &mut String) -> anyhow::Result<()> {
    let root = std::env::temp_dir().join(format!("shoal-bench-pool-{}", std::process::id()));
    let settings = Settings::from_toml(&format!(
        "sandbox.root = \"{}\"\n\
         [sandbox.templates.default]\nmin_idle = 0\nmax_total = 256\ncreate_concurrency = 4\n\
         [sandbox.templates.warm]\nmin_idle = 8\nmax_total = 16\nreuse = true\n",
        root.display()
    ))?;
    let provider = Arc::new(LocalProvider::new(settings.sandbox.clone(), "bench").await?);
    let cold_template = settings.sandbox.templates["default"].clone();

    // The same sandboxes without a cgroup each (ADR 0011), to price it.
    let mut plain_settings = settings.sandbox.clone();
    plain_settings.cgroups = CgroupMode::Off;
    let plain = LocalProvider::new(plain_settings, "bench-plain").await?;
    let with_cgroups = provider.has_cgroups();

    // Cold: one create at a time, until the sandbox has run a command;
    // alternating with and without a cgroup so both see the same noise.
    let mut cold = Vec::with_capacity(COLD_SAMPLES);
    let mut cold_plain = Vec::with_capacity(COLD_SAMPLES);
    for _ in 0..COLD_SAMPLES {
        for (provider, samples) in [(&*provider, &mut cold), (&plain, &mut cold_plain)] {
            let started = Instant::now();
            let sandbox = provider.create(&cold_template).await?;
            samples.push(started.elapsed().as_secs_f64());
            let id = sandbox.id().to_owned();
            drop(sandbox);
            provider.destroy(&id).await?;
        }
    }

    // One command (`true`) in an existing sandbox, with and without a cgroup.
    let (mut exec, mut exec_plain) = (Vec::new(), Vec::new());
    let in_cgroup = provider.create(&cold_template).await?;
    let outside = plain.create(&cold_template).await?;
    let request = ExecRequest::new("true", Duration::from_secs(30));
    let cancel = CancellationToken::new();
    for _ in 0..EXEC_SAMPLES {
        for (sandbox, samples) in [(&in_cgroup, &mut exec), (&outside, &mut exec_plain)] {
            let started = Instant::now();
            sandbox.exec(&request, &cancel).await?;
            samples.push(started.elapsed().as_secs_f64());
        }
    }
    let ids = (in_cgroup.id().to_owned(), outside.id().to_owned());
    drop((in_cgroup, outside));
    provider.destroy(&ids.0).await?;
    plain.destroy(&ids.1).await?;

    // Throughput: creates at the template's concurrency.
    let started = Instant::now();
    let creates = (0..PARALLEL_CREATES).map(|_| {
        let provider = provider.clone();
        let template = cold_template.clone();
        async move { provider.create(&template).await }
    });
    let mut created = Vec::new();
    for chunk in futures::future::join_all(creates).await {
        created.push(chunk?);
    }
    let creates_per_s = PARALLEL_CREATES as f64 / started.elapsed().as_secs_f64();
    for sandbox in created {
        let id = sandbox.id().to_owned();
        drop(sandbox);
        provider.destroy(&id).await?;
    }

    // Warm: a pre-filled pool; each lease is a hand-over plus the health
    // check, and the sandbox goes straight back (reuse template, one tenant).
    let mut registry = Registry::default();
    let pool = Pool::start(
        provider.clone(),
        settings.sandbox.templates.values().cloned(),
        PoolMetrics::new(&mut registry),
        Duration::from_secs(3600),
    )
    .await;
    while pool.counts("warm").map(|c| c.0).unwrap_or(0) < 8 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut warm = Vec::with_capacity(WARM_SAMPLES);
    let mut cold_in_warm = 0;
    for _ in 0..WARM_SAMPLES {
        let started = Instant::now();
        let lease = pool.lease("warm", "bench").await?;
        warm.push(started.elapsed().as_secs_f64());
        if !lease.warm {
            cold_in_warm += 1;
        }
        pool.release(lease).await;
    }
    pool.drain(Duration::from_secs(60)).await;
    let _ = std::fs::remove_dir_all(&root);

    let (cold_p50, cold_p99) = (quantile(&mut cold, 0.5), quantile(&mut cold, 0.99));
    let (plain_p50, plain_p99) = (
        quantile(&mut cold_plain, 0.5),
        quantile(&mut cold_plain, 0.99),
    );
    let (exec_p50, exec_plain_p50) = (quantile(&mut exec, 0.5), quantile(&mut exec_plain, 0.5));
    let (warm_p50, warm_p99) = (quantile(&mut warm, 0.5), quantile(&mut warm, 0.99));
    let ms = |s: f64| s * 1000.0;
    writeln!(
        report,
        "## Sandbox lease: warm pool vs cold create (issue 3)\n"
    )?;
    writeln!(report, "Local bubblewrap provider, root, same run. A cold create is everything until the sandbox has run a command: uid claim, size-capped tmpfs mount, directories, metadata, and a `true` through shoal-sandbox-exec + bubblewrap. A warm lease is the pool's hand-over of an idle sandbox including its health check ({WARM_SAMPLES} leases; {cold_in_warm} of them had to create).\n")?;
    writeln!(report, "| measure | p50 | p99 | samples |")?;
    writeln!(report, "|---|---:|---:|---:|")?;
    writeln!(
        report,
        "| cold create | {:.2} ms | {:.2} ms | {COLD_SAMPLES} |",
        ms(cold_p50),
        ms(cold_p99)
    )?;
    writeln!(
        report,
        "| warm lease | {:.4} ms | {:.4} ms | {WARM_SAMPLES} |",
        ms(warm_p50),
        ms(warm_p99)
    )?;
    writeln!(report, "\n**Warm lease is {:.0}× faster than a cold create at p50 ({:.0}× at p99)** (target: at least 100×; warm p99 under 1 ms: {}).", cold_p50 / warm_p50, cold_p99 / warm_p99, if ms(warm_p99) < 1.0 { "yes" } else { "no" })?;
    writeln!(
        report,
        "\nWhat a cgroup per sandbox costs (ADR 0011; this host: {}):\n",
        if with_cgroups {
            "cgroups in use"
        } else {
            "NO cgroups, both rows are the same path"
        }
    )?;
    writeln!(
        report,
        "| measure | with cgroup p50 | without p50 | ratio |"
    )?;
    writeln!(report, "|---|---:|---:|---:|")?;
    writeln!(
        report,
        "| cold create | {:.2} ms (p99 {:.2}) | {:.2} ms (p99 {:.2}) | {:.2}× |",
        ms(cold_p50),
        ms(cold_p99),
        ms(plain_p50),
        ms(plain_p99),
        cold_p50 / plain_p50
    )?;
    writeln!(
        report,
        "| exec `true` | {:.2} ms | {:.2} ms | {:.2}× |",
        ms(exec_p50),
        ms(exec_plain_p50),
        exec_p50 / exec_plain_p50
    )?;
    writeln!(report, "\nCreates per second with 4 in flight: **{creates_per_s:.0}/s** ({PARALLEL_CREATES} creates). Daytona advertises ~90 ms per creation.\n")?;
    Ok(())
}

//! The warm pool over the real local provider.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::registry::Registry;
use shoal_shared::settings::Settings;
use shoal_worker::pool::{Pool, PoolError, PoolMetrics};
use shoal_worker::sandbox::{LocalProvider, SandboxProvider};

struct Fixture {
    pool: Pool,
    provider: Arc<LocalProvider>,
    settings: Settings,
}

async fn fixture(name: &str, template_toml: &str) -> Fixture {
    let id = uuid::Uuid::now_v7().simple().to_string();
    let root = std::env::temp_dir()
        .join("shoal-test-sandboxes")
        .join(format!("pool-{name}-{}", &id[id.len() - 8..]));
    let settings = Settings::from_toml(&format!(
        "sandbox.root = \"{}\"\n[sandbox.templates.default]\nworkspace_mb = 16\ntmp_mb = 8\n{template_toml}\n",
        root.display()
    ))
    .expect("settings");
    let provider = Arc::new(
        LocalProvider::new(settings.sandbox.clone(), name)
            .await
            .expect("provider"),
    );
    let mut registry = Registry::default();
    let pool = Pool::start(
        provider.clone(),
        settings.sandbox.templates.values().cloned(),
        PoolMetrics::new(&mut registry),
        Duration::from_secs(3600),
    )
    .await;
    Fixture {
        pool,
        provider,
        settings,
    }
}

impl Fixture {
    async fn wait_idle(&self, idle: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (now, _, _) = self.pool.counts("default").expect("template");
            if now == idle {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "idle stayed at {now}, expected {idle}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn owned(&self) -> usize {
        self.provider.list_owned().await.expect("list").len()
    }

    async fn finish(self) {
        self.pool.drain(Duration::from_secs(30)).await;
        assert_eq!(self.owned().await, 0, "sandboxes left after drain");
        let _ = std::fs::remove_dir_all(&self.settings.sandbox.root);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_warm_returns_are_destroyed_and_the_pool_refills() {
    let f = fixture("refill", "min_idle = 2\nmax_total = 4").await;
    f.wait_idle(2).await;
    let lease = f.pool.lease("default", "t1").await.expect("lease");
    assert!(lease.warm, "a pre-warmed pool serves from idle");
    assert!(
        lease.waited < Duration::from_millis(50),
        "warm lease took {:?}",
        lease.waited
    );
    let id = lease.sandbox().id().to_owned();
    // The pool refills to min_idle behind the lease.
    f.wait_idle(2).await;
    assert_eq!(f.pool.counts("default").expect("counts").1, 1);
    f.pool.release(lease).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while f
        .provider
        .list_owned()
        .await
        .expect("list")
        .iter()
        .any(|s| s.id == id)
    {
        assert!(
            Instant::now() < deadline,
            "a returned sandbox was not destroyed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(f.owned().await, 2);
    f.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_total_holds_under_a_burst_and_waiters_get_freed_sandboxes() {
    let f = fixture(
        "burst",
        "min_idle = 0\nmax_total = 3\ncreate_concurrency = 2\nlease_timeout_s = 2",
    )
    .await;
    let pool = f.pool.clone();
    let burst = (0..6).map(|i| {
        let pool = pool.clone();
        async move { pool.lease("default", &format!("t{i}")).await }
    });
    let results = futures::future::join_all(burst).await;
    let (leases, errors): (Vec<_>, Vec<_>) = results.into_iter().partition(Result::is_ok);
    assert_eq!(leases.len(), 3, "exactly max_total leases succeed");
    for error in errors {
        assert!(
            matches!(error, Err(PoolError::Timeout { .. })),
            "{:?}",
            error.err()
        );
    }
    assert_eq!(f.owned().await, 3);
    // A waiter is served as soon as a lease comes back.
    let mut leases: Vec<_> = leases.into_iter().map(Result::unwrap).collect();
    let waiter = tokio::spawn({
        let pool = pool.clone();
        async move { pool.lease("default", "late").await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    f.pool.release(leases.pop().expect("lease")).await;
    let late = waiter
        .await
        .expect("join")
        .expect("the waiter gets a sandbox");
    assert!(f.owned().await <= 3);
    f.pool.release(late).await;
    for lease in leases {
        f.pool.release(lease).await;
    }
    f.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_failing_its_health_check_is_discarded_and_replaced() {
    let f = fixture("health", "min_idle = 1\nmax_total = 2").await;
    f.wait_idle(1).await;
    // Break the idle sandbox behind the pool's back.
    let owned = f.provider.list_owned().await.expect("list");
    let broken = owned[0].id.clone();
    let workspace = f.provider.owner_dir().join(&broken).join("fs/workspace");
    std::fs::remove_dir_all(&workspace).expect("break the sandbox");
    let lease = f.pool.lease("default", "t").await.expect("lease");
    assert_ne!(
        lease.sandbox().id(),
        broken,
        "the broken sandbox was handed out"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while f
        .provider
        .list_owned()
        .await
        .expect("list")
        .iter()
        .any(|s| s.id == broken)
    {
        assert!(
            Instant::now() < deadline,
            "the broken sandbox was not destroyed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f.pool.release(lease).await;
    f.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reuse_templates_hand_a_sandbox_back_only_to_the_same_tenant() {
    let f = fixture("reuse", "min_idle = 0\nmax_total = 4\nreuse = true").await;
    let first = f.pool.lease("default", "alice").await.expect("lease");
    let id = first.sandbox().id().to_owned();
    first
        .sandbox()
        .write_file("state.txt", b"alice was here")
        .await
        .expect("write");
    f.pool.release(first).await;
    let bob = f.pool.lease("default", "bob").await.expect("lease");
    assert_ne!(bob.sandbox().id(), id, "another tenant got alice's sandbox");
    let again = f.pool.lease("default", "alice").await.expect("lease");
    assert_eq!(again.sandbox().id(), id);
    assert!(again.warm);
    assert_eq!(
        again.sandbox().read_file("state.txt").await.expect("read"),
        b"alice was here"
    );
    f.pool.release(bob).await;
    f.pool.release(again).await;
    f.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reaper_destroys_owned_sandboxes_the_pool_does_not_know() {
    let f = fixture("reaper", "min_idle = 1\nmax_total = 4").await;
    f.wait_idle(1).await;
    // A sandbox created behind the pool's back: a leak.
    let template = f.settings.sandbox.templates["default"].clone();
    let leaked = f.provider.create(&template).await.expect("create");
    let leaked_id = leaked.id().to_owned();
    drop(leaked);
    assert_eq!(f.owned().await, 2);
    // The first pass only suspects it (it might be mid-creation) ...
    assert_eq!(f.pool.reap(false).await, 0);
    // ... the second pass reaps it, and never the pool's own idle sandbox.
    assert_eq!(f.pool.reap(false).await, 1);
    let owned = f.provider.list_owned().await.expect("list");
    assert_eq!(owned.len(), 1);
    assert_ne!(owned[0].id, leaked_id);
    f.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_template_is_refused() {
    let f = fixture("unknown", "min_idle = 0").await;
    let error = f.pool.lease("gpu-xl", "t").await.err().expect("refused");
    assert!(matches!(error, PoolError::UnknownTemplate(ref name) if name == "gpu-xl"));
    f.finish().await;
}

//! The pool's accounting on paused time, with an in-memory provider: these
//! check the bookkeeping (idle, leased, creating, destroying, `max_total`)
//! that the real-bwrap suite (tests/tests/pool.rs) can only see from outside.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::sandbox::{
    ExecOutput, ExecRequest, FileEntry, OwnedSandbox, PoolSizing, ShellSession, Template,
};

const TEMPLATE: &str = "unit";

/// What the provider did, shared with the sandboxes it made.
#[derive(Default)]
struct Book {
    created: AtomicUsize,
    /// Creates still to fail (then they succeed again).
    fail_creates: AtomicUsize,
    panic_creates: AtomicBool,
    unhealthy: Mutex<HashSet<String>>,
    live: Mutex<HashSet<String>>,
    destroyed: Mutex<Vec<String>>,
}

struct FakeProvider {
    book: Arc<Book>,
}

struct FakeSandbox {
    id: String,
    book: Arc<Book>,
}

fn refused() -> SandboxError {
    SandboxError::new(SandboxErrorKind::Rejected, "not part of the pool's fake")
}

#[async_trait]
impl Sandbox for FakeSandbox {
    fn id(&self) -> &str {
        &self.id
    }
    async fn exec(
        &self,
        _request: &ExecRequest,
        _cancel: &CancellationToken,
    ) -> Result<ExecOutput, SandboxError> {
        Err(refused())
    }
    async fn shell(&self) -> Result<Box<dyn ShellSession>, SandboxError> {
        Err(refused())
    }
    async fn write_file(&self, _path: &str, _content: &[u8]) -> Result<(), SandboxError> {
        Err(refused())
    }
    async fn read_file(&self, _path: &str) -> Result<Vec<u8>, SandboxError> {
        Err(refused())
    }
    async fn list_files(&self, _path: &str) -> Result<Vec<FileEntry>, SandboxError> {
        Err(refused())
    }
    async fn git_clone(
        &self,
        _url: &str,
        _git_ref: Option<&str>,
        _dest: &str,
    ) -> Result<(), SandboxError> {
        Err(refused())
    }
    async fn health(&self) -> Result<(), SandboxError> {
        if self.book.unhealthy.lock().unwrap().contains(&self.id) {
            Err(SandboxError::new(SandboxErrorKind::Broken, "unhealthy"))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl SandboxProvider for FakeProvider {
    fn name(&self) -> &'static str {
        "fake"
    }
    async fn create(&self, _template: &Template) -> Result<Box<dyn Sandbox>, SandboxError> {
        // A create takes a while, so a burst really overlaps.
        tokio::time::sleep(Duration::from_millis(100)).await;
        if self.book.panic_creates.load(Ordering::SeqCst) {
            panic!("provider bug");
        }
        let failing =
            self.book
                .fail_creates
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if failing.is_ok() {
            return Err(SandboxError::new(SandboxErrorKind::Create, "no capacity"));
        }
        let n = self.book.created.fetch_add(1, Ordering::SeqCst);
        let id = format!("sb-{n}");
        self.book.live.lock().unwrap().insert(id.clone());
        Ok(Box::new(FakeSandbox {
            id,
            book: self.book.clone(),
        }))
    }
    async fn reattach(&self, _id: &str) -> Result<Box<dyn Sandbox>, SandboxError> {
        Err(refused())
    }
    async fn destroy(&self, id: &str) -> Result<(), SandboxError> {
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.book.live.lock().unwrap().remove(id);
        self.book.destroyed.lock().unwrap().push(id.to_owned());
        Ok(())
    }
    async fn list_owned(&self) -> Result<Vec<OwnedSandbox>, SandboxError> {
        Ok(self
            .book
            .live
            .lock()
            .unwrap()
            .iter()
            .map(|id| OwnedSandbox {
                id: id.clone(),
                template: TEMPLATE.into(),
                owner: "unit".into(),
            })
            .collect())
    }
}

/// idle, leased, creating, destroying.
type Counts = (usize, usize, usize, usize);

struct Fixture {
    pool: Pool,
    book: Arc<Book>,
}

impl Fixture {
    async fn start(min_idle: usize, max_total: usize, reuse: bool) -> Self {
        let book = Arc::new(Book::default());
        let mut template = Template::local_default();
        template.name = Name::from_static(TEMPLATE);
        template.reuse = reuse;
        template.pool = PoolSizing {
            min_idle,
            max_total,
            create_concurrency: 4,
            lease_timeout: Duration::from_secs(30),
        };
        let provider: Arc<dyn SandboxProvider> = Arc::new(FakeProvider { book: book.clone() });
        let metrics = PoolMetrics::new(&mut Registry::default());
        // The periodic reaper stays out of the way: these tests are about leases.
        let pool = Pool::start(provider, [template], metrics, Duration::from_secs(86_400)).await;
        Self { pool, book }
    }

    fn counts(&self) -> Counts {
        let state = lock(&self.pool.inner.templates[TEMPLATE].state);
        (
            state.idle.len(),
            state.leased.len(),
            state.creating,
            state.destroying,
        )
    }

    fn total(&self) -> usize {
        lock(&self.pool.inner.templates[TEMPLATE].state).total()
    }

    fn metric(&self, pick: impl Fn(&PoolMetrics) -> u64) -> u64 {
        pick(&self.pool.inner.metrics)
    }

    fn destroyed(&self) -> Vec<String> {
        self.book.destroyed.lock().unwrap().clone()
    }

    /// Lets paused time run (auto-advancing) until `counts` reads `want`.
    async fn settle_to(&self, want: Counts) {
        for _ in 0..1000 {
            if self.counts() == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("counts stayed {:?}, wanted {want:?}", self.counts());
    }
}

fn labels() -> TemplateLabels {
    TemplateLabels {
        template: TEMPLATE.into(),
    }
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_leases_never_exceeds_max_total_and_the_extra_one_times_out() {
    let fx = Fixture::start(0, 3, false).await;
    let burst: Vec<_> = (0..3)
        .map(|i| {
            let pool = fx.pool.clone();
            tokio::spawn(async move { pool.lease(TEMPLATE, &format!("t{i}")).await })
        })
        .collect();
    // The three creates are in flight together and count toward the total.
    tokio::task::yield_now().await;
    tokio::task::yield_now().await;
    assert_eq!(fx.counts(), (0, 0, 3, 0));
    let mut leases = Vec::new();
    for lease in burst {
        let lease = lease.await.unwrap().expect("room for three");
        assert!(!lease.warm);
        leases.push(lease);
    }
    assert_eq!(fx.counts(), (0, 3, 0, 0));
    assert_eq!(fx.book.created.load(Ordering::SeqCst), 3);

    // A fourth waits for room, and gives up at lease_timeout (30 s), not before.
    let pool = fx.pool.clone();
    let fourth = tokio::spawn(async move { pool.lease(TEMPLATE, "t4").await });
    tokio::task::yield_now().await;
    tokio::time::advance(Duration::from_secs(29)).await;
    tokio::task::yield_now().await;
    assert!(!fourth.is_finished(), "gave up before lease_timeout");
    assert_eq!(fx.total(), 3, "a waiting lease does not count");
    tokio::time::advance(Duration::from_secs(2)).await;
    let timed_out = tokio::time::timeout(Duration::from_millis(1), fourth)
        .await
        .expect("the lease ends once lease_timeout passed")
        .unwrap();
    assert!(
        matches!(&timed_out, Err(PoolError::Timeout { template, .. }) if template == TEMPLATE),
        "{:?}",
        timed_out.err()
    );
    assert_eq!(fx.book.created.load(Ordering::SeqCst), 3);
    let timeouts = fx.metric(|m| {
        m.leases
            .get_or_create(&LeaseLabels {
                template: TEMPLATE.into(),
                result: "timeout".into(),
            })
            .get()
    });
    assert_eq!(timeouts, 1);
    for lease in leases {
        fx.pool.release(lease).await;
    }
    fx.settle_to((0, 0, 0, 0)).await;
}

#[tokio::test(start_paused = true)]
async fn a_waiting_lease_gets_the_room_a_release_frees() {
    let fx = Fixture::start(0, 1, false).await;
    let first = fx.pool.lease(TEMPLATE, "a").await.unwrap();
    let pool = fx.pool.clone();
    let second = tokio::spawn(async move { pool.lease(TEMPLATE, "b").await });
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!second.is_finished());
    let first_id = first.sandbox().id().to_owned();
    fx.pool.release(first).await;
    // Without reuse the sandbox is destroyed; its slot counts until that ends.
    let second = second.await.unwrap().expect("room after the destroy");
    assert_ne!(second.sandbox().id(), first_id);
    assert_eq!(fx.destroyed(), vec![first_id]);
    assert_eq!(fx.counts(), (0, 1, 0, 0));
    fx.pool.release(second).await;
    fx.settle_to((0, 0, 0, 0)).await;
}

#[tokio::test(start_paused = true)]
async fn a_release_counts_as_destroying_until_the_destroy_ends() {
    let fx = Fixture::start(0, 2, false).await;
    let lease = fx.pool.lease(TEMPLATE, "a").await.unwrap();
    let id = lease.sandbox().id().to_owned();
    assert_eq!(fx.counts(), (0, 1, 0, 0));
    fx.pool.release(lease).await;
    assert_eq!(fx.counts(), (0, 0, 0, 1));
    assert_eq!(
        fx.total(),
        1,
        "a sandbox being destroyed still holds its slot"
    );
    fx.settle_to((0, 0, 0, 0)).await;
    assert_eq!(fx.destroyed(), vec![id]);
}

#[tokio::test(start_paused = true)]
async fn a_failed_create_gives_its_slot_back() {
    let fx = Fixture::start(0, 1, false).await;
    fx.book.fail_creates.store(1, Ordering::SeqCst);
    let failed = fx.pool.lease(TEMPLATE, "a").await;
    assert!(
        matches!(&failed, Err(PoolError::Sandbox(e)) if e.kind == SandboxErrorKind::Create),
        "{:?}",
        failed.err()
    );
    assert_eq!(fx.counts(), (0, 0, 0, 0));
    assert_eq!(
        fx.metric(|m| m.create_failures.get_or_create(&labels()).get()),
        1
    );
    // The only slot is free again: the next lease creates at once.
    let lease = fx.pool.lease(TEMPLATE, "a").await.expect("slot freed");
    assert_eq!(fx.counts(), (0, 1, 0, 0));
    fx.pool.release(lease).await;
    fx.settle_to((0, 0, 0, 0)).await;
}

#[tokio::test(start_paused = true)]
async fn a_panicking_provider_does_not_leave_a_create_counted() {
    let fx = Fixture::start(0, 1, false).await;
    fx.book.panic_creates.store(true, Ordering::SeqCst);
    let failed = fx.pool.lease(TEMPLATE, "a").await;
    assert!(
        matches!(&failed, Err(PoolError::Sandbox(e)) if e.message.contains("provider bug")),
        "{:?}",
        failed.err()
    );
    assert_eq!(fx.counts(), (0, 0, 0, 0));
    fx.book.panic_creates.store(false, Ordering::SeqCst);
    let lease = fx
        .pool
        .lease(TEMPLATE, "a")
        .await
        .expect("the template is not full");
    fx.pool.release(lease).await;
    fx.settle_to((0, 0, 0, 0)).await;
}

#[tokio::test(start_paused = true)]
async fn an_idle_sandbox_failing_its_health_check_is_destroyed_not_leased() {
    let fx = Fixture::start(1, 2, false).await;
    fx.settle_to((1, 0, 0, 0)).await;
    let bad = lock(&fx.pool.inner.templates[TEMPLATE].state).idle[0]
        .sandbox
        .id()
        .to_owned();
    fx.book.unhealthy.lock().unwrap().insert(bad.clone());
    let lease = fx.pool.lease(TEMPLATE, "a").await.expect("a replacement");
    assert_ne!(lease.sandbox().id(), bad);
    assert_eq!(
        fx.metric(|m| m.health_failures.get_or_create(&labels()).get()),
        1
    );
    assert!(fx.total() <= 2);
    // The bad one is destroyed, the replenisher brings idle back to one.
    fx.settle_to((1, 1, 0, 0)).await;
    assert_eq!(fx.destroyed(), vec![bad]);
    fx.pool.release(lease).await;
    fx.settle_to((1, 0, 0, 0)).await;
    fx.pool.drain(Duration::from_secs(5)).await;
    assert_eq!(fx.counts(), (0, 0, 0, 0));
    assert!(fx.book.live.lock().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_reused_sandbox_goes_back_to_its_tenant_only() {
    let fx = Fixture::start(0, 2, true).await;
    let lease = fx.pool.lease(TEMPLATE, "a").await.unwrap();
    let kept = lease.sandbox().id().to_owned();
    fx.pool.release(lease).await;
    assert_eq!(fx.counts(), (1, 0, 0, 0));
    // Same tenant: the kept sandbox, warm, nothing created.
    let again = fx.pool.lease(TEMPLATE, "a").await.unwrap();
    assert_eq!(again.sandbox().id(), kept);
    assert!(again.warm);
    assert_eq!(fx.book.created.load(Ordering::SeqCst), 1);
    fx.pool.release(again).await;
    // Another tenant, with room left: a new sandbox; a's stays kept for a.
    let other = fx.pool.lease(TEMPLATE, "b").await.unwrap();
    assert_ne!(other.sandbox().id(), kept);
    assert!(!other.warm);
    assert_eq!(fx.counts(), (1, 1, 0, 0));
    assert!(fx.destroyed().is_empty());
    fx.pool.release(other).await;
    assert_eq!(fx.counts(), (2, 0, 0, 0));
    fx.pool.drain(Duration::from_secs(5)).await;
    assert_eq!(fx.counts(), (0, 0, 0, 0));
}

#[tokio::test(start_paused = true)]
async fn at_max_total_another_tenant_evicts_the_oldest_kept_sandbox() {
    let fx = Fixture::start(0, 1, true).await;
    let lease = fx.pool.lease(TEMPLATE, "a").await.unwrap();
    let kept = lease.sandbox().id().to_owned();
    fx.pool.release(lease).await;
    assert_eq!(fx.counts(), (1, 0, 0, 0));
    // Full, and only a's sandbox is idle: b does not wait for it to time out.
    let other = fx
        .pool
        .lease(TEMPLATE, "b")
        .await
        .expect("eviction, not a timeout");
    assert_ne!(other.sandbox().id(), kept);
    assert!(!other.warm);
    assert_eq!(fx.destroyed(), vec![kept]);
    assert_eq!(fx.counts(), (0, 1, 0, 0));
    assert_eq!(fx.total(), 1, "the eviction never grew the total");
    assert_eq!(fx.metric(|m| m.evicted.get_or_create(&labels()).get()), 1);
    fx.pool.release(other).await;
    fx.pool.drain(Duration::from_secs(5)).await;
    assert_eq!(fx.counts(), (0, 0, 0, 0));
}

#[tokio::test(start_paused = true)]
async fn an_unhealthy_sandbox_is_not_kept_for_reuse() {
    let fx = Fixture::start(0, 1, true).await;
    let lease = fx.pool.lease(TEMPLATE, "a").await.unwrap();
    let id = lease.sandbox().id().to_owned();
    fx.book.unhealthy.lock().unwrap().insert(id.clone());
    fx.pool.release(lease).await;
    assert_eq!(fx.counts(), (0, 0, 0, 1));
    fx.settle_to((0, 0, 0, 0)).await;
    assert_eq!(fx.destroyed(), vec![id]);
}

#[tokio::test(start_paused = true)]
async fn a_lease_after_drain_is_refused() {
    let fx = Fixture::start(0, 1, false).await;
    fx.pool.drain(Duration::from_secs(5)).await;
    let refused = fx.pool.lease(TEMPLATE, "a").await;
    assert!(
        matches!(refused, Err(PoolError::Closed)),
        "{:?}",
        refused.err()
    );
    let unknown = fx.pool.lease("nope", "a").await;
    assert!(
        matches!(&unknown, Err(PoolError::UnknownTemplate(t)) if t == "nope"),
        "{:?}",
        unknown.err()
    );
}

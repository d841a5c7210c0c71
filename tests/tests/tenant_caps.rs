//! Per-tenant concurrency caps (issue 16, ADR 0040): the Redis script
//! against real Redis, and a real scheduler with two real worker processes
//! of 4 slots each, where tenant `a` is capped at 2 running tasks.

use std::time::Duration;

use chrono::{DateTime, Utc};
use shoal_scheduler::client::Client;
use shoal_shared::event::Event;
use shoal_shared::settings::TenantLimits;
use shoal_shared::store::{CapTake, Store};
use shoal_shared::task::{TaskId, TaskSpec, TaskState};
use shoal_shared::Name;
use shoal_tests::wait::wait_until;
use shoal_tests::TestEnv;

fn capped(max_running: u32, model: Option<(&str, u32)>) -> TenantLimits {
    let mut limits = TenantLimits {
        max_running: Some(max_running),
        ..TenantLimits::default()
    };
    if let Some((name, max)) = model {
        limits
            .max_running_per_model
            .insert(Name::parse(name).expect("a model name"), max);
    }
    limits
}

async fn take(
    store: &Store,
    id: TaskId,
    limits: &TenantLimits,
    model: Option<&str>,
    ttl: Duration,
) -> CapTake {
    let slot = store.cap_slot(id, "acme", limits, model);
    store.take_cap(&slot, ttl).await.expect("take")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cap_script_holds_under_concurrent_takers_and_expired_slots_free_up() {
    let env = TestEnv::new("caps-script", "").await;
    let store = env.store.clone();
    let limits = capped(3, None);
    // 24 takers at once on a cap of 3: exactly 3 get in.
    let ids: Vec<TaskId> = (0..24).map(|_| TaskId::new()).collect();
    let takes = futures::future::join_all(ids.iter().map(|id| {
        let store = store.clone();
        let limits = limits.clone();
        let id = *id;
        async move {
            (
                id,
                take(&store, id, &limits, None, Duration::from_secs(60)).await,
            )
        }
    }))
    .await;
    let taken: Vec<TaskId> = takes
        .iter()
        .filter(|(_, t)| *t == CapTake::Taken)
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(taken.len(), 3, "{takes:?}");
    for (_, t) in &takes {
        if let CapTake::Full {
            label,
            max,
            first_wait,
        } = t
        {
            assert_eq!(
                (label.as_str(), *max, *first_wait),
                ("tenant acme", 3, true)
            );
        }
    }
    // A turned-away task asking again is not a new wait episode.
    let waiting = takes.iter().find(|(_, t)| *t != CapTake::Taken).unwrap().0;
    assert!(matches!(
        take(&store, waiting, &limits, None, Duration::from_secs(60)).await,
        CapTake::Full {
            first_wait: false,
            ..
        }
    ));
    // A holder asking again is still in (a redelivery of a running task).
    assert_eq!(
        take(&store, taken[0], &limits, None, Duration::from_secs(60)).await,
        CapTake::Taken
    );
    // A release frees one slot.
    let slot = store.cap_slot(taken[0], "acme", &limits, None);
    store.release_cap(&slot).await.expect("release");
    assert_eq!(
        take(&store, waiting, &limits, None, Duration::from_secs(60)).await,
        CapTake::Taken
    );
    let full = store.cap_slot(TaskId::new(), "acme", &limits, None);
    assert_eq!(store.cap_running(&full.caps[0]).await.expect("count"), 3);

    // A holder that stops renewing (a worker killed with -9) frees its slot
    // when its ttl lapses.
    let short = capped(1, None);
    let other = "acme-short";
    let dead = store.cap_slot(TaskId::new(), other, &short, None);
    assert_eq!(
        store
            .take_cap(&dead, Duration::from_millis(300))
            .await
            .unwrap(),
        CapTake::Taken
    );
    let next = store.cap_slot(TaskId::new(), other, &short, None);
    assert!(matches!(
        store
            .take_cap(&next, Duration::from_secs(60))
            .await
            .unwrap(),
        CapTake::Full { .. }
    ));
    wait_until(
        "the lapsed slot to free up",
        Duration::from_secs(10),
        || async {
            (store.take_cap(&next, Duration::from_secs(60)).await.ok()? == CapTake::Taken)
                .then_some(())
        },
    )
    .await;

    // The per-model cap: an agent task of the capped model counts in both
    // sets; all or nothing.
    let per_model = capped(10, Some(("big", 1)));
    let tenant = "acme-model";
    let first = store.cap_slot(TaskId::new(), tenant, &per_model, Some("big"));
    assert_eq!(first.caps.len(), 2);
    assert_eq!(
        store
            .take_cap(&first, Duration::from_secs(60))
            .await
            .unwrap(),
        CapTake::Taken
    );
    let second = store.cap_slot(TaskId::new(), tenant, &per_model, Some("big"));
    match store
        .take_cap(&second, Duration::from_secs(60))
        .await
        .unwrap()
    {
        CapTake::Full { label, max, .. } => {
            assert_eq!((label.as_str(), max), ("tenant acme-model, model big", 1))
        }
        other => panic!("{other:?}"),
    }
    // Nothing was taken in the tenant-wide set by the refused take.
    assert_eq!(store.cap_running(&second.caps[0]).await.unwrap(), 1);
    // Another model is under the tenant-wide cap only.
    let small = store.cap_slot(TaskId::new(), tenant, &per_model, Some("small"));
    assert_eq!(small.caps.len(), 1);
    assert_eq!(
        store
            .take_cap(&small, Duration::from_secs(60))
            .await
            .unwrap(),
        CapTake::Taken
    );
    // No cap: nothing to take.
    let free = store.cap_slot(TaskId::new(), tenant, &TenantLimits::default(), Some("big"));
    assert!(free.caps.is_empty());
    env.teardown().await;
}

/// A task's run: from its `leased` transition to its terminal one.
struct Run {
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    throttled: usize,
}

async fn run_of(env: &TestEnv, id: &TaskId) -> Run {
    let events = env.store.events(id, 1000).await.expect("events");
    let mut start = None;
    let mut end = None;
    let mut throttled = 0;
    for (_, envelope) in events {
        match envelope.event {
            Event::StateChanged {
                to: TaskState::Leased,
                ..
            } => {
                start.get_or_insert(envelope.ts);
            }
            Event::StateChanged { to, .. } if to.is_terminal() => end = Some(envelope.ts),
            Event::Throttled { .. } => throttled += 1,
            _ => {}
        }
    }
    Run {
        start: start.unwrap_or_else(|| panic!("{id}: no leased event")),
        end: end.unwrap_or_else(|| panic!("{id}: no terminal event")),
        throttled,
    }
}

/// The most runs overlapping at any instant (an end at the same instant as
/// a start is not an overlap).
fn max_overlap(runs: &[&Run]) -> usize {
    let mut edges: Vec<(DateTime<Utc>, i32)> = runs
        .iter()
        .flat_map(|r| [(r.start, 1), (r.end, -1)])
        .collect();
    edges.sort();
    let (mut now, mut most) = (0i32, 0i32);
    for (_, delta) in edges {
        now += delta;
        most = most.max(now);
    }
    most as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_capped_at_two_never_runs_more_than_two_and_waiting_uses_no_attempt() {
    let mut env = TestEnv::new(
        "caps-fleet",
        "broker.retry_tiers_s = [1, 30]\n\
         scheduler.tokens.tok-alpha = \"alpha\"\n\
         scheduler.tokens.tok-beta = \"beta\"\n\
         tenants.alpha.max_running = 2\n",
    )
    .await;
    let url = env.start_scheduler().await;
    let w1 = env.spawn_worker_process("caps-w1", 4, 5);
    let w2 = env.spawn_worker_process("caps-w2", 4, 5);
    let alpha = Client::new(&url, Some("tok-alpha".into()));
    let beta = Client::new(&url, Some("tok-beta".into()));
    let a_specs: Vec<TaskSpec> = (0..20).map(|_| TaskSpec::exec("sleep 0.5")).collect();
    let a_ids: Vec<TaskId> = alpha
        .submit_batch(&a_specs)
        .await
        .expect("submit alpha")
        .iter()
        .map(|t| t.id)
        .collect();
    let b_specs: Vec<TaskSpec> = (0..4).map(|_| TaskSpec::exec("sleep 0.5")).collect();
    let b_ids: Vec<TaskId> = beta
        .submit_batch(&b_specs)
        .await
        .expect("submit beta")
        .iter()
        .map(|t| t.id)
        .collect();

    let mut a_runs = Vec::new();
    for id in &a_ids {
        let done = env.wait_terminal(id, Duration::from_secs(180)).await;
        assert_eq!(
            done.state,
            TaskState::Succeeded,
            "{id}: {:?}",
            done.last_error
        );
        assert_eq!(done.attempts, 1, "{id}: waiting for the cap used attempts");
        a_runs.push(run_of(&env, id).await);
    }
    let mut b_runs = Vec::new();
    for id in &b_ids {
        let done = env.wait_terminal(id, Duration::from_secs(60)).await;
        assert_eq!(
            done.state,
            TaskState::Succeeded,
            "{id}: {:?}",
            done.last_error
        );
        assert_eq!(done.attempts, 1);
        b_runs.push(run_of(&env, id).await);
    }
    let most = max_overlap(&a_runs.iter().collect::<Vec<_>>());
    let waited: usize = a_runs.iter().map(|r| r.throttled).sum();
    let episodes = a_runs.iter().filter(|r| r.throttled > 0).count();
    eprintln!("alpha: at most {most} running at once; {episodes} tasks waited ({waited} notes)");
    assert!(most <= 2, "alpha ran {most} tasks at once under a cap of 2");
    // 20 tasks on 8 slots under a cap of 2: some waited, each noted once.
    assert!(episodes > 0, "no alpha task was turned away");
    assert!(
        a_runs.iter().all(|r| r.throttled <= 1),
        "a wait episode noted more than once"
    );
    // Beta is not capped: none of its tasks waited, and all finished
    // before alpha's last (alpha needs at least 10 rounds of 2).
    assert!(b_runs.iter().all(|r| r.throttled == 0));
    let a_last = a_runs.iter().map(|r| r.end).max().unwrap();
    let b_last = b_runs.iter().map(|r| r.end).max().unwrap();
    assert!(
        b_last < a_last,
        "beta was held back: its last ended {b_last}, alpha's {a_last}"
    );
    // Every slot given back.
    let slot = env.store.cap_slot(
        TaskId::new(),
        "alpha",
        env.settings.tenants.limits("alpha"),
        None,
    );
    wait_until(
        "alpha's slots released",
        Duration::from_secs(30),
        || async { (env.store.cap_running(&slot.caps[0]).await.ok()? == 0).then_some(()) },
    )
    .await;
    w1.terminate().await;
    w2.terminate().await;
    assert!(
        w1.wait(Duration::from_secs(30)).await.is_some(),
        "caps-w1 did not stop"
    );
    assert!(
        w2.wait(Duration::from_secs(30)).await.is_some(),
        "caps-w2 did not stop"
    );
    env.teardown().await;
}

//! Items 3, 7 and 8 of issue 17 on the worker's host: a sandbox root or uid
//! directory others can write (the reaper deletes and kills what it finds
//! there), a planted sandbox naming a foreign uid or linking outside the
//! root, a failed create leaking its directory, uid claim and cgroup, and
//! one tenant's reusable sandboxes holding the pool against another. (The
//! loopback default of the metrics address is a unit test in
//! shared/src/settings.rs.)

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use shoal_shared::settings::Settings;
use shoal_worker::pool::{Pool, PoolMetrics};
use shoal_worker::sandbox::{LocalProvider, SandboxProvider};

/// A fresh private directory (0711, like a sandbox root) for one test.
fn private_base(name: &str) -> PathBuf {
    let id = uuid::Uuid::now_v7().simple().to_string();
    let base = std::env::temp_dir()
        .join("shoal-test-sandboxes")
        .join(format!("host-{name}-{}", &id[id.len() - 8..]));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(&base)
        .expect("create the test directory");
    base
}

/// Settings with their own root, uid directory and uid range.
fn settings(base: &Path, extra: &str) -> Settings {
    let id = uuid::Uuid::now_v7().simple().to_string();
    let slot = u32::from_str_radix(&id[id.len() - 4..], 16).unwrap_or(0) % 1000;
    let uid_base = 800_000 + slot * 64;
    Settings::from_toml(&format!(
        "sandbox.root = \"{}\"\nsandbox.uid_dir = \"{}\"\n\
         sandbox.uid_base = {uid_base}\nsandbox.uid_count = 64\n{extra}",
        base.join("root").display(),
        base.join("uids").display(),
    ))
    .expect("settings")
}

async fn start_error(settings: &Settings, owner: &str) -> String {
    match LocalProvider::new(settings.sandbox.clone(), owner).await {
        Ok(_) => panic!("the provider started on an unsafe directory"),
        Err(error) => error.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_root_others_can_write_or_replace_is_refused_at_startup() {
    let base = private_base("refuse");
    let settings = settings(&base, "");
    let root = &settings.sandbox.root;

    // World-writable: anyone could plant what the reaper acts on.
    std::fs::create_dir(root).expect("root");
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let error = start_error(&settings, "refuse").await;
    assert!(error.contains("sandbox.root"), "{error}");
    assert!(error.contains("writable"), "{error}");

    // Group-writable is no better.
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o770)).expect("chmod");
    let error = start_error(&settings, "refuse").await;
    assert!(error.contains("sandbox.root"), "{error}");

    // A symlink: whoever can repoint it chooses what gets deleted.
    std::fs::remove_dir(root).expect("rmdir");
    let elsewhere = base.join("elsewhere");
    std::fs::DirBuilder::new()
        .mode(0o711)
        .create(&elsewhere)
        .expect("elsewhere");
    std::os::unix::fs::symlink(&elsewhere, root).expect("symlink");
    let error = start_error(&settings, "refuse").await;
    assert!(error.contains("sandbox.root"), "{error}");
    assert!(error.contains("symlink"), "{error}");

    // The uid claims directory is checked the same way.
    std::fs::remove_file(root).expect("unlink");
    let uids = &settings.sandbox.uid_dir;
    std::fs::create_dir(uids).expect("uid dir");
    std::fs::set_permissions(uids, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    let error = start_error(&settings, "refuse").await;
    assert!(error.contains("sandbox.uid_dir"), "{error}");

    // Fixed, it starts; a missing directory is created private.
    std::fs::set_permissions(uids, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let provider = LocalProvider::new(settings.sandbox.clone(), "refuse")
        .await
        .expect("a private root is accepted");
    let mode = std::fs::metadata(root).expect("root").permissions().mode();
    assert_eq!(mode & 0o022, 0, "root created with mode {mode:o}");
    drop(provider);
    std::fs::remove_dir_all(&base).expect("clean up");
}

/// A process of `uid` (not a sandbox uid) that the reaper must leave alone.
fn bystander(uid: u32) -> std::process::Child {
    std::process::Command::new("sleep")
        .arg("600")
        .uid(uid)
        .gid(uid)
        .spawn()
        .expect("start a process as another uid (the tests run as root)")
}

fn plant_meta(dir: &Path, id: &str, uid: u32) {
    std::fs::create_dir_all(dir).expect("planted dir");
    std::fs::write(
        dir.join("sandbox.json"),
        format!(
            r#"{{"id":"{id}","uid":{uid},"template":"default","owner":"dead","mounted":false}}"#
        ),
    )
    .expect("planted metadata");
    std::fs::write(dir.join("precious"), "keep me").expect("planted file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_sandbox_naming_a_foreign_uid_or_linking_outside_the_root_is_not_reaped() {
    let base = private_base("plant");
    let settings = settings(&base, "");
    let sandbox = &settings.sandbox;
    let root = &sandbox.root;
    std::fs::DirBuilder::new()
        .mode(0o711)
        .create(root)
        .expect("root");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&sandbox.uid_dir)
        .expect("uid dir");
    // Processes of uids outside the range: far off, and the first uid past it.
    let far = 3_000_000 + sandbox.uid_base / 64;
    let past = sandbox.uid_base + sandbox.uid_count;
    let mut victims = [bystander(far), bystander(past)];
    let dead = "999999999 1";

    // A dead owner with a sandbox naming foreign uids, and a sandbox that is
    // a link to a directory outside the root.
    let owner = root.join("dead-owner");
    plant_meta(&owner.join("local-far"), "local-far", far);
    plant_meta(&owner.join("local-past"), "local-past", past);
    std::fs::write(owner.join("owner"), dead).expect("owner file");
    let outside = base.join("outside");
    plant_meta(&outside, "local-link", past);
    std::os::unix::fs::symlink(&outside, owner.join("local-link")).expect("link");
    // An "owner" that is itself a link to a directory outside the root.
    let outside_owner = base.join("outside-owner");
    plant_meta(&outside_owner.join("local-inner"), "local-inner", far);
    std::fs::write(outside_owner.join("owner"), dead).expect("owner file");
    std::os::unix::fs::symlink(&outside_owner, root.join("linked-owner")).expect("link");
    // Uid claims by a dead process, for the foreign uids.
    for uid in [far, past] {
        std::fs::write(sandbox.uid_dir.join(uid.to_string()), dead).expect("claim");
    }

    let provider = LocalProvider::new(sandbox.clone(), "plant")
        .await
        .expect("provider");

    for victim in &mut victims {
        assert!(
            victim.try_wait().expect("wait").is_none(),
            "the reaper killed a process of a uid outside sandbox.uid_base .. + uid_count"
        );
    }
    for kept in [
        outside.join("precious"),
        outside.join("sandbox.json"),
        outside_owner.join("local-inner/precious"),
        outside_owner.join("owner"),
    ] {
        assert!(
            kept.exists(),
            "the reaper deleted {} outside the root",
            kept.display()
        );
    }
    // The planted entries inside the root are gone, links as links.
    assert!(!owner.exists(), "the dead owner's directory was not reaped");
    assert!(
        std::fs::symlink_metadata(root.join("linked-owner")).is_err(),
        "the planted link was left"
    );
    for victim in &mut victims {
        let _ = victim.kill();
        let _ = victim.wait();
    }
    drop(provider);
    std::fs::remove_dir_all(&base).expect("clean up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_create_leaves_no_directory_uid_claim_or_cgroup() {
    let base = private_base("failed");
    // A process cap beyond what the kernel's pids controller accepts
    // (PID_MAX_LIMIT): the cgroup is made, then writing its limit fails.
    // `required`: without cgroups the test fails instead of passing vacuously.
    let settings = settings(
        &base,
        "sandbox.cgroups = \"required\"\n\
         [sandbox.templates.default]\nworkspace_mb = 16\ntmp_mb = 8\nlimit_processes = 100000000\n",
    );
    let provider = LocalProvider::new(settings.sandbox.clone(), "failed")
        .await
        .expect("provider");
    let template = &settings.sandbox.templates["default"];
    let error = match provider.create(template).await {
        Ok(_) => panic!("a sandbox with an impossible process cap was created"),
        Err(error) => error.to_string(),
    };
    assert!(error.contains("cgroup"), "{error}");
    let id = error
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .find(|word| word.starts_with("local-"))
        .unwrap_or_else(|| panic!("no sandbox id in {error:?}"))
        .to_owned();

    let left: Vec<_> = std::fs::read_dir(provider.owner_dir())
        .expect("owner dir")
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "directories left behind: {left:?}");
    let claims: Vec<_> = std::fs::read_dir(&settings.sandbox.uid_dir)
        .expect("uid dir")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(claims.is_empty(), "uid claims left behind: {claims:?}");
    let cgroups = &settings.sandbox.cgroup_root;
    for dir in [
        cgroups.join("unified/shoal").join(&id),
        cgroups.join("memory/shoal").join(&id),
        cgroups.join("pids/shoal").join(&id),
        cgroups.join("shoal").join(&id),
    ] {
        assert!(!dir.exists(), "cgroup left behind: {}", dir.display());
    }
    assert!(
        provider.list_owned().await.expect("list").is_empty(),
        "the provider still owns a sandbox"
    );
    drop(provider);
    std::fs::remove_dir_all(&base).expect("clean up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenants_reusable_sandboxes_do_not_hold_the_full_pool_against_another() {
    let base = private_base("tenants");
    let settings = settings(
        &base,
        "[sandbox.templates.default]\nworkspace_mb = 16\ntmp_mb = 8\n\
         reuse = true\nmin_idle = 0\nmax_total = 2\nlease_timeout_s = 20\n",
    );
    let provider = Arc::new(
        LocalProvider::new(settings.sandbox.clone(), "tenants")
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

    // Tenant a fills the pool; its sandboxes stay idle, kept for a.
    let first = pool.lease("default", "a").await.expect("lease a1");
    let second = pool.lease("default", "a").await.expect("lease a2");
    pool.release(first).await;
    pool.release(second).await;
    assert_eq!(pool.counts("default"), Some((2, 0, 2)));

    // Tenant b gets a sandbox of its own (not a's) instead of timing out.
    let lease = pool
        .lease("default", "b")
        .await
        .expect("tenant b is not locked out by tenant a's idle sandboxes");
    assert!(!lease.warm, "b was handed a sandbox kept for a");
    let (idle, leased, total) = pool.counts("default").expect("template");
    assert_eq!((idle, leased), (1, 1));
    assert!(total <= 2, "the pool grew past max_total: {total}");
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    assert!(
        text.contains("shoal_pool_evicted_total{template=\"default\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("shoal_pool_idle{template=\"default\"} 1"),
        "{text}"
    );

    // Tenant a still gets its own kept sandbox back, warm.
    let again = pool.lease("default", "a").await.expect("lease a3");
    assert!(again.warm);
    pool.release(again).await;
    pool.release(lease).await;
    pool.drain(Duration::from_secs(30)).await;
    assert!(
        provider.list_owned().await.expect("list").is_empty(),
        "sandboxes left after drain"
    );
    drop(pool);
    drop(provider);
    std::fs::remove_dir_all(&base).expect("clean up");
}

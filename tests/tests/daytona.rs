//! The Daytona provider against the fake Daytona (`shoal_tests::daytona_fake`),
//! which checks every request and response against Daytona's official specs.
//! No network: the fake listens on 127.0.0.1. Every test ends by asserting
//! that the fake recorded no spec violation.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use shoal_tests::daytona_fake::FakeDaytona;
use shoal_worker::sandbox::daytona::{ApiKey, DaytonaConfig, DaytonaProvider};
use shoal_worker::sandbox::{
    ExecRequest, ProviderKind, Sandbox, SandboxErrorKind, SandboxProvider, Template,
};
use tokio_util::sync::CancellationToken;

fn config(fake: &FakeDaytona, owner: &str) -> DaytonaConfig {
    let mut config = DaytonaConfig::new(&fake.api_url, ApiKey::new(&fake.api_key), owner);
    config.request_timeout = Duration::from_secs(10);
    config.retry.min_delay = Duration::from_millis(50);
    config.retry.max_delay = Duration::from_millis(500);
    config.poll.create_deadline = Duration::from_secs(10);
    config.poll.transition_deadline = Duration::from_secs(10);
    config
}

fn provider(fake: &FakeDaytona, owner: &str) -> DaytonaProvider {
    DaytonaProvider::new(config(fake, owner)).expect("provider")
}

fn template() -> Template {
    let mut template = Template::local_default();
    template.name = shoal_shared::Name::from_static("py");
    template.provider = ProviderKind::Daytona;
    template.env = BTreeMap::from([("TEMPLATE_VAR".to_owned(), "from-template".to_owned())]);
    template.daytona.cpu = Some(2);
    template.daytona.auto_stop_minutes = 15;
    template.daytona.auto_archive_minutes = 60;
    template.daytona.auto_delete_minutes = 120;
    template
}

async fn exec(
    sandbox: &dyn Sandbox,
    command: &str,
    timeout: Duration,
) -> shoal_worker::sandbox::ExecOutput {
    sandbox
        .exec(
            &ExecRequest::new(command, timeout),
            &CancellationToken::new(),
        )
        .await
        .expect("exec")
}

#[tokio::test]
async fn create_exec_files_git_and_delete_follow_the_spec() {
    let fake = FakeDaytona::start().await;
    let provider = provider(&fake, "fleet-a");
    let sandbox = provider.create(&template()).await.expect("create");

    // The create request: fixed name, labels, intervals, no env.
    let created = fake.sandboxes();
    assert_eq!(created.len(), 1);
    let body = &created[0].create_body;
    assert!(body["name"].as_str().unwrap().starts_with("shoal-fleet-a-"));
    assert_eq!(body["labels"]["shoal.owner"], "fleet-a");
    assert_eq!(body["labels"]["shoal.template"], "py");
    assert_eq!(body["autoStopInterval"], 15);
    assert_eq!(body["autoArchiveInterval"], 60);
    assert_eq!(body["autoDeleteInterval"], 120);
    assert_eq!(body["cpu"], 2);
    assert_eq!(body["networkBlockAll"], true);
    assert!(body.get("env").is_none(), "create must not set env: {body}");
    assert_eq!(created[0].id, sandbox.id());

    // Exec: separate streams, exit code, template and request env, cwd.
    let output = exec(
        &*sandbox,
        "echo to-out; echo to-err >&2; exit 7",
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(output.exit_code, Some(7));
    assert_eq!(output.stdout.text(), "to-out\n");
    assert_eq!(output.stderr.text(), "to-err\n");
    assert!(!output.timed_out && !output.cancelled);
    let mut request = ExecRequest::new(
        "printf '%s|%s' \"$TEMPLATE_VAR\" \"$SECRET\"",
        Duration::from_secs(20),
    );
    request
        .env
        .insert("SECRET".into(), "s3cr3t 'quoted'".into());
    let output = sandbox
        .exec(&request, &CancellationToken::new())
        .await
        .expect("exec with env");
    assert_eq!(output.stdout.text(), "from-template|s3cr3t 'quoted'");
    assert_eq!(output.exit_code, Some(0));

    // Files: write (with parents), read back, list.
    sandbox
        .write_file("src/lib/hello.txt", b"hello\x00world")
        .await
        .expect("write");
    assert_eq!(
        sandbox.read_file("src/lib/hello.txt").await.expect("read"),
        b"hello\x00world"
    );
    let listed = sandbox.list_files("src/lib").await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].name, "hello.txt");
    assert_eq!(listed[0].size, 11);
    assert!(!listed[0].is_dir);
    let top = sandbox.list_files("").await.expect("list workspace");
    assert!(top.iter().any(|e| e.name == "src" && e.is_dir), "{top:?}");
    let mut in_dir = ExecRequest::new("cat hello.txt | tr '\\0' ' '; pwd", Duration::from_secs(20));
    in_dir.cwd = Some("src/lib".into());
    let output = sandbox
        .exec(&in_dir, &CancellationToken::new())
        .await
        .expect("exec in cwd");
    assert!(
        output.stdout.text().starts_with("hello world"),
        "{:?}",
        output.stdout.text()
    );
    assert!(output
        .stdout
        .text()
        .trim_end()
        .ends_with("/workspace/src/lib"));
    let missing = sandbox
        .read_file("nope.txt")
        .await
        .expect_err("missing file");
    assert_eq!(missing.kind, SandboxErrorKind::NoSuchFile);
    let escape = sandbox
        .read_file("../../etc/passwd")
        .await
        .expect_err("escape");
    assert_eq!(escape.kind, SandboxErrorKind::Path);
    assert_eq!(
        sandbox
            .write_file("/etc/x", b"")
            .await
            .expect_err("absolute")
            .kind,
        SandboxErrorKind::Path
    );

    // Git clone: the request shape, and the directory it made.
    sandbox
        .git_clone("https://example.com/org/repo.git", Some("main"), "repo")
        .await
        .expect("clone");
    let clones = fake.clones();
    assert_eq!(clones.len(), 1);
    assert_eq!(clones[0]["url"], "https://example.com/org/repo.git");
    assert_eq!(clones[0]["branch"], "main");
    assert!(clones[0]["path"]
        .as_str()
        .unwrap()
        .ends_with("/workspace/repo"));
    assert!(sandbox
        .list_files("repo")
        .await
        .expect("clone dir")
        .iter()
        .any(|e| e.name == ".git"));
    let sha = "0123456789abcdef0123456789abcdef01234567";
    sandbox
        .git_clone("https://example.com/x.git", Some(sha), "pinned")
        .await
        .expect("clone at commit");
    assert_eq!(fake.clones()[1]["commit_id"], sha);
    assert!(fake.clones()[1].get("branch").is_none());

    sandbox.health().await.expect("health");

    // Delete, twice: the second is a no-op.
    let id = sandbox.id().to_owned();
    provider.destroy(&id).await.expect("destroy");
    provider.destroy(&id).await.expect("destroy again");
    assert_eq!(fake.calls("deleteSandbox").len(), 1);
    assert_eq!(fake.sandboxes()[0].desired_state, "destroyed");
    assert!(provider.list_owned().await.expect("list").is_empty());
    fake.assert_no_violations();
}

#[tokio::test]
async fn rate_limited_creates_wait_for_retry_after() {
    let fake = FakeDaytona::start().await;
    fake.rate_limit("createSandbox", 2, 1);
    let provider = provider(&fake, "fleet-a");
    let started = Instant::now();
    let sandbox = provider
        .create(&template())
        .await
        .expect("create after 429s");
    // Waiting out each Retry-After is checked by the fake (a call inside
    // the window is a violation, asserted below); here only that the waits
    // were not much longer than asked (generous: the machine may be loaded).
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    let calls = fake.calls("createSandbox");
    assert_eq!(
        calls.iter().map(|c| c.status).collect::<Vec<_>>(),
        vec![429, 429, 200]
    );
    assert_eq!(fake.sandboxes().len(), 1);
    provider.destroy(sandbox.id()).await.expect("destroy");
    fake.assert_no_violations();
}

#[tokio::test]
async fn a_502_after_create_is_resolved_by_name_without_a_duplicate() {
    let fake = FakeDaytona::start().await;
    fake.create_then_502(1);
    let provider = provider(&fake, "fleet-a");
    let sandbox = provider
        .create(&template())
        .await
        .expect("create despite the 502");
    let sandboxes = fake.sandboxes();
    assert_eq!(sandboxes.len(), 1, "a duplicate was created");
    assert_eq!(sandboxes[0].id, sandbox.id());
    let creates = fake.calls("createSandbox");
    assert_eq!(creates.len(), 1);
    assert_eq!(creates[0].status, 502);
    // The lookup was by name.
    let name = &sandboxes[0].name;
    assert!(fake
        .calls("getSandbox")
        .iter()
        .any(|c| c.path.ends_with(name.as_str())));
    assert_eq!(
        exec(&*sandbox, "echo ok", Duration::from_secs(20))
            .await
            .stdout
            .text(),
        "ok\n"
    );
    provider.destroy(sandbox.id()).await.expect("destroy");
    fake.assert_no_violations();
}

#[tokio::test]
async fn slow_answers_time_out_and_are_resolved_without_duplicates() {
    let fake = FakeDaytona::start().await;
    let mut config = config(&fake, "fleet-a");
    config.request_timeout = Duration::from_millis(400);
    let provider = DaytonaProvider::new(config).expect("provider");
    // The create happens but its answer comes too late; one poll is slow too.
    fake.slow("createSandbox", 1, Duration::from_secs(2));
    fake.slow("getSandbox", 1, Duration::from_secs(2));
    let sandbox = provider
        .create(&template())
        .await
        .expect("create despite timeouts");
    assert_eq!(fake.sandboxes().len(), 1, "a duplicate was created");
    assert_eq!(fake.calls("createSandbox").len(), 1);
    assert!(fake.calls("getSandbox").len() >= 2);
    assert_eq!(
        exec(&*sandbox, "echo ok", Duration::from_secs(20))
            .await
            .stdout
            .text(),
        "ok\n"
    );
    provider.destroy(sandbox.id()).await.expect("destroy");
    fake.assert_no_violations();
}

#[tokio::test]
async fn a_sandbox_stuck_in_creating_fails_the_create_and_is_destroyed() {
    let fake = FakeDaytona::start().await;
    fake.stick_in_creating(true);
    let mut config = config(&fake, "fleet-a");
    config.poll.create_deadline = Duration::from_millis(1500);
    let provider = DaytonaProvider::new(config).expect("provider");
    let started = Instant::now();
    let error = provider
        .create(&template())
        .await
        .err()
        .expect("stuck create fails");
    assert_eq!(error.kind, SandboxErrorKind::Create, "{error}");
    assert!(error.message.contains("creating"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // Polled with a growing interval, not hammered: 100 ms ×1.1… is ~12 polls in 1.5 s.
    let polls = fake.calls("getSandbox").len();
    assert!((2..=20).contains(&polls), "{polls} polls");
    let sandboxes = fake.sandboxes();
    assert_eq!(sandboxes.len(), 1);
    assert_eq!(sandboxes[0].desired_state, "destroyed");
    assert_eq!(fake.calls("deleteSandbox").len(), 1);
    fake.assert_no_violations();
}

#[tokio::test]
async fn conflicts_on_state_changes_are_retried() {
    let fake = FakeDaytona::start().await;
    let provider = provider(&fake, "fleet-a");
    let sandbox = provider.create(&template()).await.expect("create");
    fake.conflict("deleteSandbox", 2);
    provider
        .destroy(sandbox.id())
        .await
        .expect("destroy after 409s");
    let statuses: Vec<u16> = fake
        .calls("deleteSandbox")
        .iter()
        .map(|c| c.status)
        .collect();
    assert_eq!(statuses, vec![409, 409, 200]);
    assert_eq!(fake.sandboxes()[0].desired_state, "destroyed");
    fake.assert_no_violations();
}

#[tokio::test]
async fn reattach_starts_a_stopped_sandbox() {
    let fake = FakeDaytona::start().await;
    let provider = provider(&fake, "fleet-a").with_templates([&template()]);
    let sandbox = provider.create(&template()).await.expect("create");
    let id = sandbox.id().to_owned();
    drop(sandbox);
    fake.stop_sandbox(&id);
    fake.conflict("startSandbox", 1);
    let again = provider.reattach(&id).await.expect("reattach");
    assert_eq!(again.id(), id);
    let output = exec(&*again, "echo \"$TEMPLATE_VAR\"", Duration::from_secs(20)).await;
    assert_eq!(output.stdout.text(), "from-template\n");
    assert_eq!(fake.calls("startSandbox").len(), 2);
    let other = DaytonaProvider::new(config(&fake, "fleet-b")).expect("provider");
    let error = other.reattach(&id).await.err().expect("not ours");
    assert_eq!(error.kind, SandboxErrorKind::NotFound);
    assert_eq!(
        other.destroy(&id).await.expect_err("not ours").kind,
        SandboxErrorKind::NotFound
    );
    let error = provider
        .reattach("no-such-sandbox")
        .await
        .err()
        .expect("unknown");
    assert_eq!(error.kind, SandboxErrorKind::NotFound);
    provider.destroy(&id).await.expect("destroy");
    fake.assert_no_violations();
}

#[tokio::test]
async fn an_exec_that_got_an_answer_is_never_replayed() {
    let fake = FakeDaytona::start().await;
    let provider = provider(&fake, "fleet-a");
    let sandbox = provider.create(&template()).await.expect("create");
    let workspace = fake.workspace_of(sandbox.id()).expect("workspace");
    // A gateway error for the exec: an idempotent call would be retried.
    fake.conflict("ExecuteCommand", 1);
    fake.rate_limit("SessionExecuteCommand", 1, 0);
    let error = sandbox
        .exec(
            &ExecRequest::new("echo run >> runs", Duration::from_secs(20)),
            &CancellationToken::new(),
        )
        .await
        .expect_err("no replay");
    assert_eq!(error.kind, SandboxErrorKind::Rejected, "{error}");
    let error = sandbox
        .exec(
            &ExecRequest::new("echo run >> runs", Duration::from_secs(120)),
            &CancellationToken::new(),
        )
        .await
        .expect_err("no replay in a session either");
    assert_eq!(error.kind, SandboxErrorKind::Unavailable, "{error}");
    assert_eq!(fake.calls("SessionExecuteCommand").len(), 1);
    // The first exec call, then the kill sent after the failure: no second exec.
    let statuses: Vec<u16> = fake
        .calls("ExecuteCommand")
        .iter()
        .map(|c| c.status)
        .collect();
    assert_eq!(statuses[0], 409);
    assert!(!workspace.join("runs").exists());
    // Reads are retried.
    fake.rate_limit("ListFiles", 2, 0);
    assert!(sandbox
        .list_files("")
        .await
        .expect("list after 429s")
        .is_empty());
    assert_eq!(fake.calls("ListFiles").len(), 3);
    provider.destroy(sandbox.id()).await.expect("destroy");
    fake.assert_no_violations();
}

#[tokio::test]
async fn long_commands_run_as_session_commands() {
    let fake = FakeDaytona::start().await;
    let provider = provider(&fake, "fleet-a");
    let sandbox = provider.create(&template()).await.expect("create");
    let before = fake.calls("ExecuteCommand").len();
    let output = exec(
        &*sandbox,
        "sleep 0.5; echo long-out; echo long-err >&2; exit 4",
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(output.exit_code, Some(4));
    assert_eq!(output.stdout.text(), "long-out\n");
    assert_eq!(output.stderr.text(), "long-err\n");
    assert_eq!(
        fake.calls("ExecuteCommand").len(),
        before,
        "the synchronous endpoint was used"
    );
    assert_eq!(fake.calls("CreateSession").len(), 1);
    let execs = fake.calls("SessionExecuteCommand");
    assert_eq!(execs.len(), 1);
    assert_eq!(execs[0].status, 202);
    assert!(
        fake.calls("GetSessionCommand").len() >= 2,
        "status was polled"
    );
    assert_eq!(fake.calls("GetSessionCommandLogs").len(), 1);
    assert_eq!(fake.calls("DeleteSession").len(), 1);
    provider.destroy(sandbox.id()).await.expect("destroy");
    fake.assert_no_violations();
}

#[tokio::test]
async fn timeouts_and_cancels_kill_the_command() {
    let fake = FakeDaytona::start().await;
    let provider = provider(&fake, "fleet-a");
    let sandbox = provider.create(&template()).await.expect("create");
    let workspace = fake.workspace_of(sandbox.id()).expect("workspace");

    let started = Instant::now();
    let output = exec(&*sandbox, "sleep 30; touch late-1", Duration::from_secs(1)).await;
    assert!(output.timed_out, "{output:?}");
    assert_eq!(output.exit_code, None);
    assert!(started.elapsed() < Duration::from_secs(10));

    for (timeout, marker) in [
        (Duration::from_secs(20), "late-2"),
        (Duration::from_secs(120), "late-3"),
    ] {
        let cancel = CancellationToken::new();
        let trigger = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(700)).await;
            trigger.cancel();
        });
        let request = ExecRequest::new(format!("sleep 2; touch {marker}"), timeout);
        let output = sandbox
            .exec(&request, &cancel)
            .await
            .expect("cancelled exec");
        assert!(output.cancelled, "{output:?}");
        assert_eq!(output.exit_code, None);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    for marker in ["late-1", "late-2", "late-3"] {
        assert!(
            !workspace.join(marker).exists(),
            "{marker}: the command survived"
        );
    }
    provider.destroy(sandbox.id()).await.expect("destroy");
    fake.assert_no_violations();
}

#[tokio::test]
async fn the_shell_keeps_directory_and_exports() {
    let fake = FakeDaytona::start().await;
    let provider = provider(&fake, "fleet-a");
    let sandbox = provider.create(&template()).await.expect("create");
    let shell = sandbox.shell().await.expect("shell");
    let cancel = CancellationToken::new();
    let long = Duration::from_secs(20);
    let quiet = Duration::from_secs(5);

    let out = shell
        .run(
            "mkdir -p sub && cd sub && export FOO=bar",
            long,
            quiet,
            &cancel,
        )
        .await
        .expect("cd");
    assert_eq!(out.exit_code, Some(0));
    let out = shell
        .run(
            "pwd; echo \"$FOO $TEMPLATE_VAR\"; echo warn >&2; false",
            long,
            quiet,
            &cancel,
        )
        .await
        .expect("pwd");
    assert_eq!(out.exit_code, Some(1));
    assert!(out.output.contains("/workspace/sub\n"), "{:?}", out.output);
    assert!(
        out.output.contains("bar from-template\n"),
        "{:?}",
        out.output
    );
    assert!(out.output.contains("warn\n"), "{:?}", out.output);

    // Quiet for the no-output timeout: still running; then input finishes it.
    let out = shell
        .run(
            "echo waiting; read line; echo \"got $line\"",
            long,
            Duration::from_millis(800),
            &cancel,
        )
        .await
        .expect("read");
    assert!(out.still_running, "{out:?}");
    assert_eq!(out.output, "waiting\n");
    let out = shell.send_input("hello\n", quiet).await.expect("input");
    assert_eq!(out.exit_code, Some(0));
    assert_eq!(out.output, "got hello\n");

    // C-c stops a running command; the shell survives.
    let out = shell
        .run("sleep 30", long, Duration::from_millis(500), &cancel)
        .await
        .expect("sleep");
    assert!(out.still_running);
    let out = shell.send_input("\u{3}", quiet).await.expect("C-c");
    assert!(!out.still_running);
    assert_ne!(out.exit_code, Some(0));

    // The timeout kills the command, not the shell.
    let started = Instant::now();
    let out = shell
        .run("sleep 30", Duration::from_secs(1), quiet, &cancel)
        .await
        .expect("timeout");
    assert!(out.timed_out, "{out:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let out = shell
        .run("pwd", long, quiet, &cancel)
        .await
        .expect("after timeout");
    assert!(out.output.ends_with("/workspace/sub\n"), "{:?}", out.output);
    drop(shell);
    provider.destroy(sandbox.id()).await.expect("destroy");
    fake.assert_no_violations();
}

#[tokio::test]
async fn the_reaper_lists_and_destroys_only_our_sandboxes() {
    let fake = FakeDaytona::start().await;
    let ours = provider(&fake, "fleet-a");
    let theirs = provider(&fake, "fleet-b");
    let a1 = ours.create(&template()).await.expect("a1");
    let a2 = ours.create(&template()).await.expect("a2");
    let b1 = theirs.create(&template()).await.expect("b1");

    let mut listed = ours.list_owned().await.expect("list");
    listed.sort_by(|x, y| x.id.cmp(&y.id));
    let mut expected = vec![a1.id().to_owned(), a2.id().to_owned()];
    expected.sort();
    assert_eq!(
        listed.iter().map(|s| s.id.clone()).collect::<Vec<_>>(),
        expected
    );
    assert!(listed
        .iter()
        .all(|s| s.owner == "fleet-a" && s.template == "py"));
    assert!(fake.calls("listSandboxes").iter().all(|c| c.status == 200));

    for owned in &listed {
        ours.destroy(&owned.id).await.expect("reap");
    }
    assert!(ours
        .list_owned()
        .await
        .expect("list after reaping")
        .is_empty());
    let left = theirs.list_owned().await.expect("theirs");
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].id, b1.id());
    theirs.destroy(b1.id()).await.expect("destroy b1");
    fake.assert_no_violations();
}

#[tokio::test]
async fn the_fake_rejects_requests_that_break_the_spec() {
    // Guards the guard: a validator that never complains proves nothing.
    let fake = FakeDaytona::start().await;
    let client = reqwest::Client::new();
    let bad = client
        .post(format!("{}/sandbox", fake.api_url))
        .bearer_auth(&fake.api_key)
        .header("content-type", "application/json")
        .body(r#"{"name": "x", "cpu": "two", "labels": {"a": 1}}"#)
        .send()
        .await
        .expect("send");
    assert_eq!(bad.status(), 400);
    let no_auth = client
        .get(format!("{}/sandbox?labels=%7B%7D", fake.api_url))
        .send()
        .await
        .expect("send");
    assert_eq!(no_auth.status(), 400);
    let unknown = client
        .get(format!("{}/sandbox?colour=blue", fake.api_url))
        .bearer_auth(&fake.api_key)
        .send()
        .await
        .expect("send");
    assert_eq!(unknown.status(), 400);
    let messages: Vec<String> = fake
        .violations()
        .iter()
        .map(|v| v.message.clone())
        .collect();
    assert!(messages.iter().any(|m| m.contains("cpu")), "{messages:?}");
    assert!(
        messages.iter().any(|m| m.contains("Authorization")),
        "{messages:?}"
    );
    assert!(
        messages.iter().any(|m| m.contains("colour")),
        "{messages:?}"
    );
}

#[test]
#[should_panic(expected = "is missing")]
fn missing_specs_fail_loudly() {
    // The tests must fail, never skip, without the specs.
    shoal_tests::daytona_fake::spec::Spec::load_both(std::path::Path::new(
        "/nonexistent/daytona-specs",
    ));
}

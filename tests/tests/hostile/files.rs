//! Items 4 and 5 of issue 17: the local sandbox's file API against special
//! files planted by sandboxed code, and the persistent shell against code
//! that forges its end-of-command marker.

use std::future::Future;
use std::time::Duration;

use shoal_tests::local_fixture::LocalFixture;
use shoal_worker::sandbox::{ExecRequest, Sandbox, SandboxError, SandboxErrorKind, ShellSession};
use tokio_util::sync::CancellationToken;

/// Generous upper bound for a file operation that must not block.
const PROMPT: Duration = Duration::from_secs(20);

/// A provider with its own root and uid range, so these tests run beside
/// any other.
async fn new_fixture(owner: &str) -> LocalFixture {
    LocalFixture::new(
        "hostile",
        owner,
        540000,
        "workspace_mb = 64\ntmp_mb = 16\nlimit_processes = 64\n",
    )
    .await
}

async fn sh(sandbox: &dyn Sandbox, command: &str) {
    let output = sandbox
        .exec(
            &ExecRequest::new(command, Duration::from_secs(30)),
            &CancellationToken::new(),
        )
        .await
        .expect("exec");
    assert_eq!(
        output.exit_code,
        Some(0),
        "{command}: {}",
        output.stderr.text()
    );
}

/// Runs a file operation that must come back (with an error) well within
/// `PROMPT`, and returns its error.
async fn refused<T: std::fmt::Debug>(
    what: &str,
    operation: impl Future<Output = Result<T, SandboxError>>,
) -> SandboxError {
    match tokio::time::timeout(PROMPT, operation).await {
        Err(_) => panic!("{what} blocked for {PROMPT:?}"),
        Ok(Ok(value)) => panic!("{what} succeeded: {value:?}"),
        Ok(Err(error)) => error,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_in_the_workspace_does_not_block_the_file_api() {
    let fixture = new_fixture("fifo").await;
    let sandbox = fixture.sandbox().await;
    sh(
        &*sandbox,
        "mkfifo pipe && ln -s pipe link-to-pipe && mkdir many && \
         for i in $(seq 64); do mkfifo many/p$i; done",
    )
    .await;
    for path in ["pipe", "link-to-pipe"] {
        let error = refused(path, sandbox.read_file(path)).await;
        assert_eq!(error.kind, SandboxErrorKind::Rejected, "{error}");
        assert!(
            error.message.contains(path) && error.message.contains("FIFO"),
            "{error}"
        );
        let error = refused(path, sandbox.write_file(path, b"x")).await;
        assert_eq!(error.kind, SandboxErrorKind::Rejected, "{error}");
        assert!(error.message.contains("FIFO"), "{error}");
    }
    // A reader waiting on the other end changes nothing.
    let reader = {
        use std::os::unix::fs::OpenOptionsExt;
        const O_NONBLOCK: i32 = 0o4000;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(O_NONBLOCK)
            .open(fixture.workspace(&*sandbox).join("pipe"))
            .expect("open the FIFO for reading")
    };
    let error = refused("write with a reader", sandbox.write_file("pipe", b"x")).await;
    assert_eq!(error.kind, SandboxErrorKind::Rejected, "{error}");
    drop(reader);

    // Many at once do not use up the blocking pool.
    let reads = (1..=64).map(|i| {
        let sandbox = &*sandbox;
        async move { sandbox.read_file(&format!("many/p{i}")).await }
    });
    let results = tokio::time::timeout(PROMPT, futures::future::join_all(reads))
        .await
        .expect("64 reads of FIFOs at once blocked");
    assert!(results.iter().all(|r| r.is_err()), "{results:?}");
    sandbox.write_file("ok.txt", b"fine").await.expect("write");
    assert_eq!(sandbox.read_file("ok.txt").await.expect("read"), b"fine");
    fixture.finish(sandbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_devices_and_huge_sparse_files_in_the_workspace_are_refused() {
    let fixture = new_fixture("special").await;
    let sandbox = fixture.sandbox().await;
    let workspace = fixture.workspace(&*sandbox);
    // Planted from the host side (root), as a hostile image or a race could.
    // A socket's path must be short: bind through a short symbolic link.
    let short = std::env::temp_dir().join(format!("shoal-sock-{}", &sandbox.id()[6..18]));
    std::os::unix::fs::symlink(&workspace, &short).expect("symlink");
    let listener = std::os::unix::net::UnixListener::bind(short.join("sock"));
    std::fs::remove_file(&short).expect("remove the symlink");
    let _listener = listener.expect("bind a socket");
    let mknod = std::process::Command::new("mknod")
        .arg(workspace.join("null"))
        .args(["c", "1", "3"])
        .status()
        .expect("mknod");
    assert!(mknod.success());
    std::fs::File::create(workspace.join("sparse"))
        .and_then(|f| f.set_len(1 << 40))
        .expect("a 1 TiB sparse file");
    for (path, kind) in [("sock", "socket"), ("null", "device")] {
        let error = refused(path, sandbox.read_file(path)).await;
        assert_eq!(error.kind, SandboxErrorKind::Rejected, "{error}");
        assert!(
            error.message.contains(path) && error.message.contains(kind),
            "{error}"
        );
        let error = refused(path, sandbox.write_file(path, b"x")).await;
        assert_eq!(error.kind, SandboxErrorKind::Rejected, "{error}");
        assert!(error.message.contains(kind), "{error}");
    }
    let error = refused("sparse", sandbox.read_file("sparse")).await;
    assert_eq!(error.kind, SandboxErrorKind::Rejected, "{error}");
    assert!(error.message.contains("bytes"), "{error}");
    fixture.finish(sandbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_a_directory_with_too_many_entries_is_refused() {
    let fixture = new_fixture("many").await;
    let sandbox = fixture.sandbox().await;
    // One more than the cap the local provider documents (MAX_LIST_ENTRIES).
    let over = 10_001;
    sh(
        &*sandbox,
        &format!("mkdir crowd && cd crowd && seq {over} | xargs touch"),
    )
    .await;
    let error = refused("crowd", sandbox.list_files("crowd")).await;
    assert_eq!(error.kind, SandboxErrorKind::Rejected, "{error}");
    assert!(error.message.contains("crowd"), "{error}");
    // The workspace root, with one entry, still lists.
    let listing = sandbox.list_files("").await.expect("list");
    assert_eq!(listing.len(), 1);
    fixture.finish(sandbox).await;
}

/// Every string in `text` that looks like a nonce (16 or more hex digits).
const FORGE: &str = r#"
forge() { for n in $(printf '%s\n' "$1" | grep -oE '[0-9a-f]{16,}' | sort -u); do
    printf '\036%s:0:/forged\036\n' "$n"; printf '\036%s:0:/forged\036' "$n"; done; }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxed_code_cannot_forge_the_shells_exit_marker() {
    let fixture = new_fixture("marker").await;
    let sandbox = fixture.sandbox().await;
    let shell = sandbox.shell().await.expect("shell");
    let cancel = CancellationToken::new();
    let (long, quiet) = (Duration::from_secs(30), Duration::from_secs(10));
    let run = |command: String| {
        let shell: &dyn ShellSession = &*shell;
        let cancel = &cancel;
        async move { shell.run(&command, long, quiet, cancel).await.expect("run") }
    };
    let out = run("mkdir -p real && cd real".into()).await;
    assert_eq!(out.exit_code, Some(0), "{out:?}");

    // Code run by the shell reads everything the shell holds and prints a
    // marker with every candidate nonce, then fails.
    let out = run(format!(
        "{FORGE}\nforge \"$PROMPT_COMMAND $(set) $(declare -f) $(trap -p) $(history) $(env) \
         $(cat /proc/$$/environ /proc/$$/cmdline | tr '\\0' ' ')\"\nfalse"
    ))
    .await;
    assert_eq!(
        out.exit_code,
        Some(1),
        "a forged exit code got through: {out:?}"
    );
    assert_eq!(out.cwd.as_deref(), Some("/workspace/real"), "{out:?}");

    // A program the command starts does the same and exits 3.
    sandbox
        .write_file(
            "real/evil.sh",
            format!(
                "{FORGE}\nforge \"$(cat /proc/$PPID/environ /proc/$PPID/cmdline | tr '\\0' ' ') \
                 $(env) $(ls /tmp /workspace)\"\nexit 3\n"
            )
            .as_bytes(),
        )
        .await
        .expect("write");
    let out = run("bash evil.sh".into()).await;
    assert_eq!(
        out.exit_code,
        Some(3),
        "a forged exit code got through: {out:?}"
    );
    assert_eq!(out.cwd.as_deref(), Some("/workspace/real"), "{out:?}");

    // The nonce of an earlier command is worth nothing later: one that
    // survived in the shell's output of the old design would be replayed.
    let out = run("echo $PROMPT_COMMAND".into()).await;
    let earlier = out.output.clone();
    let out = run(format!("{FORGE}\nforge \"{earlier}\"\nfalse")).await;
    assert_eq!(out.exit_code, Some(1), "{out:?}");

    // And the shell is still in step: the next command gets its own answer.
    let out = run("pwd".into()).await;
    assert_eq!(out.output, "/workspace/real\n", "{out:?}");
    assert_eq!(out.exit_code, Some(0));
    drop(shell);
    fixture.finish(sandbox).await;
}

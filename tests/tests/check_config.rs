//! `--check-config` on the real `shoal-worker` and `shoal-scheduler`
//! binaries: the same loader as startup (file, then `SHOAL__*` overrides,
//! full validation), a one-line summary and exit 0 when valid, the error
//! naming the key on stderr and a non-zero exit when not. The broker and
//! Redis URLs point at a closed port: a check that tried to connect would fail
//! or hang instead of printing `config ok`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use shoal_tests::harness::binary_path;

const BINARIES: [&str; 2] = ["shoal-worker", "shoal-scheduler"];

/// A complete configuration: two templates (one Daytona), one extra model
/// beside the three built-in ones, nothing reachable.
const GOOD: &str = r#"
namespace = "ckcfg"

[broker]
url = "amqp://guest:guest@127.0.0.1:1/%2f"

[redis]
url = "redis://127.0.0.1:1/"

[scheduler]
listen = "127.0.0.1:1"

[worker]
id = "ck-worker"
slots = 3
drain_timeout_s = 120
metrics_listen = "0.0.0.0:9464"

[sandbox.templates.default]
min_idle = 0

[sandbox.templates.cloud]
provider = "daytona"

[models.mini]
provider = "openai"
base_url = "http://127.0.0.1:1/v1"
model = "mini"
"#;

/// Runs `binary --check-config [--config file]` with only `env` set (the
/// test's own `SHOAL__*` variables must not leak in), waiting at most a minute.
fn check(binary: &str, config: Option<&Path>, env: &[(&str, &str)]) -> Output {
    let home = tempdir();
    let mut command = Command::new(binary_path(binary));
    command
        .arg("--check-config")
        .env_clear()
        .env("HOME", &home)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(config) = config {
        command.arg("--config").arg(config);
    }
    let mut child = command.spawn().expect("spawn the binary");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{binary} --check-config still running after a minute");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().expect("collect output");
    let _ = std::fs::remove_dir_all(home);
    output
}

fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "shoal-check-config-{}-{}",
        std::process::id(),
        uuid::Uuid::now_v7()
    ));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// A configuration file in its own temp dir, removed on drop.
struct ConfigFile(PathBuf);

impl std::ops::Deref for ConfigFile {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Writes `text` to a fresh file.
fn config_file(text: &str) -> ConfigFile {
    let path = tempdir().join("shoal.toml");
    std::fs::write(&path, text).expect("write config");
    ConfigFile(path)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The run succeeded with one `config ok:` line on stdout, nothing on stderr.
fn assert_ok(binary: &str, output: &Output) -> String {
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert!(
        output.status.success(),
        "{binary}: expected success, got {:?}\nstdout: {stdout}\nstderr: {stderr}",
        output.status
    );
    assert_eq!(stdout.lines().count(), 1, "{binary}: one line: {stdout:?}");
    assert!(stdout.starts_with("config ok: "), "{binary}: {stdout:?}");
    assert!(stderr.is_empty(), "{binary}: stderr: {stderr:?}");
    stdout
}

/// The run failed, printed nothing on stdout and an error containing every
/// one of `needles` on stderr.
fn assert_fails(binary: &str, output: &Output, needles: &[&str]) {
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert!(
        !output.status.success(),
        "{binary}: expected failure\nstdout: {stdout}\nstderr: {stderr}"
    );
    assert!(stdout.is_empty(), "{binary}: stdout on failure: {stdout:?}");
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "{binary}: stderr should name {needle:?}: {stderr:?}"
        );
    }
}

#[test]
fn a_good_file_passes_with_a_summary() {
    let file = config_file(GOOD);
    for binary in BINARIES {
        let stdout = assert_ok(binary, &check(binary, Some(&file), &[]));
        assert!(
            stdout.starts_with("config ok: namespace=ckcfg, 2 templates"),
            "{binary}: {stdout:?}"
        );
        assert!(stdout.contains(", 4 models"), "{binary}: {stdout:?}");
    }
    let worker = assert_ok("shoal-worker", &check("shoal-worker", Some(&file), &[]));
    for part in [
        "(1 daytona)",
        "worker ck-worker with 3 slots",
        "drain_timeout=120s",
        "metrics=0.0.0.0:9464",
    ] {
        assert!(
            worker.contains(part),
            "worker summary lacks {part:?}: {worker:?}"
        );
    }
    let scheduler = assert_ok(
        "shoal-scheduler",
        &check("shoal-scheduler", Some(&file), &[]),
    );
    assert!(scheduler.contains("listen=127.0.0.1:1"), "{scheduler:?}");
}

#[test]
fn the_config_file_may_come_from_shoal_config() {
    let file = config_file(GOOD);
    let path = file.0.to_str().expect("utf-8 path");
    for binary in BINARIES {
        let stdout = assert_ok(binary, &check(binary, None, &[("SHOAL_CONFIG", path)]));
        assert!(stdout.contains("namespace=ckcfg"), "{binary}: {stdout:?}");
    }
}

#[test]
fn a_good_env_override_is_applied() {
    let file = config_file(GOOD);
    for binary in BINARIES {
        let output = check(binary, Some(&file), &[("SHOAL__NAMESPACE", "fromenv")]);
        let stdout = assert_ok(binary, &output);
        assert!(
            stdout.contains("namespace=fromenv,"),
            "{binary}: {stdout:?}"
        );
    }
    let output = check(
        "shoal-worker",
        Some(&file),
        &[("SHOAL__WORKER__SLOTS", "7")],
    );
    let stdout = assert_ok("shoal-worker", &output);
    assert!(stdout.contains("with 7 slots"), "{stdout:?}");
}

#[test]
fn a_bad_value_fails_naming_the_key() {
    let bad_slots = config_file(&GOOD.replace("slots = 3", "slots = 0"));
    let bad_namespace = config_file(&GOOD.replace("\"ckcfg\"", "\"Not A Namespace\""));
    for binary in BINARIES {
        assert_fails(
            binary,
            &check(binary, Some(&bad_slots), &[]),
            &["worker.slots"],
        );
        assert_fails(
            binary,
            &check(binary, Some(&bad_namespace), &[]),
            &["namespace"],
        );
    }
}

#[test]
fn an_unknown_key_fails_naming_it() {
    let unknown = config_file(&GOOD.replace("slots = 3", "slots = 3\nslotz = 3"));
    let unknown_section = config_file(&format!("{GOOD}\n[wrker]\nslots = 1\n"));
    for binary in BINARIES {
        assert_fails(
            binary,
            &check(binary, Some(&unknown), &[]),
            &["unknown field `slotz`", "worker"],
        );
        assert_fails(
            binary,
            &check(binary, Some(&unknown_section), &[]),
            &["unknown field `wrker`"],
        );
    }
}

#[test]
fn an_env_override_with_a_bad_value_fails_naming_the_key() {
    let file = config_file(GOOD);
    for binary in BINARIES {
        // Parsed but out of range.
        let output = check(binary, Some(&file), &[("SHOAL__WORKER__SLOTS", "0")]);
        assert_fails(binary, &output, &["worker.slots"]);
        // Not a number at all.
        let output = check(
            binary,
            Some(&file),
            &[("SHOAL__WORKER__DRAIN_TIMEOUT_S", "soon")],
        );
        assert_fails(binary, &output, &["worker.drain_timeout_s"]);
        // An override of a key that does not exist.
        let output = check(binary, Some(&file), &[("SHOAL__WORKER__SLOTZ", "2")]);
        assert_fails(binary, &output, &["unknown field `slotz`"]);
    }
}

#[test]
fn a_missing_file_fails() {
    let dir = config_file(GOOD);
    let missing = dir.with_file_name("absent.toml");
    for binary in BINARIES {
        let output = check(binary, Some(&missing), &[]);
        assert_fails(binary, &output, &["absent.toml"]);
    }
}

//! `make demo`'s script, end to end, with the LLM simulator standing in for
//! llama-server (same wire format, constrained tool calls as the local model
//! uses; the simulator checks each scripted reply against the request's
//! schema), so a broken demo fails CI without the 5-minute llama.cpp build.

use std::time::Duration;

use shoal_tests::llm_sim::{LlmSim, Script, Turn};
use shoal_tests::TestEnv;

/// A reply as a schema-constrained local model writes it.
fn call(name: &str, params: &[(&str, &str)]) -> Turn {
    let arguments: serde_json::Map<String, serde_json::Value> = params
        .iter()
        .map(|(k, v)| ((*k).to_owned(), serde_json::Value::String((*v).to_owned())))
        .collect();
    Turn::text(
        serde_json::json!({"thought": format!("Next I use {name}."), "name": name, "arguments": arguments})
            .to_string(),
    )
}

/// The repository's root.
fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `deploy/local/demo.sh` on a free port, with `env`'s namespace and sandbox
/// root (its teardown then checks that nothing was left behind) and the LLM
/// simulator at `sim_url` as its model; no provider key leaks in.
fn demo_script(env: &TestEnv, sim_url: &str) -> (tokio::process::Command, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut command = tokio::process::Command::new("bash");
    command
        .arg(root().join("deploy/local/demo.sh"))
        .env("SHOAL_DEMO_LLM_URL", sim_url)
        .env("SHOAL_DEMO_PORT", port.to_string())
        .env("SHOAL__NAMESPACE", env.settings.namespace.as_str())
        .env("SHOAL__SANDBOX__ROOT", &env.settings.sandbox.root)
        .env("SHOAL__WORKER__METRICS_LISTEN", "127.0.0.1:0")
        .env_remove("ANTHROPIC_API_KEY")
        .env_remove("OPENAI_API_KEY");
    (command, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_script_runs_an_agent_task_to_its_answer() {
    let (sim_url, sim) = LlmSim::start(Script::turns([
        call(
            "file_editor",
            &[
                ("command", "create"),
                ("path", "/workspace/fib.py"),
                ("file_text", "a, b = 0, 1\nout = []\nfor _ in range(20):\n    out.append(a)\n    a, b = b, a + b\nprint(*out)\n"),
            ],
        ),
        call("terminal", &[("command", "python3 fib.py")]),
        call("finish", &[("message", "fib.py prints: 0 1 1 2 3 5 8 13 21 34 55 89 144 233 377 610 987 1597 2584 4181")]),
    ]))
    .await;
    // The env gives the demo its own namespace and sandbox root, and checks
    // on teardown that nothing was left behind.
    let env = TestEnv::new("demo", "").await;
    let (mut demo, _) = demo_script(&env, &sim_url);
    let output = tokio::time::timeout(Duration::from_secs(240), demo.output())
        .await
        .expect("the demo finishes")
        .expect("run the demo script");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "demo failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    // Live events were rendered, then the outcome and the answer.
    assert!(stdout.contains("▶ file_editor"), "{stdout}");
    assert!(stdout.contains("create /workspace/fib.py"), "{stdout}");
    assert!(stdout.contains("$ python3 fib.py"), "{stdout}");
    assert!(stdout.contains("state     succeeded"), "{stdout}");
    assert!(stdout.contains("outcome   finished"), "{stdout}");
    assert!(stdout.contains("files     fib.py"), "{stdout}");
    assert!(stdout.contains("4181"), "{stdout}");
    assert!(stdout.contains("the agent finished the task"), "{stdout}");
    sim.assert_no_violations();
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn make_fleet_keeps_the_fleet_running_for_your_tasks_until_interrupted() {
    use tokio::io::{AsyncBufReadExt, BufReader};

    // No scripted turns: this fleet only runs an exec task.
    let (sim_url, _sim) = LlmSim::start(Script::turns([])).await;
    let env = TestEnv::new("fleet", "").await;
    let (mut fleet, port) = demo_script(&env, &sim_url);
    let mut fleet = fleet
        .env("SHOAL_DEMO_TASK", "0")
        .env("SHOAL_DEMO_STAY", "1")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the fleet");
    let mut lines = BufReader::new(fleet.stdout.take().expect("stdout")).lines();
    let mut seen = Vec::new();
    tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(line) = lines.next_line().await.expect("read") {
            let ready = line.contains("Ctrl-C here stops everything");
            seen.push(line);
            if ready {
                return;
            }
        }
        panic!("the fleet script ended early:\n{}", seen.join("\n"));
    })
    .await
    .expect("the fleet comes up");
    let text = seen.join("\n");
    assert!(text.contains("The fleet is running"), "{text}");
    assert!(!text.contains("submitting an agent task"), "{text}");

    // Your own task, through the CLI, as the printed instructions say.
    let cli = root().join("target/debug/shoal");
    let output = tokio::process::Command::new(&cli)
        .args(["submit", "--exec", "echo from-my-task", "--wait"])
        .env("SHOAL_SERVER", format!("http://127.0.0.1:{port}"))
        .output()
        .await
        .expect("run shoal");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("from-my-task"), "{stdout}");

    // Ctrl-C: everything it started stops, and the script says so by exiting.
    let pid = fleet.id().expect("pid").to_string();
    let sent = tokio::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .await
        .expect("kill");
    assert!(sent.success());
    let status = tokio::time::timeout(Duration::from_secs(60), fleet.wait())
        .await
        .expect("the fleet stops after Ctrl-C")
        .expect("wait");
    assert_eq!(status.code(), Some(130));
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the scheduler still listens after Ctrl-C"
    );
    env.teardown().await;
}

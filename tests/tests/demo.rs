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
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let output = tokio::time::timeout(
        Duration::from_secs(240),
        tokio::process::Command::new("bash")
            .arg(root.join("deploy/local/demo.sh"))
            .env("SHOAL_DEMO_LLM_URL", &sim_url)
            .env("SHOAL_DEMO_PORT", port.to_string())
            .env("SHOAL__NAMESPACE", &env.settings.namespace)
            .env("SHOAL__SANDBOX__ROOT", &env.settings.sandbox.root)
            .env("SHOAL__WORKER__METRICS_LISTEN", "127.0.0.1:0")
            .env_remove("ANTHROPIC_API_KEY")
            .env_remove("OPENAI_API_KEY")
            .output(),
    )
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

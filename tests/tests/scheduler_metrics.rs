//! The scheduler's `/metrics`: scraped before and after real submissions,
//! refusals, cancels and event streams against real RabbitMQ and Redis; every
//! scrape parsed strictly, and the change of every sample asserted exactly.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};
use shoal_shared::task::TaskId;
use shoal_tests::{wait_until, TestEnv};

/// `name{label="value",...}` (labels sorted) -> value.
type Samples = BTreeMap<String, f64>;

/// A strict reader of the OpenMetrics text the scheduler serves: every line
/// a `# HELP`/`# TYPE`/`# UNIT` comment or a sample of a declared family,
/// label values quoted and escaped, values numbers, no sample twice,
/// histogram buckets cumulative and ending in `+Inf` = `_count`, and the
/// exposition ending with `# EOF`.
fn parse(text: &str) -> Samples {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = Samples::new();
    let mut lines = text.lines().peekable();
    let mut saw_eof = false;
    while let Some(line) = lines.next() {
        assert!(!saw_eof, "a line after # EOF: {line:?}");
        if line == "# EOF" {
            saw_eof = true;
            assert!(lines.peek().is_none(), "text after # EOF");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (keyword, name) = (parts.next().unwrap(), parts.next().expect(line));
            assert!(valid_name(name), "bad family name in {line:?}");
            match keyword {
                "TYPE" => {
                    let kind = parts.next().expect(line);
                    assert!(
                        ["counter", "gauge", "histogram", "info", "unknown"].contains(&kind),
                        "{line:?}"
                    );
                    assert!(
                        types.insert(name.to_owned(), kind.to_owned()).is_none(),
                        "family declared twice: {line:?}"
                    );
                }
                "HELP" | "UNIT" => {}
                _ => panic!("unknown comment {line:?}"),
            }
            continue;
        }
        let (name, labels, value) = sample(line);
        let family = family_of(&name, &types)
            .unwrap_or_else(|| panic!("sample of an undeclared family: {line:?}"));
        if types[&family] == "counter" {
            assert!(
                name.ends_with("_total") || name.ends_with("_created"),
                "{line:?}"
            );
        }
        let key = key(&name, &labels);
        assert!(
            samples.insert(key.clone(), value).is_none(),
            "sample twice: {key}"
        );
    }
    assert!(saw_eof, "the exposition does not end with # EOF");
    for (family, kind) in &types {
        if kind != "histogram" {
            continue;
        }
        let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for (key, value) in &samples {
            let Some(rest) = key.strip_prefix(&format!("{family}_bucket{{")) else {
                continue;
            };
            let labels = parse_labels(rest.strip_suffix('}').unwrap());
            let le = labels.get("le").expect("a bucket without le");
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap()
            };
            let mut rest = labels.clone();
            rest.remove("le");
            series
                .entry(key_of_map(&format!("{family}_count"), &rest))
                .or_default()
                .push((le, *value));
        }
        for (count_key, mut buckets) in series {
            buckets.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
            assert!(
                buckets.windows(2).all(|w| w[0].1 <= w[1].1),
                "buckets not cumulative: {count_key}"
            );
            let last = buckets.last().unwrap();
            assert!(last.0.is_infinite(), "no +Inf bucket for {count_key}");
            assert_eq!(Some(&last.1), samples.get(&count_key), "{count_key}");
        }
    }
    samples
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn family_of(sample: &str, types: &BTreeMap<String, String>) -> Option<String> {
    if types.contains_key(sample) {
        return Some(sample.to_owned());
    }
    ["_total", "_created", "_bucket", "_count", "_sum", "_info"]
        .iter()
        .find_map(|suffix| sample.strip_suffix(suffix))
        .filter(|base| types.contains_key(*base))
        .map(str::to_owned)
}

/// `name{labels} value` -> its parts.
fn sample(line: &str) -> (String, BTreeMap<String, String>, f64) {
    let (head, value) = match line.find('{') {
        Some(open) => {
            let close = line.rfind("} ").unwrap_or_else(|| panic!("{line:?}"));
            let labels = parse_labels(&line[open + 1..close]);
            let name = &line[..open];
            assert!(valid_name(name), "{line:?}");
            ((name.to_owned(), labels), &line[close + 2..])
        }
        None => {
            let (name, value) = line.split_once(' ').unwrap_or_else(|| panic!("{line:?}"));
            assert!(valid_name(name), "{line:?}");
            ((name.to_owned(), BTreeMap::new()), value)
        }
    };
    let value: f64 = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}")),
    };
    (head.0, head.1, value)
}

/// `a="x",b="y"` with `\\`, `\"`, `\n` escapes.
fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (name, after) = rest
            .split_once("=\"")
            .unwrap_or_else(|| panic!("bad labels {text:?}"));
        assert!(valid_name(name), "bad label name in {text:?}");
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    _ => panic!("bad escape in {text:?}"),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => panic!("unterminated label value in {text:?}"),
            }
        };
        assert!(
            labels.insert(name.to_owned(), value).is_none(),
            "label twice in {text:?}"
        );
        rest = &after[end + 1..];
        if let Some(next) = rest.strip_prefix(',') {
            rest = next;
        } else {
            assert!(rest.is_empty(), "bad labels {text:?}");
        }
    }
    labels
}

fn key_of_map(name: &str, labels: &BTreeMap<String, String>) -> String {
    if labels.is_empty() {
        return name.to_owned();
    }
    let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    format!("{name}{{{}}}", inner.join(","))
}

fn key(name: &str, labels: &BTreeMap<String, String>) -> String {
    key_of_map(name, labels)
}

/// The key for `name` with `labels` (any order).
fn k(name: &str, labels: &[(&str, &str)]) -> String {
    let map = labels
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    key_of_map(name, &map)
}

struct Scraper {
    client: reqwest::Client,
    url: String,
    last: Samples,
}

impl Scraper {
    async fn new(base: &str) -> Self {
        let mut scraper = Self {
            client: reqwest::Client::new(),
            url: format!("{base}/metrics"),
            last: Samples::new(),
        };
        scraper.last = scraper.scrape().await;
        scraper
    }

    /// One scrape, with no credentials (the endpoint is open, like /healthz).
    async fn scrape(&self) -> Samples {
        let response = self.client.get(&self.url).send().await.expect("scrape");
        assert_eq!(response.status(), StatusCode::OK);
        let media = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(media.starts_with("application/openmetrics-text"), "{media}");
        parse(&response.text().await.unwrap())
    }

    /// Every sample that changed since the last call, except histogram
    /// buckets and sums (their values depend on timing): `_count`s are kept.
    async fn delta(&mut self) -> BTreeMap<String, f64> {
        let now = self.scrape().await;
        let mut changed = BTreeMap::new();
        for (key, value) in &now {
            let name = key.split('{').next().unwrap();
            if !name.starts_with("shoal_scheduler_")
                || name.ends_with("_bucket")
                || name.ends_with("_sum")
                || name.ends_with("_created")
            {
                continue;
            }
            let before = self.last.get(key).copied().unwrap_or(0.0);
            if *value != before {
                changed.insert(key.clone(), value - before);
            }
        }
        self.last = now;
        changed
    }

    async fn assert_delta(&mut self, what: &str, expected: &[(String, f64)]) {
        let expected: BTreeMap<String, f64> = expected.iter().cloned().collect();
        let got = self.delta().await;
        assert_eq!(got, expected, "after {what}");
    }
}

const SUBMITTED: &str = "shoal_scheduler_tasks_submitted_total";
const REJECTED: &str = "shoal_scheduler_submissions_rejected_total";
const LATENCY: &str = "shoal_scheduler_submit_seconds_count";
const CONFIRM: &str = "shoal_scheduler_broker_confirm_seconds_count";
const REPLAYS: &str = "shoal_scheduler_idempotent_replays_total";
const CANCELS: &str = "shoal_scheduler_cancels_total";
const BATCH: &str = "shoal_scheduler_batch_size_tasks_count";
const OPEN: &str = "shoal_scheduler_event_streams_open";
const REFUSED: &str = "shoal_scheduler_event_streams_refused_total";

fn latency(endpoint: &str, outcome: &str) -> (String, f64) {
    (
        k(LATENCY, &[("endpoint", endpoint), ("outcome", outcome)]),
        1.0,
    )
}

fn rejected(endpoint: &str, reason: &str) -> (String, f64) {
    (
        k(REJECTED, &[("endpoint", endpoint), ("reason", reason)]),
        1.0,
    )
}

fn exec(priority: &str) -> Value {
    json!({"kind": {"type": "exec", "command": "true"}, "priority": priority})
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    body: &Value,
    key: Option<&str>,
) -> (StatusCode, Value) {
    let mut request = client.post(url).json(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let response = request.send().await.expect("request");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Ends every task the test queued (cancelled, so nothing runs) and lets a
/// worker take their messages off the queues, which teardown checks are empty.
async fn drain(mut env: TestEnv, ids: &[String]) {
    for id in ids {
        let id: TaskId = id.parse().expect("task id");
        env.store
            .request_cancel(&id, "test", "test")
            .await
            .expect("cancel");
    }
    env.start_worker("w1", 1).await;
    let queues: Vec<String> = shoal_shared::Priority::ALL
        .into_iter()
        .map(|p| env.topology.work_queue(p))
        .collect();
    wait_until(
        "the work queues to be empty",
        Duration::from_secs(60),
        || {
            let env = &env;
            let queues = &queues;
            async move {
                for queue in queues {
                    if env.ready_count(queue).await != 0 {
                        return None;
                    }
                }
                Some(())
            }
        },
    )
    .await;
    env.teardown().await;
}

fn ids_of(body: &Value) -> Vec<String> {
    match body["tasks"].as_array() {
        Some(tasks) => tasks
            .iter()
            .map(|t| t["id"].as_str().unwrap().to_owned())
            .collect(),
        None => vec![body["id"].as_str().unwrap().to_owned()],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_submission_refusal_cancel_and_stream_moves_exactly_its_metrics() {
    let mut env = TestEnv::new(
        "sched-metrics",
        "scheduler.tokens.acme-token = \"acme\"\n\
         scheduler.tokens.beta-token = \"beta\"\n\
         scheduler.max_batch = 5\n\
         scheduler.max_streams = 1\n",
    )
    .await;
    let base = env.start_scheduler().await;
    let client = reqwest::Client::new();
    let single = format!("{base}/v1/tasks");
    let batch = format!("{base}/v1/tasks/batch");
    let mut m = Scraper::new(&base).await;
    assert_eq!(m.last.get("shoal_scheduler_event_streams_max"), Some(&1.0));
    assert_eq!(m.last.get(OPEN), Some(&0.0));

    // One exec task, normal priority, as acme.
    let (status, body) = post(&client, &single, Some("acme-token"), &exec("normal"), None).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let first: String = body["id"].as_str().unwrap().to_owned();
    let mut ids = ids_of(&body);
    m.assert_delta(
        "one submission",
        &[
            (
                k(
                    SUBMITTED,
                    &[
                        ("endpoint", "single"),
                        ("kind", "exec"),
                        ("priority", "normal"),
                        ("tenant", "acme"),
                    ],
                ),
                1.0,
            ),
            latency("single", "accepted"),
            (k(CONFIRM, &[("outcome", "ok")]), 1.0),
        ],
    )
    .await;

    // A batch as beta: two exec high, one agent low.
    let tasks = json!({"tasks": [
        exec("high"),
        {"kind": {"type": "agent", "prompt": "say hi", "model": "sim"}, "priority": "low"},
        exec("high"),
    ]});
    let (status, body) = post(&client, &batch, Some("beta-token"), &tasks, None).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    ids.extend(ids_of(&body));
    m.assert_delta(
        "a batch of three",
        &[
            (
                k(
                    SUBMITTED,
                    &[
                        ("endpoint", "batch"),
                        ("kind", "exec"),
                        ("priority", "high"),
                        ("tenant", "beta"),
                    ],
                ),
                2.0,
            ),
            (
                k(
                    SUBMITTED,
                    &[
                        ("endpoint", "batch"),
                        ("kind", "agent"),
                        ("priority", "low"),
                        ("tenant", "beta"),
                    ],
                ),
                1.0,
            ),
            latency("batch", "accepted"),
            (k(CONFIRM, &[("outcome", "ok")]), 1.0),
            (BATCH.to_owned(), 1.0),
        ],
    )
    .await;
    let sum = m.last["shoal_scheduler_batch_size_tasks_sum"];
    assert_eq!(sum, 3.0);

    // An idempotent submission and its replay.
    let (status, _) = post(
        &client,
        &single,
        Some("acme-token"),
        &exec("low"),
        Some("k1"),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = post(
        &client,
        &single,
        Some("acme-token"),
        &exec("low"),
        Some("k1"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    m.assert_delta(
        "a submission and its replay",
        &[
            (
                k(
                    SUBMITTED,
                    &[
                        ("endpoint", "single"),
                        ("kind", "exec"),
                        ("priority", "low"),
                        ("tenant", "acme"),
                    ],
                ),
                1.0,
            ),
            (
                k(REPLAYS, &[("endpoint", "single"), ("tenant", "acme")]),
                1.0,
            ),
            (
                k(LATENCY, &[("endpoint", "single"), ("outcome", "accepted")]),
                2.0,
            ),
            // The replay publishes nothing.
            (k(CONFIRM, &[("outcome", "ok")]), 1.0),
        ],
    )
    .await;

    // Refusals, one of each reason the API can give here.
    let bad_spec = json!({"kind": {"type": "exec", "command": "true"}, "max_attempts": 0});
    let (status, _) = post(&client, &single, Some("acme-token"), &bad_spec, None).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    m.assert_delta(
        "a bad spec",
        &[
            rejected("single", "invalid-task"),
            latency("single", "rejected"),
        ],
    )
    .await;

    let (status, _) = post(&client, &single, Some("wrong-token"), &exec("high"), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = post(&client, &single, None, &exec("high"), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    m.assert_delta(
        "a bad token and none",
        &[
            (
                k(
                    REJECTED,
                    &[("endpoint", "single"), ("reason", "unauthorized")],
                ),
                2.0,
            ),
            (
                k(LATENCY, &[("endpoint", "single"), ("outcome", "rejected")]),
                2.0,
            ),
        ],
    )
    .await;

    let mut as_beta = exec("high");
    as_beta["tenant"] = json!("beta");
    let (status, _) = post(&client, &single, Some("acme-token"), &as_beta, None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let response = client
        .post(&single)
        .bearer_auth("acme-token")
        .header("content-type", "application/json")
        .body("{\"kind\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let six = json!({"tasks": (0..6).map(|_| exec("low")).collect::<Vec<_>>()});
    let (status, _) = post(&client, &batch, Some("beta-token"), &six, None).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let (status, _) = post(
        &client,
        &single,
        Some("acme-token"),
        &exec("high"),
        Some("k1"),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    m.assert_delta(
        "forbidden, malformed, too large a batch, a reused key",
        &[
            rejected("single", "forbidden"),
            rejected("single", "malformed-request"),
            rejected("batch", "batch-too-large"),
            rejected("single", "idempotency-key-reused"),
            (
                k(LATENCY, &[("endpoint", "single"), ("outcome", "rejected")]),
                3.0,
            ),
            latency("batch", "rejected"),
        ],
    )
    .await;

    // An error axum answers itself: no problem type.
    let response = client.put(&single).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    m.assert_delta(
        "a wrong method",
        &[rejected("single", "other"), latency("single", "rejected")],
    )
    .await;

    // An event stream on the first task: open, and the only one allowed.
    let events = format!("{base}/v1/tasks/{first}/events");
    let stream = client
        .get(&events)
        .bearer_auth("acme-token")
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    let refused = client
        .get(&events)
        .bearer_auth("acme-token")
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    m.assert_delta(
        "one stream open and one refused",
        &[
            (OPEN.to_owned(), 1.0),
            (k(REFUSED, &[("reason", "too_many_streams")]), 1.0),
        ],
    )
    .await;

    // Cancels: a queued task (which ends its stream), again, and a missing one.
    let cancel = |id: &str| {
        client
            .post(format!("{base}/v1/tasks/{id}/cancel"))
            .bearer_auth("acme-token")
            .send()
    };
    assert_eq!(cancel(&first).await.unwrap().status(), StatusCode::OK);
    assert_eq!(cancel(&first).await.unwrap().status(), StatusCode::CONFLICT);
    let missing = shoal_shared::task::TaskId::new().to_string();
    assert_eq!(
        cancel(&missing).await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    // The task's final event ends the stream.
    let mut stream = stream;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let next = tokio::time::timeout_at(deadline.into(), stream.chunk())
            .await
            .expect("the stream ends with the task's final event");
        if next.expect("stream chunk").is_none() {
            break;
        }
    }
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(30);
    while m.scrape().await.get(OPEN) != Some(&0.0) {
        assert!(
            Instant::now() < deadline,
            "the open-streams gauge stays up after the stream ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    m.assert_delta(
        "three cancels and the stream's end",
        &[
            (k(CANCELS, &[("outcome", "cancelled")]), 1.0),
            (k(CANCELS, &[("outcome", "already_finished")]), 1.0),
            (k(CANCELS, &[("outcome", "not_found")]), 1.0),
            (OPEN.to_owned(), -1.0),
        ],
    )
    .await;

    drain(env, &ids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_that_is_not_configured_is_never_a_label() {
    let mut env = TestEnv::new("sched-metrics-tenant", "").await;
    let base = env.start_scheduler().await;
    let client = reqwest::Client::new();
    let mut m = Scraper::new(&base).await;
    let single = format!("{base}/v1/tasks");

    let mut mallory = exec("normal");
    mallory["tenant"] = json!("mallory-unlisted");
    let (status, body) = post(&client, &single, None, &mallory, Some("m1")).await;
    assert_eq!(status, StatusCode::CREATED);
    let mut ids = ids_of(&body);
    let (status, _) = post(&client, &single, None, &mallory, Some("m1")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = post(&client, &single, None, &exec("normal"), None).await;
    assert_eq!(status, StatusCode::CREATED);
    ids.extend(ids_of(&body));
    let labels = |tenant| {
        k(
            SUBMITTED,
            &[
                ("endpoint", "single"),
                ("kind", "exec"),
                ("priority", "normal"),
                ("tenant", tenant),
            ],
        )
    };
    m.assert_delta(
        "submissions for an unlisted tenant and for default",
        &[
            (labels("other"), 1.0),
            (labels("default"), 1.0),
            (
                k(REPLAYS, &[("endpoint", "single"), ("tenant", "other")]),
                1.0,
            ),
            (
                k(LATENCY, &[("endpoint", "single"), ("outcome", "accepted")]),
                3.0,
            ),
            (k(CONFIRM, &[("outcome", "ok")]), 2.0),
        ],
    )
    .await;
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!text.contains("mallory"), "{text}");
    drain(env, &ids).await;
}

/// A Redis of this test's own (the real server, on a free port), so it can be
/// stopped without disturbing other tests.
struct PrivateRedis {
    child: tokio::process::Child,
}

impl PrivateRedis {
    async fn start(port: u16) -> Self {
        let mut command = tokio::process::Command::new("redis-server");
        let child = shoal_tests::harness::die_with_test(&mut command)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start redis-server (deploy/local/services.sh installs it)");
        let url = format!("redis://127.0.0.1:{port}/");
        wait_until(
            "the private Redis to answer",
            Duration::from_secs(30),
            || {
                let url = url.clone();
                async move {
                    let client = redis::Client::open(url).ok()?;
                    let mut connection = client.get_multiplexed_async_connection().await.ok()?;
                    redis::cmd("PING")
                        .query_async::<String>(&mut connection)
                        .await
                        .ok()
                }
            },
        )
        .await;
        Self { child }
    }

    async fn kill(mut self) {
        self.child.kill().await.expect("kill redis-server");
    }
}

fn dependency_up(samples: &Samples, dependency: &str) -> Option<f64> {
    samples
        .get(&k(
            "shoal_scheduler_dependency_up",
            &[("dependency", dependency)],
        ))
        .copied()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dependency_up_follows_redis_going_away_and_coming_back() {
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        probe.local_addr().expect("addr").port()
    };
    let redis = PrivateRedis::start(port).await;
    let mut env = TestEnv::new("sched-metrics-deps", "").await;
    // Only the scheduler uses the private Redis; the harness keeps the shared one.
    env.settings.redis.url = format!("redis://127.0.0.1:{port}/");
    let base = env.start_scheduler().await;
    let scraper = Scraper::new(&base).await;
    let client = reqwest::Client::new();
    let ready = |client: &reqwest::Client| {
        let request = client.get(format!("{base}/readyz")).send();
        async move { request.await.expect("readyz").status() }
    };

    let up = scraper.scrape().await;
    assert_eq!(dependency_up(&up, "redis"), Some(1.0));
    assert_eq!(dependency_up(&up, "broker"), Some(1.0));

    redis.kill().await;
    wait_until(
        "the scrape to report Redis down",
        Duration::from_secs(60),
        || {
            let scrape = scraper.scrape();
            async move { (dependency_up(&scrape.await, "redis") == Some(0.0)).then_some(()) }
        },
    )
    .await;
    let down = scraper.scrape().await;
    assert_eq!(
        dependency_up(&down, "broker"),
        Some(1.0),
        "only Redis went away"
    );
    assert_eq!(ready(&client).await, StatusCode::SERVICE_UNAVAILABLE);

    let redis = PrivateRedis::start(port).await;
    wait_until(
        "the scrape to report Redis back",
        Duration::from_secs(60),
        || {
            let scrape = scraper.scrape();
            async move { (dependency_up(&scrape.await, "redis") == Some(1.0)).then_some(()) }
        },
    )
    .await;
    assert_eq!(ready(&client).await, StatusCode::OK);
    env.teardown().await;
    redis.kill().await;
}

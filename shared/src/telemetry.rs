//! Process-wide tracing setup for the binaries, and OpenTelemetry traces over
//! OTLP/HTTP protobuf when an endpoint is configured (ADR 0025).
//!
//! Traces are off unless `OTEL_EXPORTER_OTLP_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set: then no OpenTelemetry layer,
//! no exporter and no propagation work exist. When on, the standard variables
//! are honoured by the SDK (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_TRACES_SAMPLER(_ARG)`, `OTEL_BSP_*`, `OTEL_EXPORTER_OTLP_*HEADERS`,
//! `..._TIMEOUT`); spans go through the workspace's reqwest client.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

use crate::settings::{LogFormat, TelemetrySettings};

/// How long exit waits for the last spans to be flushed.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// The OTLP export timeout when `OTEL_EXPORTER_OTLP_(TRACES_)TIMEOUT` is not
/// set: the specification's default.
const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether this process exports traces (an OTLP endpoint was configured).
static TRACING_ON: AtomicBool = AtomicBool::new(false);

/// Held by a binary's `main` until exit: dropping it flushes the spans still
/// buffered and shuts the exporter down. Empty when traces are off.
#[must_use = "dropping the guard shuts the trace exporter down"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            // Bounded: a collector that accepts the connection and never
            // answers must not keep the process from exiting.
            if let Err(error) = provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
                eprintln!("flushing traces failed: {error}");
            }
        }
    }
}

/// True when an OTLP traces endpoint is configured in the environment.
fn endpoint_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .iter()
    .any(|name| std::env::var(name).is_ok_and(|value| !value.trim().is_empty()))
}

/// Installs the global subscriber: `RUST_LOG` if set, else the configured filter;
/// text or JSON lines on stderr (JSON lines carry the fields of the current
/// span and its parents, so `task_id` and `trace_id` inside a task run). With an OTLP endpoint
/// configured (and inside a Tokio runtime), also exports spans as
/// `service_name` (unless `OTEL_SERVICE_NAME` names another). Calling it twice
/// is harmless (the second subscriber is not installed).
pub fn init(settings: &TelemetrySettings, service_name: &str) -> TelemetryGuard {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.log_filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt_layer = match settings.log_format {
        LogFormat::Json => fmt::layer().json().with_writer(std::io::stderr).boxed(),
        LogFormat::Text => fmt::layer().with_writer(std::io::stderr).boxed(),
    };
    let provider = if endpoint_configured() {
        match tracer_provider(service_name) {
            Ok(provider) => Some(provider),
            Err(error) => {
                eprintln!("OpenTelemetry traces disabled: {error}");
                None
            }
        }
    } else {
        None
    };
    let otel_layer = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("shoal"))
            .with_tracked_inactivity(false)
    });
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(fmt_layer)
        .with(otel_layer)
        .try_init()
        .is_ok();
    if installed && provider.is_some() {
        TRACING_ON.store(true, Ordering::Relaxed);
    }
    TelemetryGuard {
        provider: provider.filter(|_| installed),
    }
}

fn tracer_provider(service_name: &str) -> anyhow_like::Result<SdkTracerProvider> {
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|_| anyhow_like::Error("not inside a Tokio runtime".into()))?;
    let timeout = export_timeout();
    let client = ReqwestOnRuntime {
        client: reqwest::Client::builder()
            .connect_timeout(timeout)
            .timeout(timeout)
            .build()
            .map_err(|error| anyhow_like::Error(error.to_string()))?,
        runtime,
        timeout,
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_http_client(client)
        .with_timeout(timeout)
        .build()
        .map_err(|error| anyhow_like::Error(error.to_string()))?;
    let mut resource = Resource::builder();
    let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|name| !name.is_empty())
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES")
            .is_ok_and(|attributes| attributes.contains("service.name="));
    if !named {
        resource = resource.with_service_name(service_name.to_string());
    }
    Ok(SdkTracerProvider::builder()
        .with_resource(resource.build())
        .with_batch_exporter(exporter)
        .build())
}

/// `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT`, else `OTEL_EXPORTER_OTLP_TIMEOUT`
/// (milliseconds), else 10 s.
fn export_timeout() -> Duration {
    [
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
        "OTEL_EXPORTER_OTLP_TIMEOUT",
    ]
    .iter()
    .find_map(|name| std::env::var(name).ok()?.trim().parse::<u64>().ok())
    .map_or(DEFAULT_EXPORT_TIMEOUT, Duration::from_millis)
}

/// A tiny error type, to keep `anyhow` out of the shared crate.
mod anyhow_like {
    #[derive(Debug)]
    pub struct Error(pub String);
    impl std::fmt::Display for Error {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }
    pub type Result<T> = std::result::Result<T, Error>;
}

/// The OTLP exporter's HTTP client: the workspace's reqwest, run on the
/// process' Tokio runtime (the SDK's batch processor exports from its own
/// thread, outside any runtime).
#[derive(Debug)]
struct ReqwestOnRuntime {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
    /// Bounds a whole export, answer included.
    timeout: Duration,
}

#[async_trait]
impl HttpClient for ReqwestOnRuntime {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let client = self.client.clone();
        let timeout = self.timeout;
        // Called from the SDK's own export thread, outside the runtime: the
        // request and its time limit run on the runtime, this thread only
        // waits for the join handle (which resolves, cancelled, if the
        // runtime shuts down first).
        let task = self.runtime.spawn(async move {
            let exchange = async {
                let (parts, body) = request.into_parts();
                let mut builder = client.request(parts.method, parts.uri.to_string());
                for (name, value) in &parts.headers {
                    builder = builder.header(name, value);
                }
                let response = builder.body(body).send().await?;
                let status = response.status();
                let headers = response.headers().clone();
                let bytes = response.bytes().await?;
                let mut out = Response::new(bytes);
                *out.status_mut() = status;
                *out.headers_mut() = headers;
                Ok::<_, reqwest::Error>(out)
            };
            match tokio::time::timeout(timeout, exchange).await {
                Ok(result) => result.map_err(|error| Box::new(error) as HttpError),
                Err(elapsed) => Err(Box::new(elapsed) as HttpError),
            }
        });
        match task.await {
            Ok(result) => result,
            Err(join) => Err(Box::new(join) as HttpError),
        }
    }
}

/// Whether spans are exported (the propagation helpers do nothing when not).
pub fn traces_enabled() -> bool {
    TRACING_ON.load(Ordering::Relaxed)
}

/// The W3C `traceparent` of `span`, to carry in a message's headers; `None`
/// when traces are off or the span is not sampled-in/valid.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    if !traces_enabled() {
        return None;
    }
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.remove(crate::broker::HEADER_TRACEPARENT)
}

/// Makes `span` a child of the remote span named by `traceparent` (as carried
/// in a message's headers). Call before the span is first entered. No-op when
/// traces are off or the header is missing or malformed.
pub fn set_remote_parent(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(traceparent) = traceparent.filter(|_| traces_enabled()) else {
        return;
    };
    let carrier = HashMap::from([(
        crate::broker::HEADER_TRACEPARENT.to_string(),
        traceparent.to_string(),
    )]);
    let parent = TraceContextPropagator::new().extract(&carrier);
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// Records the span's trace id in its `trace_id` field (declared
/// `trace_id = tracing::field::Empty`), so log lines inside it carry it.
pub fn record_trace_id(span: &tracing::Span) {
    if !traces_enabled() {
        return;
    }
    let context = span.context();
    let span_context = context.span().span_context().clone();
    if span_context.is_valid() {
        span.record("trace_id", span_context.trace_id().to_string());
    }
}

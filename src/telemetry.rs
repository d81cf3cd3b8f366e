//! Logging: `tracing` to stderr, filtered by `IRIS_LOG`, JSON lines with
//! `IRIS_LOG_FORMAT=json`; and, when the environment names an OTLP
//! endpoint, the OpenTelemetry layer beside it ([`crate::traces`]).

mod fields;
mod time;

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

pub fn init() {
    let filter = || EnvFilter::try_from_env("IRIS_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour codes only for a person at a terminal, not in a log file.
    let ansi = std::io::stderr().is_terminal();
    let json = std::env::var("IRIS_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let traces = match crate::traces::layer() {
        Ok(Some(layer)) => layer,
        // Without traces, the subscriber is the plain one: nothing else
        // sees a span or an event.
        result => {
            let builder = tracing_subscriber::fmt()
                .with_env_filter(filter())
                .with_writer(std::io::stderr)
                .with_timer(time::LineTime)
                .with_ansi(ansi);
            let _ = if json {
                builder.json().flatten_event(true).try_init()
            } else if ansi {
                // Styled for a person at a terminal.
                builder.try_init()
            } else {
                builder.fmt_fields(fields::LineFields).try_init()
            };
            if let Err(e) = result {
                tracing::error!("traces are off: {e}");
            }
            return;
        }
    };
    // With traces, each layer has its own filter: `IRIS_LOG` decides the
    // log lines, not which spans are exported.
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_timer(time::LineTime)
        .with_ansi(ansi);
    let logs = if json {
        logs.json()
            .flatten_event(true)
            .with_filter(filter())
            .boxed()
    } else if ansi {
        logs.with_filter(filter()).boxed()
    } else {
        logs.fmt_fields(fields::LineFields)
            .with_filter(filter())
            .boxed()
    };
    let _ = tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init();
    tracing::info!("exporting traces over OTLP/HTTP");
}

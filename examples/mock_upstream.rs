//! A mock OpenAI-compatible upstream for trying Iris without an account, and
//! for the load benchmark. It answers chat completions, plain or streamed.
//!
//!   cargo run --release --example mock_upstream [-- LISTEN_ADDR]   (default 127.0.0.1:9100)

#[path = "../tests/it/support/mock_upstream.rs"]
mod mock_upstream;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let listen = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9100".into());
    let upstream = mock_upstream::MockUpstream::start_on(&listen).await?;
    // Bench runs would otherwise keep every request body.
    upstream.state.keep_bodies(false);
    eprintln!("mock upstream listening on http://{}/v1", upstream.addr);
    tokio::signal::ctrl_c().await?;
    Ok(())
}

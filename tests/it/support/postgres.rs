//! PostgreSQL for Iris's tests, the one harness: the server on
//! 127.0.0.1:5432 (database `test`, or `$IRIS_TEST_POSTGRES_URL`), each test
//! in a schema of its own with a random name, dropped afterwards. The
//! library's spend-log tests include this file with `#[path]` (it names
//! nothing of Iris), like the Redis harness.
//!
//! Without PostgreSQL the tests say they were skipped and pass, unless
//! `IRIS_REQUIRE_REDIS=1` (CI): see [`super::skip`].

#![allow(dead_code)]

use std::time::Duration;

use super::skip;

pub fn test_url() -> String {
    std::env::var("IRIS_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A connection to `url`, or `None` when nothing answers within 2 s.
async fn connect(url: &str) -> Option<tokio_postgres::Client> {
    let connecting = tokio_postgres::connect(url, tokio_postgres::NoTls);
    let (client, connection) = tokio::time::timeout(Duration::from_secs(2), connecting)
        .await
        .ok()?
        .ok()?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Some(client)
}

/// A schema of the test's own on the shared server, dropped on drop (with
/// every connection still open to it).
pub struct SharedPostgres {
    pub base: String,
    pub schema: String,
}

impl SharedPostgres {
    pub async fn get() -> Option<Self> {
        let base = test_url();
        let Some(client) = connect(&base).await else {
            return skip(format!(
                "PostgreSQL at {base} does not answer; start it (or point IRIS_TEST_POSTGRES_URL at one)"
            ));
        };
        let mut random = [0u8; 8];
        getrandom::fill(&mut random).expect("random");
        let schema = format!("iris_test_{}", hex::encode(random));
        client
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .await
            .unwrap_or_else(|e| panic!("create schema {schema}: {e}"));
        Some(Self { base, schema })
    }

    /// The URL of the test's schema: every unqualified table lives there.
    pub fn url(&self) -> String {
        let separator = if self.base.contains('?') { '&' } else { '?' };
        // The application name marks the test's connections, for Drop.
        format!(
            "{}{separator}options=-csearch_path%3D{schema}&application_name={schema}",
            self.base,
            schema = self.schema
        )
    }

    /// A connection to the test's schema, to look at what Iris wrote.
    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url())
            .await
            .unwrap_or_else(|| panic!("PostgreSQL at {} stopped answering", self.base))
    }
}

impl Drop for SharedPostgres {
    fn drop(&mut self) {
        // Drop runs inside the test's runtime: clean up on a thread of its own.
        let (base, schema) = (self.base.clone(), self.schema.clone());
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                if let Some(client) = connect(&base).await {
                    // Connections the test left open (their runtime is
                    // blocked in this drop) may hold locks in the schema.
                    let _ = client
                        .execute(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                             WHERE application_name = $1",
                            &[&schema],
                        )
                        .await;
                    let _ = client
                        .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                        .await;
                }
            });
        })
        .join();
    }
}

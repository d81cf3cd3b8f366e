//! The spend log's tables, created and migrated by Iris itself: each backend
//! has a list of migrations, applied in order, and a `schema_version` table
//! that remembers, per component, the last one applied. A sink applies the
//! ones after it (all of them on a fresh database) in one transaction, so
//! instances starting together never apply one twice. A database migrated
//! by a newer Iris is refused rather than written in a shape this one does
//! not know.
//!
//! To change the schema, append a migration; never edit one that shipped.
//!
//! The spool (records waiting for PostgreSQL, in a SQLite file) is a
//! component of its own, [`SPOOL`]: a file holding only a spool has no
//! `spend_log` table, and the store's file may hold both.

/// This component's row in `schema_version`.
pub const COMPONENT: &str = "spend_log";

/// The spool's row in `schema_version`.
pub const SPOOL_COMPONENT: &str = "spend_spool";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migration {
    pub version: i64,
    pub sql: &'static str,
}

pub const SQLITE_VERSION_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_version (
    component TEXT PRIMARY KEY NOT NULL,
    version   INTEGER NOT NULL
) STRICT";

pub const SQLITE: &[Migration] = &[
    Migration {
        version: 1,
        sql: "
CREATE TABLE spend_log (
    at                INTEGER NOT NULL,  -- Unix ms: when the request ended
    request_id        TEXT NOT NULL,
    client            TEXT NOT NULL,
    model             TEXT,
    upstream          TEXT,
    upstream_model    TEXT,
    status            INTEGER NOT NULL,
    error_code        TEXT,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    total_tokens      INTEGER NOT NULL,
    images            INTEGER NOT NULL,
    image_bytes       INTEGER NOT NULL,
    stream            INTEGER NOT NULL,  -- 0 or 1
    attempts          INTEGER NOT NULL,
    ttfb_ms           INTEGER,
    total_ms          INTEGER NOT NULL
) STRICT;
CREATE INDEX spend_log_at ON spend_log (at);
",
    },
    Migration {
        version: 2,
        // The client's address (see crate::client_addr); none on older records.
        sql: "ALTER TABLE spend_log ADD COLUMN client_addr TEXT;",
    },
    Migration {
        version: 3,
        // Money and teams: the client's team, cached and reasoning tokens,
        // the cost in micro-units of the currency, the endpoint. Older
        // records: no team, 0 of each, `chat` (the only endpoint then).
        sql: "
ALTER TABLE spend_log ADD COLUMN team TEXT;
ALTER TABLE spend_log ADD COLUMN cached_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE spend_log ADD COLUMN reasoning_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE spend_log ADD COLUMN cost_micros INTEGER NOT NULL DEFAULT 0;
ALTER TABLE spend_log ADD COLUMN endpoint TEXT NOT NULL DEFAULT 'chat';
",
    },
    Migration {
        version: 4,
        // Each record's own id, made by Iris (a client may send the same
        // `x-request-id` twice): unique, so a record written twice (a batch
        // sent again after a crash) is kept once. None on older records.
        sql: "
ALTER TABLE spend_log ADD COLUMN record_id TEXT;
CREATE UNIQUE INDEX spend_log_record_id ON spend_log (record_id);
",
    },
    Migration {
        version: 5,
        // The response cache: 1 for an answer served from it (no tokens,
        // no cost); older records were not.
        sql: "ALTER TABLE spend_log ADD COLUMN cache_hit INTEGER NOT NULL DEFAULT 0;",
    },
    Migration {
        version: 6,
        // The contract names the record's cost `cost`, in the currency:
        // derived from the exact micro-units, never written on its own.
        sql: "ALTER TABLE spend_log ADD COLUMN cost REAL \
              GENERATED ALWAYS AS (cost_micros / 1000000.0) VIRTUAL;",
    },
];

/// The spool: a record's fields as the log's columns, in the order they
/// were committed (`seq`), until PostgreSQL has them.
pub const SPOOL: &[Migration] = &[
    Migration {
        version: 1,
        sql: "
CREATE TABLE spend_spool (
    seq               INTEGER PRIMARY KEY,
    record_id         TEXT NOT NULL,
    at                INTEGER NOT NULL,  -- Unix ms
    request_id        TEXT NOT NULL,
    client            TEXT NOT NULL,
    model             TEXT,
    upstream          TEXT,
    upstream_model    TEXT,
    status            INTEGER NOT NULL,
    error_code        TEXT,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    total_tokens      INTEGER NOT NULL,
    images            INTEGER NOT NULL,
    image_bytes       INTEGER NOT NULL,
    stream            INTEGER NOT NULL,
    attempts          INTEGER NOT NULL,
    ttfb_ms           INTEGER,
    total_ms          INTEGER NOT NULL,
    client_addr       TEXT,
    team              TEXT,
    cached_tokens     INTEGER NOT NULL,
    reasoning_tokens  INTEGER NOT NULL,
    cost_micros       INTEGER NOT NULL,
    endpoint          TEXT NOT NULL
) STRICT;
",
    },
    Migration {
        version: 2,
        // As the log's version 5.
        sql: "ALTER TABLE spend_spool ADD COLUMN cache_hit INTEGER NOT NULL DEFAULT 0;",
    },
];

pub const POSTGRES_VERSION_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_version (
    component TEXT PRIMARY KEY,
    version   BIGINT NOT NULL
)";

pub const POSTGRES: &[Migration] = &[
    Migration {
        version: 1,
        sql: "
CREATE TABLE spend_log (
    at                TIMESTAMPTZ NOT NULL,
    request_id        TEXT NOT NULL,
    client            TEXT NOT NULL,
    model             TEXT,
    upstream          TEXT,
    upstream_model    TEXT,
    status            INTEGER NOT NULL,
    error_code        TEXT,
    prompt_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    total_tokens      BIGINT NOT NULL,
    images            INTEGER NOT NULL,
    image_bytes       BIGINT NOT NULL,
    stream            BOOLEAN NOT NULL,
    attempts          INTEGER NOT NULL,
    ttfb_ms           BIGINT,
    total_ms          BIGINT NOT NULL
);
CREATE INDEX spend_log_at ON spend_log (at);
",
    },
    Migration {
        version: 2,
        sql: "ALTER TABLE spend_log ADD COLUMN client_addr TEXT;",
    },
    Migration {
        version: 3,
        sql: "
ALTER TABLE spend_log ADD COLUMN team TEXT;
ALTER TABLE spend_log ADD COLUMN cached_tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE spend_log ADD COLUMN reasoning_tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE spend_log ADD COLUMN cost_micros BIGINT NOT NULL DEFAULT 0;
ALTER TABLE spend_log ADD COLUMN endpoint TEXT NOT NULL DEFAULT 'chat';
",
    },
    Migration {
        version: 4,
        // Inserts say `ON CONFLICT (record_id) DO NOTHING`: a batch sent
        // again (its acknowledgement lost to a crash or a timeout) lands
        // once. Unique on the record's id, not `request_id`: a client may
        // send the same `x-request-id` with two requests, and a log written
        // before this version may hold a batch twice, which a unique index
        // on `request_id` would refuse to build.
        sql: "
ALTER TABLE spend_log ADD COLUMN record_id TEXT;
CREATE UNIQUE INDEX spend_log_record_id ON spend_log (record_id);
",
    },
    Migration {
        version: 5,
        sql: "ALTER TABLE spend_log ADD COLUMN cache_hit BOOLEAN NOT NULL DEFAULT FALSE;",
    },
    Migration {
        version: 6,
        // `cost` in the currency, as the contract names it, from the exact
        // micro-units (NUMERIC: no binary rounding).
        sql: "ALTER TABLE spend_log ADD COLUMN cost NUMERIC \
              GENERATED ALWAYS AS (cost_micros / 1000000.0) STORED;",
    },
];

/// The migrations of `list` that a database at `current` still needs, or
/// why it cannot be used.
pub fn pending(list: &'static [Migration], current: i64) -> Result<&'static [Migration], String> {
    let latest = list.last().map_or(0, |m| m.version);
    if current > latest {
        return Err(format!(
            "the spend log's tables are at schema version {current}, newer than this Iris knows \
             ({latest}): run a newer Iris, or point spend_log at another database"
        ));
    }
    Ok(&list[list.partition_point(|m| m.version <= current)..])
}

/// The version a fully migrated database is at.
pub fn latest(list: &[Migration]) -> i64 {
    list.last().map_or(0, |m| m.version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_ascend_from_one_without_gaps() {
        for list in [SQLITE, POSTGRES, SPOOL] {
            for (i, migration) in list.iter().enumerate() {
                assert_eq!(migration.version, i as i64 + 1);
            }
        }
        assert_eq!(
            latest(SQLITE),
            latest(POSTGRES),
            "the backends move together"
        );
    }

    #[test]
    fn only_later_migrations_are_pending_and_newer_databases_are_refused() {
        assert_eq!(pending(SQLITE, 0).unwrap().len(), SQLITE.len());
        assert!(pending(SQLITE, latest(SQLITE)).unwrap().is_empty());
        let refused = pending(SQLITE, latest(SQLITE) + 1).unwrap_err();
        assert!(refused.contains("newer than this Iris knows"), "{refused}");
    }
}

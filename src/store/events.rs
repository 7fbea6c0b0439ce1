//! The event log: every change to a sandbox's life, in order, with a
//! sequence number a follower can resume from.

use rusqlite::params;
use serde::Serialize;

use super::{now_ms, Result, Store};

#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Event {
    pub seq: i64,
    /// Unix milliseconds.
    pub at: i64,
    /// created, ready, suspended, resumed, labels, timeout, ended.
    pub kind: String,
    pub sandbox_id: Option<String>,
    pub detail: serde_json::Value,
}

/// Records an event inside the transaction that made the change.
pub(super) fn append(
    tx: &rusqlite::Connection,
    kind: &str,
    sandbox_id: Option<&str>,
    detail: &serde_json::Value,
) -> Result<()> {
    tx.execute(
        "INSERT INTO events (at, kind, sandbox_id, detail) VALUES (?1, ?2, ?3, ?4)",
        params![now_ms(), kind, sandbox_id, detail.to_string()],
    )?;
    Ok(())
}

/// The most events one read returns.
pub const MAX_EVENTS_PER_READ: u32 = 1000;

impl Store {
    /// Events after `seq`, oldest first, at most `limit` (capped at
    /// [`MAX_EVENTS_PER_READ`]).
    pub fn events_after(&self, seq: i64, limit: u32) -> Result<Vec<Event>> {
        let mut stmt = self.conn.prepare(
            "SELECT seq, at, kind, sandbox_id, detail FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![seq, limit.min(MAX_EVENTS_PER_READ)], |r| {
            let detail: String = r.get(4)?;
            Ok(Event {
                seq: r.get(0)?,
                at: r.get(1)?,
                kind: r.get(2)?,
                sandbox_id: r.get(3)?,
                detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::Null),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

//! Sandboxes: what each was made from, its state, its labels, when it
//! expires, the VMM child running it, and, once it has ended, why.

use std::fmt;

use rusqlite::{params, OptionalExtension, Row};
use serde::{Deserialize, Serialize};

use super::events::append;
use super::groups::usage;
use super::{now_ms, Result, Store, StoreError};
use crate::labels::Labels;

#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
    strum::Display,
    strum::EnumString,
    strum::IntoStaticStr,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum SandboxState {
    /// Being booted or restored; not yet taking commands.
    Creating,
    Running,
    /// Memory and disks on disk; no VMM process.
    Suspended,
    /// Gone, with an [`EndReason`]. Kept for its history.
    Ended,
}

/// Why a sandbox ended: every sandbox that ends has one.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
    strum::Display,
    strum::EnumString,
    strum::IntoStaticStr,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum EndReason {
    /// Deleted through the API.
    Deleted,
    /// Its timeout passed.
    Expired,
    /// It could not be booted or restored.
    CreateFailed,
    /// Its VMM process died (the detail says how: a signal, an exit status).
    VmmDied,
    /// The guest powered itself off or rebooted.
    GuestPoweredOff,
    /// The daemon restarted and found it half-made or its VMM gone.
    Lost,
}

/// A sandbox about to be created.
#[derive(Clone, Debug)]
pub struct NewSandbox {
    pub id: String,
    pub group: String,
    /// What it is made from (JSON, the API's own description).
    pub source: serde_json::Value,
    pub cpus: u32,
    pub memory_mib: u32,
    pub labels: Labels,
    /// When it expires (unix ms), if ever.
    pub end_at: Option<i64>,
    /// The names of the group's secrets its commands get as environment.
    pub secrets: Vec<String>,
    /// Suspend it after this long (ms) without a command; the next
    /// command resumes it.
    pub idle_suspend_ms: Option<i64>,
    /// Environment every command in it gets.
    pub env: std::collections::BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SandboxRecord {
    pub id: String,
    pub group: String,
    pub state: SandboxState,
    pub source: serde_json::Value,
    pub cpus: u32,
    pub memory_mib: u32,
    pub labels: Labels,
    pub created_at: i64,
    pub end_at: Option<i64>,
    pub ended_at: Option<i64>,
    pub end_reason: Option<EndReason>,
    pub end_detail: Option<String>,
    pub vmm_pid: Option<i32>,
    pub runtime_dir: Option<String>,
    pub secrets: Vec<String>,
    pub idle_suspend_ms: Option<i64>,
    pub env: std::collections::BTreeMap<String, String>,
}

fn corrupt(what: &'static str, detail: impl fmt::Display) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        0,
        rusqlite::types::Type::Text,
        Box::new(StoreError::Corrupt {
            what,
            detail: detail.to_string(),
        }),
    )
}

/// Runs `sql`, whose rows are a word (`what`) and a count.
fn count_by<T>(conn: &rusqlite::Connection, sql: &str, what: &'static str) -> Result<Vec<(T, u64)>>
where
    T: std::str::FromStr,
    T::Err: fmt::Display,
{
    let mut stmt = conn.prepare(sql)?;
    let rows = stmt.query_map([], |r| {
        let raw: String = r.get(0)?;
        let word = raw
            .parse()
            .map_err(|e| corrupt(what, format!("{raw:?}: {e}")))?;
        Ok((word, r.get::<_, i64>(1)?.max(0) as u64))
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

fn record_from(row: &Row) -> rusqlite::Result<SandboxRecord> {
    let text = |name: &str| row.get::<_, String>(name);
    let raw = text("state")?;
    let state = raw
        .parse()
        .map_err(|e| corrupt("sandbox state", format!("{raw:?}: {e}")))?;
    let end_reason = row
        .get::<_, Option<String>>("end_reason")?
        .map(|s| {
            s.parse()
                .map_err(|e| corrupt("end reason", format!("{s:?}: {e}")))
        })
        .transpose()?;
    Ok(SandboxRecord {
        id: text("id")?,
        group: text("group_name")?,
        state,
        source: serde_json::from_str(&text("source")?).map_err(|e| corrupt("source", e))?,
        cpus: row.get("cpus")?,
        memory_mib: row.get("memory_mib")?,
        labels: serde_json::from_str(&text("labels")?).map_err(|e| corrupt("labels", e))?,
        created_at: row.get("created_at")?,
        end_at: row.get("end_at")?,
        ended_at: row.get("ended_at")?,
        end_reason,
        end_detail: row.get("end_detail")?,
        vmm_pid: row.get("vmm_pid")?,
        runtime_dir: row.get("runtime_dir")?,
        secrets: serde_json::from_str(&text("secrets")?).map_err(|e| corrupt("secrets", e))?,
        idle_suspend_ms: row.get("idle_suspend_ms")?,
        env: serde_json::from_str(&text("env")?).map_err(|e| corrupt("env", e))?,
    })
}

fn not_found(id: &str) -> StoreError {
    StoreError::NotFound {
        kind: "sandbox",
        name: id.to_string(),
    }
}

fn get(tx: &rusqlite::Connection, id: &str) -> Result<SandboxRecord> {
    tx.query_row("SELECT * FROM sandboxes WHERE id = ?1", [id], record_from)
        .optional()?
        .ok_or_else(|| not_found(id))
}

impl Store {
    /// Records a new sandbox in state `creating`, if its group's quota
    /// admits it: the check and the insert are one transaction, so
    /// concurrent creates can never pass a quota together.
    pub fn insert_sandbox(
        &mut self,
        new: &NewSandbox,
        host_limit: Option<u32>,
    ) -> Result<SandboxRecord> {
        self.write(|tx| {
            if let Some(limit) = host_limit {
                let live: u32 = tx.query_row(
                    "SELECT count(*) FROM sandboxes WHERE state != 'ended'",
                    [],
                    |r| r.get(0),
                )?;
                if live >= limit {
                    return Err(StoreError::HostFull { limit });
                }
            }
            let group = match tx
                .query_row("SELECT * FROM groups WHERE name = ?1", [&new.group], |r| {
                    super::groups::group_from(r)
                })
                .optional()?
            {
                Some(g) => g,
                None => {
                    return Err(StoreError::NotFound {
                        kind: "group",
                        name: new.group.clone(),
                    })
                }
            };
            let used = usage(tx, &new.group)?;
            group
                .quota
                .admits(&used, new.cpus, new.memory_mib)
                .map_err(|what| StoreError::QuotaExceeded {
                    group: new.group.clone(),
                    what,
                })?;
            let at = now_ms();
            let inserted = tx.execute(
                "INSERT OR IGNORE INTO sandboxes
                 (id, group_name, state, source, cpus, memory_mib, labels, created_at, end_at, secrets,
                  idle_suspend_ms, env)
                 VALUES (?1, ?2, 'creating', ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                params![
                    new.id,
                    new.group,
                    new.source.to_string(),
                    new.cpus,
                    new.memory_mib,
                    serde_json::to_string(&new.labels).unwrap_or_default(),
                    at,
                    new.end_at,
                    serde_json::to_string(&new.secrets).unwrap_or_default(),
                    new.idle_suspend_ms,
                    serde_json::to_string(&new.env).unwrap_or_default()
                ],
            )?;
            if inserted == 0 {
                return Err(StoreError::Conflict(format!(
                    "sandbox {} already exists",
                    new.id
                )));
            }
            append(
                tx,
                "created",
                Some(&new.id),
                &serde_json::json!({ "group": new.group, "source": new.source }),
            )?;
            get(tx, &new.id)
        })
    }

    pub fn sandbox(&self, id: &str) -> Result<SandboxRecord> {
        get(&self.conn, id)
    }

    /// Every sandbox, newest first; with `states`, only those in one of them.
    pub fn sandboxes(&self, states: &[SandboxState]) -> Result<Vec<SandboxRecord>> {
        // The states are our own words, never the caller's text.
        let filter = if states.is_empty() {
            String::new()
        } else {
            let words: Vec<String> = states
                .iter()
                .map(|s| format!("'{}'", <&str>::from(*s)))
                .collect();
            format!("WHERE state IN ({})", words.join(","))
        };
        let mut stmt = self.conn.prepare(&format!(
            "SELECT * FROM sandboxes {filter} ORDER BY created_at DESC, id"
        ))?;
        let rows = stmt.query_map([], record_from)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// How many sandboxes are in each state (states with none left out).
    pub fn count_by_state(&self) -> Result<Vec<(SandboxState, u64)>> {
        count_by(
            &self.conn,
            "SELECT state, count(*) FROM sandboxes GROUP BY state",
            "sandbox state",
        )
    }

    /// How many ended sandboxes ended for each reason.
    pub fn count_by_end_reason(&self) -> Result<Vec<(EndReason, u64)>> {
        count_by(
            &self.conn,
            "SELECT end_reason, count(*) FROM sandboxes WHERE state = 'ended' GROUP BY end_reason",
            "end reason",
        )
    }

    /// Moves a sandbox to `to` if it is in one of `from`; records the event
    /// `kind`. A sandbox in another state is a conflict, and is unchanged.
    pub fn transition(
        &mut self,
        id: &str,
        from: &[SandboxState],
        to: SandboxState,
        kind: &str,
    ) -> Result<SandboxRecord> {
        self.write(|tx| {
            let current = get(tx, id)?;
            if !from.contains(&current.state) {
                return Err(StoreError::Conflict(format!(
                    "sandbox {id} is {}",
                    current.state
                )));
            }
            tx.execute(
                "UPDATE sandboxes SET state = ?2 WHERE id = ?1",
                params![id, <&str>::from(to)],
            )?;
            append(tx, kind, Some(id), &serde_json::json!({ "state": to }))?;
            get(tx, id)
        })
    }

    /// Records the VMM child running a sandbox (or none, when suspended).
    pub fn set_vmm(&mut self, id: &str, pid: Option<i32>, runtime_dir: Option<&str>) -> Result<()> {
        let n = self.conn.execute(
            "UPDATE sandboxes SET vmm_pid = ?2, runtime_dir = ?3 WHERE id = ?1",
            params![id, pid, runtime_dir],
        )?;
        if n == 0 {
            return Err(not_found(id));
        }
        Ok(())
    }

    /// Ends a sandbox with its reason. Ending one that has already ended
    /// keeps the first reason and returns `false`.
    pub fn end_sandbox(&mut self, id: &str, reason: EndReason, detail: &str) -> Result<bool> {
        self.write(|tx| {
            let current = get(tx, id)?;
            if current.state == SandboxState::Ended {
                return Ok(false);
            }
            tx.execute(
                "UPDATE sandboxes SET state = 'ended', ended_at = ?2, end_reason = ?3,
                 end_detail = ?4, vmm_pid = NULL WHERE id = ?1",
                params![id, now_ms(), <&str>::from(reason), detail],
            )?;
            // Its exposed ports went with it.
            tx.execute("DELETE FROM ports WHERE sandbox = ?1", [id])?;
            append(
                tx,
                "ended",
                Some(id),
                &serde_json::json!({ "reason": reason, "detail": detail }),
            )?;
            Ok(true)
        })
    }

    pub fn set_labels(&mut self, id: &str, labels: &Labels) -> Result<SandboxRecord> {
        self.update_live(id, "labels", |tx| {
            tx.execute(
                "UPDATE sandboxes SET labels = ?2 WHERE id = ?1",
                params![id, serde_json::to_string(labels).unwrap_or_default()],
            )?;
            Ok(serde_json::json!({ "labels": labels }))
        })
    }

    pub fn set_end_at(&mut self, id: &str, end_at: Option<i64>) -> Result<SandboxRecord> {
        self.update_live(id, "timeout", |tx| {
            tx.execute(
                "UPDATE sandboxes SET end_at = ?2 WHERE id = ?1",
                params![id, end_at],
            )?;
            Ok(serde_json::json!({ "end_at": end_at }))
        })
    }

    /// Changes a sandbox that has not ended, with an event of `kind`
    /// carrying what `change` returns.
    fn update_live(
        &mut self,
        id: &str,
        kind: &str,
        change: impl FnOnce(&rusqlite::Connection) -> Result<serde_json::Value>,
    ) -> Result<SandboxRecord> {
        self.write(|tx| {
            if get(tx, id)?.state == SandboxState::Ended {
                return Err(StoreError::Conflict(format!("sandbox {id} has ended")));
            }
            let detail = change(tx)?;
            append(tx, kind, Some(id), &detail)?;
            get(tx, id)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Quota;

    fn new(id: &str, group: &str, cpus: u32) -> NewSandbox {
        NewSandbox {
            id: id.into(),
            group: group.into(),
            source: serde_json::json!({ "rootfs": "/x.ext4" }),
            cpus,
            memory_mib: 256,
            labels: [("owner".to_string(), "alice".to_string())].into(),
            end_at: Some(now_ms() + 60_000),
            secrets: vec!["API_KEY".into()],
            idle_suspend_ms: Some(60_000),
            env: [("LANG".to_string(), "C.UTF-8".to_string())].into(),
        }
    }

    #[test]
    fn a_sandbox_lives_and_ends_with_its_reason_and_events() {
        let mut s = Store::in_memory().unwrap();
        let r = s.insert_sandbox(&new("sb1", "default", 1), None).unwrap();
        assert_eq!(r.state, SandboxState::Creating);
        assert_eq!(r.labels["owner"], "alice");
        assert_eq!(r.secrets, ["API_KEY"]);
        assert_eq!(r.idle_suspend_ms, Some(60_000));
        assert_eq!(r.env["LANG"], "C.UTF-8");
        assert!(matches!(
            s.insert_sandbox(&new("sb1", "default", 1), None),
            Err(StoreError::Conflict(_))
        ));
        s.transition(
            "sb1",
            &[SandboxState::Creating],
            SandboxState::Running,
            "ready",
        )
        .unwrap();
        let err = s
            .transition(
                "sb1",
                &[SandboxState::Suspended],
                SandboxState::Running,
                "resumed",
            )
            .unwrap_err();
        assert!(err.to_string().contains("is running"), "{err}");
        s.set_vmm("sb1", Some(42), Some("/run/x")).unwrap();
        assert_eq!(s.sandbox("sb1").unwrap().vmm_pid, Some(42));
        assert!(s
            .end_sandbox("sb1", EndReason::Expired, "timeout passed")
            .unwrap());
        assert!(!s.end_sandbox("sb1", EndReason::Deleted, "").unwrap());
        let r = s.sandbox("sb1").unwrap();
        assert_eq!(
            (r.state, r.end_reason, r.vmm_pid),
            (SandboxState::Ended, Some(EndReason::Expired), None)
        );
        assert!(matches!(
            s.set_labels("sb1", &Labels::new()),
            Err(StoreError::Conflict(_))
        ));
        let kinds: Vec<String> = s
            .events_after(0, 100)
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect();
        assert_eq!(kinds, ["created", "ready", "ended"]);
        assert_eq!(s.sandboxes(&[SandboxState::Running]).unwrap().len(), 0);
        assert_eq!(s.sandboxes(&[]).unwrap().len(), 1);
        assert!(matches!(
            s.sandbox("nope"),
            Err(StoreError::NotFound { .. })
        ));
    }

    #[test]
    fn quota_holds_and_ended_sandboxes_free_it() {
        let mut s = Store::in_memory().unwrap();
        let q = Quota {
            max_sandboxes: Some(2),
            max_vcpus: Some(3),
            ..Quota::default()
        };
        s.create_group("team", &q).unwrap();
        s.insert_sandbox(&new("a", "team", 2), None).unwrap();
        let err = s.insert_sandbox(&new("b", "team", 2), None).unwrap_err();
        assert!(matches!(err, StoreError::QuotaExceeded { .. }), "{err}");
        s.insert_sandbox(&new("b", "team", 1), None).unwrap();
        assert!(s.insert_sandbox(&new("c", "team", 0), None).is_err());
        s.end_sandbox("a", EndReason::Deleted, "").unwrap();
        s.insert_sandbox(&new("c", "team", 2), None).unwrap();
        assert!(matches!(
            s.insert_sandbox(&new("d", "nope", 1), None),
            Err(StoreError::NotFound { kind: "group", .. })
        ));
        // A refused create changes nothing.
        assert_eq!(s.sandboxes(&[]).unwrap().len(), 3);
    }

    #[test]
    fn the_host_limit_counts_every_group() {
        let mut s = Store::in_memory().unwrap();
        s.create_group("team", &Quota::default()).unwrap();
        s.insert_sandbox(&new("a", "default", 1), Some(2)).unwrap();
        s.insert_sandbox(&new("b", "team", 1), Some(2)).unwrap();
        let err = s.insert_sandbox(&new("c", "team", 1), Some(2)).unwrap_err();
        assert!(matches!(err, StoreError::HostFull { limit: 2 }), "{err}");
        s.end_sandbox("a", EndReason::Deleted, "").unwrap();
        s.insert_sandbox(&new("c", "team", 1), Some(2)).unwrap();
        assert!(s.insert_sandbox(&new("d", "team", 1), Some(0)).is_err());
    }

    #[test]
    fn concurrent_creates_never_pass_a_quota_together() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let mut s = Store::open(&path).unwrap();
        s.create_group(
            "team",
            &Quota {
                max_sandboxes: Some(5),
                ..Quota::default()
            },
        )
        .unwrap();
        let handles: Vec<_> = (0..20)
            .map(|i| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let mut s = Store::open(&path).unwrap();
                    s.insert_sandbox(&new(&format!("sb{i}"), "team", 1), None)
                        .is_ok()
                })
            })
            .collect();
        let admitted = handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|ok| *ok)
            .count();
        assert_eq!(admitted, 5);
        assert_eq!(s.sandboxes(&[]).unwrap().len(), 5);
    }

    #[test]
    fn a_bad_row_is_an_error_not_a_panic() {
        let mut s = Store::in_memory().unwrap();
        s.insert_sandbox(&new("sb1", "default", 1), None).unwrap();
        s.conn
            .execute("UPDATE sandboxes SET state = 'weird' WHERE id = 'sb1'", [])
            .unwrap();
        let err = s.sandbox("sb1").unwrap_err();
        assert!(err.to_string().contains("weird"), "{err}");
    }
}

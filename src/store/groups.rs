//! Groups: the unit quotas apply to. `default` always exists.

use rusqlite::{params, OptionalExtension, Row};
use serde::{Deserialize, Serialize};

use super::{now_ms, Result, Store, StoreError};

/// Limits on a group's live sandboxes; `None` is no limit.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, try_from = "QuotaObject")]
pub struct Quota {
    #[schema(minimum = 0, maximum = 1000000)]
    pub max_sandboxes: Option<u32>,
    #[schema(minimum = 0, maximum = 1000000)]
    pub max_vcpus: Option<u32>,
    #[schema(minimum = 0, maximum = 1000000000)]
    pub max_memory_mib: Option<u32>,
}

/// A quota as JSON must be an object (not its fields as an array).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QuotaFields {
    #[serde(default, deserialize_with = "crate::json_num::opt_u32")]
    max_sandboxes: Option<u32>,
    #[serde(default, deserialize_with = "crate::json_num::opt_u32")]
    max_vcpus: Option<u32>,
    #[serde(default, deserialize_with = "crate::json_num::opt_u32")]
    max_memory_mib: Option<u32>,
}

#[derive(Deserialize)]
#[serde(transparent)]
struct QuotaObject(serde_json::Map<String, serde_json::Value>);

impl TryFrom<QuotaObject> for Quota {
    type Error = serde_json::Error;

    fn try_from(object: QuotaObject) -> Result<Self, Self::Error> {
        let f: QuotaFields = serde_json::from_value(serde_json::Value::Object(object.0))?;
        Ok(Quota {
            max_sandboxes: f.max_sandboxes,
            max_vcpus: f.max_vcpus,
            max_memory_mib: f.max_memory_mib,
        })
    }
}

impl Quota {
    /// Refuses limits beyond what the API documents.
    pub fn check(&self) -> Result<(), String> {
        let over = |v: Option<u32>, max: u32| v.is_some_and(|v| v > max);
        if over(self.max_sandboxes, 1_000_000) || over(self.max_vcpus, 1_000_000) {
            return Err("max_sandboxes and max_vcpus are at most 1000000".into());
        }
        if over(self.max_memory_mib, 1_000_000_000) {
            return Err("max_memory_mib is at most 1000000000".into());
        }
        Ok(())
    }
}

/// What a group's live sandboxes hold now.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Usage {
    pub sandboxes: u32,
    pub vcpus: u32,
    pub memory_mib: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    pub name: String,
    pub quota: Quota,
    pub created_at: i64,
}

pub(super) fn group_from(row: &Row) -> rusqlite::Result<Group> {
    Ok(Group {
        name: row.get("name")?,
        quota: Quota {
            max_sandboxes: row.get("max_sandboxes")?,
            max_vcpus: row.get("max_vcpus")?,
            max_memory_mib: row.get("max_memory_mib")?,
        },
        created_at: row.get("created_at")?,
    })
}

/// What a group's live (not ended) sandboxes hold, read inside the
/// transaction that is about to add one.
pub(super) fn usage(tx: &rusqlite::Connection, group: &str) -> Result<Usage> {
    Ok(tx.query_row(
        "SELECT count(*), coalesce(sum(cpus), 0), coalesce(sum(memory_mib), 0)
         FROM sandboxes WHERE group_name = ?1 AND state != 'ended'",
        [group],
        |r| {
            Ok(Usage {
                sandboxes: r.get(0)?,
                vcpus: r.get(1)?,
                memory_mib: r.get::<_, i64>(2)?.max(0) as u64,
            })
        },
    )?)
}

/// Refuses a group that does not exist.
pub(super) fn exists(tx: &rusqlite::Connection, group: &str) -> Result<()> {
    let n: i64 = tx.query_row(
        "SELECT count(*) FROM groups WHERE name = ?1",
        [group],
        |r| r.get(0),
    )?;
    if n == 0 {
        return Err(StoreError::NotFound {
            kind: "group",
            name: group.to_string(),
        });
    }
    Ok(())
}

impl Quota {
    /// Whether one more sandbox of `cpus` and `memory_mib` fits beside
    /// `usage`; if not, says which limit it would pass.
    pub fn admits(&self, usage: &Usage, cpus: u32, memory_mib: u32) -> Result<(), String> {
        if let Some(max) = self.max_sandboxes {
            if usage.sandboxes.saturating_add(1) > max {
                return Err(format!(
                    "at most {max} sandboxes ({} running)",
                    usage.sandboxes
                ));
            }
        }
        if let Some(max) = self.max_vcpus {
            if usage.vcpus.saturating_add(cpus) > max {
                return Err(format!(
                    "at most {max} vCPUs ({} in use, {cpus} asked for)",
                    usage.vcpus
                ));
            }
        }
        if let Some(max) = self.max_memory_mib {
            if usage.memory_mib.saturating_add(memory_mib.into()) > max.into() {
                return Err(format!(
                    "at most {max} MiB of memory ({} MiB in use, {memory_mib} MiB asked for)",
                    usage.memory_mib
                ));
            }
        }
        Ok(())
    }
}

impl Store {
    pub fn create_group(&mut self, name: &str, quota: &Quota) -> Result<Group> {
        self.write(|tx| {
            let exists: bool =
                tx.query_row("SELECT count(*) FROM groups WHERE name = ?1", [name], |r| {
                    r.get(0)
                })?;
            if exists {
                return Err(StoreError::Conflict(format!(
                    "group {name:?} already exists"
                )));
            }
            let at = now_ms();
            tx.execute(
                "INSERT INTO groups (name, max_sandboxes, max_vcpus, max_memory_mib, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    name,
                    quota.max_sandboxes,
                    quota.max_vcpus,
                    quota.max_memory_mib,
                    at
                ],
            )?;
            Ok(Group {
                name: name.to_string(),
                quota: quota.clone(),
                created_at: at,
            })
        })
    }

    pub fn set_quota(&mut self, name: &str, quota: &Quota) -> Result<()> {
        let n = self.conn.execute(
            "UPDATE groups SET max_sandboxes = ?2, max_vcpus = ?3, max_memory_mib = ?4 WHERE name = ?1",
            params![name, quota.max_sandboxes, quota.max_vcpus, quota.max_memory_mib],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound {
                kind: "group",
                name: name.to_string(),
            });
        }
        Ok(())
    }

    pub fn group(&self, name: &str) -> Result<Group> {
        self.conn
            .query_row("SELECT * FROM groups WHERE name = ?1", [name], group_from)
            .optional()?
            .ok_or_else(|| StoreError::NotFound {
                kind: "group",
                name: name.to_string(),
            })
    }

    pub fn groups(&self) -> Result<Vec<Group>> {
        let mut stmt = self.conn.prepare("SELECT * FROM groups ORDER BY name")?;
        let rows = stmt.query_map([], group_from)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn group_usage(&self, name: &str) -> Result<Usage> {
        self.group(name)?;
        usage(&self.conn, name)
    }

    /// Deletes a group that has no live sandboxes (`default` stays).
    pub fn delete_group(&mut self, name: &str) -> Result<()> {
        if name == "default" {
            return Err(StoreError::Conflict(
                "the default group cannot be deleted".into(),
            ));
        }
        self.write(|tx| {
            let live = usage(tx, name)?.sandboxes;
            if live > 0 {
                return Err(StoreError::Conflict(format!(
                    "group {name:?} still has {live} sandboxes"
                )));
            }
            // Its secrets go with it.
            tx.execute("DELETE FROM secrets WHERE group_name = ?1", [name])?;
            // Ended sandboxes keep their history under the default group.
            tx.execute(
                "UPDATE sandboxes SET group_name = 'default' WHERE group_name = ?1",
                [name],
            )?;
            if tx.execute("DELETE FROM groups WHERE name = ?1", [name])? == 0 {
                return Err(StoreError::NotFound {
                    kind: "group",
                    name: name.to_string(),
                });
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_arithmetic_names_the_limit_it_would_pass() {
        let q = Quota {
            max_sandboxes: Some(2),
            max_vcpus: Some(4),
            max_memory_mib: Some(1024),
        };
        let used = Usage {
            sandboxes: 1,
            vcpus: 3,
            memory_mib: 512,
        };
        assert!(q.admits(&used, 1, 512).is_ok());
        assert!(q.admits(&used, 2, 1).unwrap_err().contains("vCPUs"));
        assert!(q.admits(&used, 1, 513).unwrap_err().contains("memory"));
        let full = Usage {
            sandboxes: 2,
            ..Usage::default()
        };
        assert!(q.admits(&full, 1, 1).unwrap_err().contains("2 sandboxes"));
        let near_max = Usage {
            sandboxes: u32::MAX,
            vcpus: u32::MAX,
            memory_mib: u64::MAX,
        };
        assert!(Quota::default()
            .admits(&near_max, u32::MAX, u32::MAX)
            .is_ok());
        assert!(q.admits(&near_max, u32::MAX, u32::MAX).is_err());
    }

    #[test]
    fn groups_are_created_once_and_deleted_only_when_empty() {
        let mut s = Store::in_memory().unwrap();
        let q = Quota {
            max_sandboxes: Some(1),
            ..Quota::default()
        };
        s.create_group("team-a", &q).unwrap();
        assert!(matches!(
            s.create_group("team-a", &q),
            Err(StoreError::Conflict(_))
        ));
        assert_eq!(s.group("team-a").unwrap().quota, q);
        assert_eq!(s.groups().unwrap().len(), 2);
        assert!(matches!(
            s.delete_group("default"),
            Err(StoreError::Conflict(_))
        ));
        assert!(matches!(
            s.delete_group("nope"),
            Err(StoreError::NotFound { .. })
        ));
        s.delete_group("team-a").unwrap();
        assert!(s.group("team-a").is_err());
    }
}

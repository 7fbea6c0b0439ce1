//! Templates: primed snapshots that sandboxes are restored from. The
//! files live in the daemon's `templates/<name>/`; the store records what
//! each is and that it is whole (a template is recorded only once its
//! snapshot is written).

use rusqlite::{params, OptionalExtension, Row};
use serde::{Deserialize, Serialize};

use super::{now_ms, Result, Store, StoreError};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TemplateRecord {
    pub name: String,
    /// `template` (booted and primed) or `snapshot` (of a running sandbox).
    pub kind: String,
    pub cpus: u32,
    pub memory_mib: u32,
    /// Whether its sandboxes have a root filesystem disk.
    pub has_rootfs: bool,
    pub source: serde_json::Value,
    pub created_at: i64,
}

fn template_from(row: &Row) -> rusqlite::Result<TemplateRecord> {
    let source: String = row.get("source")?;
    Ok(TemplateRecord {
        name: row.get("name")?,
        kind: row.get("kind")?,
        cpus: row.get("cpus")?,
        memory_mib: row.get("memory_mib")?,
        has_rootfs: row.get("has_rootfs")?,
        source: serde_json::from_str(&source).unwrap_or(serde_json::Value::Null),
        created_at: row.get("created_at")?,
    })
}

fn not_found(name: &str) -> StoreError {
    StoreError::NotFound {
        kind: "template",
        name: name.to_string(),
    }
}

impl Store {
    /// Whether the name is free (checked before the long build, and again
    /// by [`Store::insert_template`]).
    pub fn template_exists(&self, name: &str) -> Result<bool> {
        let n: i64 = self.conn.query_row(
            "SELECT count(*) FROM templates WHERE name = ?1",
            [name],
            |r| r.get(0),
        )?;
        Ok(n > 0)
    }

    pub fn insert_template(&mut self, t: &TemplateRecord) -> Result<()> {
        let inserted = self.conn.execute(
            "INSERT OR IGNORE INTO templates (name, kind, cpus, memory_mib, has_rootfs, source, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![t.name, t.kind, t.cpus, t.memory_mib, t.has_rootfs, t.source.to_string(), now_ms()],
        )?;
        if inserted == 0 {
            return Err(StoreError::Conflict(format!(
                "template {:?} already exists",
                t.name
            )));
        }
        Ok(())
    }

    pub fn template(&self, name: &str) -> Result<TemplateRecord> {
        self.conn
            .query_row(
                "SELECT * FROM templates WHERE name = ?1",
                [name],
                template_from,
            )
            .optional()?
            .ok_or_else(|| not_found(name))
    }

    pub fn templates(&self) -> Result<Vec<TemplateRecord>> {
        let mut stmt = self.conn.prepare("SELECT * FROM templates ORDER BY name")?;
        let rows = stmt.query_map([], template_from)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn delete_template(&mut self, name: &str) -> Result<()> {
        if self
            .conn
            .execute("DELETE FROM templates WHERE name = ?1", [name])?
            == 0
        {
            return Err(not_found(name));
        }
        Ok(())
    }
}

/// The most sandboxes one pool keeps warm.
pub const MAX_WARM: u32 = 64;

impl Store {
    /// Keeps `warm` restored sandboxes of `template` ready (0 keeps none
    /// but remembers the pool).
    pub fn put_pool(&mut self, template: &str, warm: u32) -> Result<()> {
        self.template(template)?;
        self.conn.execute(
            "INSERT INTO pools (template, warm) VALUES (?1, ?2)
             ON CONFLICT (template) DO UPDATE SET warm = excluded.warm",
            params![template, warm.min(MAX_WARM)],
        )?;
        Ok(())
    }

    pub fn pools(&self) -> Result<Vec<(String, u32)>> {
        let mut stmt = self
            .conn
            .prepare("SELECT template, warm FROM pools ORDER BY template")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn delete_pool(&mut self, template: &str) -> Result<()> {
        if self
            .conn
            .execute("DELETE FROM pools WHERE template = ?1", [template])?
            == 0
        {
            return Err(StoreError::NotFound {
                kind: "pool",
                name: template.to_string(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_are_named_once() {
        let mut s = Store::in_memory().unwrap();
        let t = TemplateRecord {
            name: "py".into(),
            kind: "template".into(),
            cpus: 1,
            memory_mib: 256,
            has_rootfs: true,
            source: serde_json::json!({ "cmd": ["true"] }),
            created_at: 0,
        };
        assert!(!s.template_exists("py").unwrap());
        s.insert_template(&t).unwrap();
        assert!(matches!(
            s.insert_template(&t),
            Err(StoreError::Conflict(_))
        ));
        assert_eq!(s.template("py").unwrap().memory_mib, 256);
        assert_eq!(s.templates().unwrap().len(), 1);
        s.put_pool("py", 4).unwrap();
        s.put_pool("py", 1000).unwrap();
        assert_eq!(s.pools().unwrap(), [("py".to_string(), MAX_WARM)]);
        assert!(matches!(
            s.put_pool("nope", 1),
            Err(StoreError::NotFound { .. })
        ));
        s.delete_template("py").unwrap();
        assert!(matches!(
            s.template("py"),
            Err(StoreError::NotFound {
                kind: "template",
                ..
            })
        ));
        assert!(
            s.pools().unwrap().is_empty(),
            "a template's pool goes with it"
        );
        assert!(matches!(
            s.delete_pool("py"),
            Err(StoreError::NotFound { kind: "pool", .. })
        ));
    }
}

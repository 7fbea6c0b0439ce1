//! Sealed secrets, by group and name. The store only ever holds what
//! [`crate::secrets::Sealer`] sealed: a nonce and the ciphertext.

use rusqlite::{params, OptionalExtension};
use serde::Serialize;

use super::{now_ms, Result, Store, StoreError};

/// What may be shown of a secret: never its value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct SecretInfo {
    pub name: String,
    /// Unix milliseconds.
    pub created_at: i64,
    pub updated_at: i64,
}

/// A secret as it is kept.
pub struct SealedSecret {
    pub nonce: Vec<u8>,
    pub sealed: Vec<u8>,
}

impl Store {
    /// Sets (or replaces) a secret in a group that exists.
    pub fn put_secret(&mut self, group: &str, name: &str, secret: &SealedSecret) -> Result<()> {
        self.write(|tx| {
            super::groups::exists(tx, group)?;
            let at = now_ms();
            tx.execute(
                "INSERT INTO secrets (group_name, name, nonce, sealed, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5)
                 ON CONFLICT (group_name, name) DO UPDATE
                 SET nonce = excluded.nonce, sealed = excluded.sealed, updated_at = excluded.updated_at",
                params![group, name, secret.nonce, secret.sealed, at],
            )?;
            Ok(())
        })
    }

    pub fn secret(&self, group: &str, name: &str) -> Result<SealedSecret> {
        self.conn
            .query_row(
                "SELECT nonce, sealed FROM secrets WHERE group_name = ?1 AND name = ?2",
                params![group, name],
                |r| {
                    Ok(SealedSecret {
                        nonce: r.get(0)?,
                        sealed: r.get(1)?,
                    })
                },
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound {
                kind: "secret",
                name: format!("{group}/{name}"),
            })
    }

    pub fn secrets(&self, group: &str) -> Result<Vec<SecretInfo>> {
        super::groups::exists(&self.conn, group)?;
        let mut stmt = self.conn.prepare(
            "SELECT name, created_at, updated_at FROM secrets WHERE group_name = ?1 ORDER BY name",
        )?;
        let rows = stmt.query_map([group], |r| {
            Ok(SecretInfo {
                name: r.get(0)?,
                created_at: r.get(1)?,
                updated_at: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn delete_secret(&mut self, group: &str, name: &str) -> Result<()> {
        let n = self.conn.execute(
            "DELETE FROM secrets WHERE group_name = ?1 AND name = ?2",
            params![group, name],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound {
                kind: "secret",
                name: format!("{group}/{name}"),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_kept_by_group_and_name_and_listed_without_values() {
        let mut s = Store::in_memory().unwrap();
        let sealed = |b: u8| SealedSecret {
            nonce: vec![b; 12],
            sealed: vec![b; 20],
        };
        s.put_secret("default", "API_KEY", &sealed(1)).unwrap();
        s.put_secret("default", "API_KEY", &sealed(2)).unwrap();
        assert_eq!(s.secret("default", "API_KEY").unwrap().sealed, vec![2; 20]);
        assert!(matches!(
            s.put_secret("nope", "X", &sealed(1)),
            Err(StoreError::NotFound { kind: "group", .. })
        ));
        let listed = s.secrets("default").unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].name, "API_KEY");
        assert!(!serde_json::to_string(&listed).unwrap().contains("sealed"));
        s.delete_secret("default", "API_KEY").unwrap();
        assert!(matches!(
            s.secret("default", "API_KEY"),
            Err(StoreError::NotFound { kind: "secret", .. })
        ));
    }
}

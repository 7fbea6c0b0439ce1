//! Guest ports exposed on the host: which host port each is reached at.
//! The record outlives the forward itself, which runs only while the
//! sandbox does (closed on suspend, opened again on resume).

use rusqlite::params;
use serde::{Deserialize, Serialize};

use super::{now_ms, Result, Store, StoreError};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRecord {
    /// The TCP port on the guest's loopback.
    pub port: u16,
    /// The host's loopback port that reaches it.
    pub host_port: u16,
    pub created_at: i64,
}

impl Store {
    /// Records `port` of `sandbox` as reached at `host_port` (replacing
    /// what it was reached at before).
    pub fn put_port(&mut self, sandbox: &str, port: u16, host_port: u16) -> Result<PortRecord> {
        self.sandbox(sandbox)?;
        let created_at = now_ms();
        self.conn.execute(
            "INSERT INTO ports (sandbox, port, host_port, created_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (sandbox, port) DO UPDATE SET host_port = excluded.host_port",
            params![sandbox, port, host_port, created_at],
        )?;
        self.port(sandbox, port)?
            .ok_or_else(|| not_found(sandbox, port))
    }

    pub fn port(&self, sandbox: &str, port: u16) -> Result<Option<PortRecord>> {
        Ok(self.ports(sandbox)?.into_iter().find(|p| p.port == port))
    }

    /// The ports `sandbox` has exposed, in port order.
    pub fn ports(&self, sandbox: &str) -> Result<Vec<PortRecord>> {
        let mut stmt = self.conn.prepare(
            "SELECT port, host_port, created_at FROM ports WHERE sandbox = ?1 ORDER BY port",
        )?;
        let rows = stmt.query_map([sandbox], |r| {
            Ok(PortRecord {
                port: r.get(0)?,
                host_port: r.get(1)?,
                created_at: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn delete_port(&mut self, sandbox: &str, port: u16) -> Result<()> {
        let n = self.conn.execute(
            "DELETE FROM ports WHERE sandbox = ?1 AND port = ?2",
            params![sandbox, port],
        )?;
        if n == 0 {
            return Err(not_found(sandbox, port));
        }
        Ok(())
    }
}

fn not_found(sandbox: &str, port: u16) -> StoreError {
    StoreError::NotFound {
        kind: "port",
        name: format!("{sandbox}:{port}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NewSandbox;

    #[test]
    fn ports_are_recorded_replaced_listed_and_forgotten() {
        let mut store = Store::in_memory().unwrap();
        let new = NewSandbox {
            id: "sb1".into(),
            group: "default".into(),
            source: serde_json::json!({}),
            cpus: 1,
            memory_mib: 128,
            labels: Default::default(),
            end_at: None,
            secrets: vec![],
            idle_suspend_ms: None,
            env: Default::default(),
        };
        store.insert_sandbox(&new, None).unwrap();
        let id = "sb1";
        assert_eq!(store.put_port(id, 8000, 40001).unwrap().host_port, 40001);
        assert_eq!(store.put_port(id, 8000, 40002).unwrap().host_port, 40002);
        store.put_port(id, 22, 40003).unwrap();
        let listed: Vec<_> = store.ports(id).unwrap().iter().map(|p| p.port).collect();
        assert_eq!(listed, [22, 8000]);
        store.delete_port(id, 22).unwrap();
        assert!(matches!(
            store.delete_port(id, 22),
            Err(StoreError::NotFound { kind: "port", .. })
        ));
        // An ended sandbox has none.
        store
            .end_sandbox(id, crate::store::EndReason::Deleted, "")
            .unwrap();
        assert!(store.ports(id).unwrap().is_empty());
        assert!(store.put_port("sb-none", 1, 2).is_err());
    }
}

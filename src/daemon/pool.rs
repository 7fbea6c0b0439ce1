//! Prewarmed pools: restored sandboxes of a template kept ready, so a
//! create from that template takes one in milliseconds. A pooled sandbox
//! is not recorded until it is taken (a daemon that restarts discards the
//! pool and refills it); it is restored with its id already chosen, so
//! its hostname is its id like any other.

use std::sync::Arc;

use sandbox::Machine;
use serde::Serialize;

use super::supervisor::{lock, new_id, Live, Supervisor};
use crate::store::StoreError;

pub struct Pooled {
    pub id: String,
    pub live: Arc<Live>,
}

/// A pool as the API shows it.
#[derive(Clone, Debug, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct PoolStatus {
    pub template: String,
    /// How many to keep ready.
    pub warm: u32,
    /// How many are ready now.
    pub ready: u32,
}

impl Supervisor {
    /// A ready sandbox of `template`, if the pool has a live one.
    pub(super) fn take_pooled(&self, template: &str) -> Option<Pooled> {
        loop {
            let pooled = lock(&self.pool).get_mut(template)?.pop()?;
            if pooled.live.agent.check_alive().is_ok() {
                return Some(pooled);
            }
            // Died while it waited: gone for good.
            self.discard(pooled);
        }
    }

    /// Puts back a pooled sandbox a create could not use (a quota).
    pub(super) fn give_back(&self, template: &str, pooled: Pooled) {
        lock(&self.pool)
            .entry(template.to_string())
            .or_default()
            .push(pooled);
    }

    fn discard(&self, pooled: Pooled) {
        lock(&pooled.live.child).kill();
        // Ours, and unwatched: reaped here, or it stays a zombie.
        super::child::kill_detached(pooled.live.pid);
        let _ = std::fs::remove_dir_all(self.dir(&pooled.id));
    }

    pub fn set_pool(&self, template: &str, warm: u32) -> Result<PoolStatus, StoreError> {
        self.store().put_pool(template, warm)?;
        self.trim_pools();
        Ok(self.pool_status(template))
    }

    pub fn delete_pool(&self, template: &str) -> Result<(), StoreError> {
        self.store().delete_pool(template)?;
        self.trim_pools();
        Ok(())
    }

    pub fn pool_status(&self, template: &str) -> PoolStatus {
        let warm = self
            .store()
            .pools()
            .unwrap_or_default()
            .into_iter()
            .find(|(t, _)| t == template)
            .map_or(0, |(_, w)| w);
        let ready = lock(&self.pool).get(template).map_or(0, |p| p.len() as u32);
        PoolStatus {
            template: template.to_string(),
            warm,
            ready,
        }
    }

    pub fn pools(&self) -> Vec<PoolStatus> {
        let pools = self.store().pools().unwrap_or_default();
        pools.iter().map(|(t, _)| self.pool_status(t)).collect()
    }

    /// Stops pooled sandboxes beyond what each pool wants (all of a pool
    /// that is gone).
    pub(super) fn trim_pools(&self) {
        let wanted = self.store().pools().unwrap_or_default();
        let mut extra = Vec::new();
        {
            let mut pool = lock(&self.pool);
            for (template, ready) in pool.iter_mut() {
                let warm = wanted
                    .iter()
                    .find(|(t, _)| t == template)
                    .map_or(0, |(_, w)| *w as usize);
                while ready.len() > warm {
                    extra.extend(ready.pop());
                }
            }
        }
        for pooled in extra {
            self.discard(pooled);
        }
    }

    /// Restores one sandbox for the first pool that is short; whether it
    /// did (the refill thread calls it again at once if so).
    pub fn refill_one(self: &Arc<Self>) -> bool {
        let wanted = self.store().pools().unwrap_or_default();
        for (template, warm) in wanted {
            let ready = lock(&self.pool)
                .get(&template)
                .map_or(0, |p| p.len() as u32);
            if ready >= warm {
                continue;
            }
            let Ok(id) = new_id() else { return false };
            let _span = tracing::info_span!("pool", template = %template, id = %id).entered();
            // A pooled sandbox is a VM: the host's limit counts it.
            let Ok(_room) = self.host_room() else {
                return false;
            };
            match self.restore_template(&id, &template) {
                Ok(live) => {
                    tracing::info!("ready");
                    self.give_back(&template, Pooled { id, live });
                    // A pool trimmed or deleted meanwhile.
                    self.trim_pools();
                    return true;
                }
                Err(e) => {
                    tracing::warn!("could not restore a sandbox: {e:#}");
                    let _ = std::fs::remove_dir_all(self.dir(&id));
                    return false;
                }
            }
        }
        false
    }
}

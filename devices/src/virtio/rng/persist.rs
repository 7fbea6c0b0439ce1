//! The rng in a snapshot.

use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;

use super::Rng;
use crate::virtio::persist::{Persist, PersistError, RestoreContext, SaveContext, SavedDevice};

/// The rng has no state of its own: a restored one reads the host's
/// entropy afresh.
impl Persist for Rng {
    fn save(&mut self, _ctx: &SaveContext) -> Result<SavedDevice, PersistError> {
        Ok(SavedDevice {
            kind: VIRTIO_ID_RNG,
            state: Vec::new(),
            external: None,
        })
    }
}

impl Rng {
    pub fn restore(saved: &SavedDevice, _ctx: &RestoreContext) -> Result<Rng, PersistError> {
        if !saved.state.is_empty() || saved.external.is_some() {
            return Err(PersistError::Invalid(
                "the rng has no state to restore".into(),
            ));
        }
        Ok(Rng::new()?)
    }
}

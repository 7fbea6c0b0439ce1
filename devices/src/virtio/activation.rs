//! The activation and reset handshake every device shares.
//!
//! The transport calls `activate` and `reset` on a vCPU thread, with the
//! device locked. Only the event loop may change epoll interests, so the
//! device stores (or retires) its queues and pokes an eventfd; the event
//! loop then subscribes to the new queue eventfds and drops the retired
//! ones. A retired eventfd stays open until it is unsubscribed: closing it
//! first would leave epoll watching a descriptor number that may be
//! reused.

use event_manager::{EventOps, EventSet, Events};
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateError, Activation, Drained, QueueError};

/// Event-loop token of a device's activation eventfd.
pub(crate) const ACTIVATE_TOKEN: u32 = u32::MAX;

pub(crate) struct ActivationSlot {
    event: EventFd,
    pub(crate) active: Option<Activation>,
    /// Whether the event loop watches `active`'s queue eventfds yet.
    subscribed: bool,
    /// Queue eventfds of a reset activation, still watched.
    retired: Vec<EventFd>,
}

impl ActivationSlot {
    pub(crate) fn new() -> std::io::Result<Self> {
        Ok(ActivationSlot {
            event: EventFd::new(libc::EFD_NONBLOCK)?,
            active: None,
            subscribed: false,
            retired: Vec::new(),
        })
    }

    pub(crate) fn queues(&self) -> Option<&[Queue]> {
        self.active.as_ref().map(|a| a.queues.as_slice())
    }

    pub(crate) fn init(&self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(&self.event, ACTIVATE_TOKEN, EventSet::IN)) {
            crate::guest_error!("virtio: cannot watch the activation event: {e:?}");
        }
    }

    /// Stores the activation and wakes the event loop.
    pub(crate) fn activate(
        &mut self,
        activation: Activation,
        expected_queues: usize,
    ) -> Result<(), ActivateError> {
        if activation.queues.len() != expected_queues {
            return Err(ActivateError::QueueCount {
                expected: expected_queues,
                got: activation.queues.len(),
            });
        }
        self.retire();
        self.active = Some(activation);
        self.event.write(1).map_err(ActivateError::EventFd)
    }

    /// Stops serving (the driver reset the device): the queues are
    /// forgotten at once, their eventfds unwatched by the event loop.
    pub(crate) fn reset(&mut self) {
        self.retire();
        let _ = self.event.write(1);
    }

    fn retire(&mut self) {
        if let Some(active) = self.active.take() {
            if self.subscribed {
                self.retired.extend(active.queue_events);
            }
        }
        self.subscribed = false;
    }

    /// Handles the activation token in the event loop: unwatches retired
    /// queue eventfds, then watches the active ones, tagged with their
    /// queue index. True if it started watching a new activation.
    pub(crate) fn on_activated(&mut self, ops: &mut EventOps) -> bool {
        let _ = self.event.read();
        for evt in self.retired.drain(..) {
            let _ = ops.remove(Events::empty(&evt));
        }
        if self.subscribed {
            return false;
        }
        let Some(active) = &self.active else {
            return false;
        };
        for (i, evt) in active.queue_events.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, i as u32, EventSet::IN)) {
                crate::guest_error!("virtio: cannot watch queue {i}: {e:?}");
            }
            if active.restored {
                let _ = evt.write(1);
            }
        }
        self.subscribed = true;
        true
    }

    /// Handles an event of a device with a single queue: the activation,
    /// or a notification, which `serve` answers by draining the queue
    /// within its budget (coming back through the queue's eventfd if work
    /// is left). A queue that `serve` finds malformed stops the device.
    pub(crate) fn on_single_queue_event<F>(
        &mut self,
        events: Events,
        ops: &mut EventOps,
        device: &str,
        serve: F,
    ) where
        F: FnOnce(&mut Activation) -> Result<Drained, QueueError>,
    {
        match events.data() {
            ACTIVATE_TOKEN => {
                self.on_activated(ops);
            }
            0 => {
                let Some(active) = self.active.as_mut() else {
                    return;
                };
                let _ = active.queue_events[0].read();
                match serve(active) {
                    Ok(Drained::Done) => {}
                    Ok(Drained::More) => {
                        let _ = active.queue_events[0].write(1);
                    }
                    Err(e) => {
                        crate::guest_error!(
                            "{device}: queue is malformed, stopping the device: {e}"
                        );
                        self.fail(ops);
                    }
                }
            }
            _ => {}
        }
    }

    /// Stops a device whose queues are corrupt: reports the failure to the
    /// driver and stops listening to the queues.
    pub(crate) fn fail(&mut self, ops: &mut EventOps) {
        if let Some(active) = &self.active {
            active.interrupt.signal_device_failure();
        }
        self.deactivate(ops);
    }

    /// Unsubscribes the queue eventfds and forgets the activation.
    pub(crate) fn deactivate(&mut self, ops: &mut EventOps) {
        if let Some(active) = self.active.take() {
            if self.subscribed {
                for evt in &active.queue_events {
                    let _ = ops.remove(Events::empty(evt));
                }
            }
        }
        self.subscribed = false;
    }
}

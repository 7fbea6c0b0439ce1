//! The daemon's Prometheus metrics (`GET /metrics`, OpenMetrics text):
//! how long creates, suspends and resumes take, and, read from the store
//! and the pools when scraped, how many sandboxes are in each state and
//! how full each pool is.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::supervisor::{lock, Supervisor};
use anyhow::Context;

use crate::store::SandboxState;

/// Where a created sandbox's VM came from.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum CreateSource {
    /// Taken from a template's warm pool.
    Pool,
    /// Restored from a template (or snapshot) on the spot.
    Template,
    /// Booted from a kernel.
    Boot,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    /// `pool`, `template` or `boot`.
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TemplateLabels {
    template: String,
}

/// 1 ms to about 33 s, doubling: a pooled create is milliseconds, a boot
/// in the nested test host tens of seconds.
fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

pub struct Metrics {
    registry: Mutex<Registry>,
    create_seconds: Family<SourceLabels, Histogram>,
    suspend_seconds: Histogram,
    resume_seconds: Histogram,
    sandboxes: Family<StateLabels, Gauge>,
    ended: Family<ReasonLabels, Gauge>,
    pool_ready: Family<TemplateLabels, Gauge>,
    pool_target: Family<TemplateLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let create_seconds =
            Family::<SourceLabels, Histogram>::new_with_constructor(seconds_histogram);
        // Every source from the start: a series that appears only once
        // something happened reads as missing data before.
        for source in [
            CreateSource::Pool,
            CreateSource::Template,
            CreateSource::Boot,
        ] {
            drop(create_seconds.get_or_create(&SourceLabels {
                source: source.into(),
            }));
        }
        let suspend_seconds = seconds_histogram();
        let resume_seconds = seconds_histogram();
        let sandboxes = Family::<StateLabels, Gauge>::default();
        let ended = Family::<ReasonLabels, Gauge>::default();
        let pool_ready = Family::<TemplateLabels, Gauge>::default();
        let pool_target = Family::<TemplateLabels, Gauge>::default();
        let mut registry = Registry::with_prefix("capsule");
        registry.register(
            "sandbox_create_seconds",
            "Time from a create request being accepted to the sandbox taking commands, by where its VM came from",
            create_seconds.clone(),
        );
        registry.register(
            "sandbox_suspend_seconds",
            "Time to write a sandbox's memory and device state to disk and stop its VMM",
            suspend_seconds.clone(),
        );
        registry.register(
            "sandbox_resume_seconds",
            "Time to restore a suspended sandbox until it takes commands",
            resume_seconds.clone(),
        );
        registry.register(
            "sandboxes",
            "Sandboxes the daemon knows, by state",
            sandboxes.clone(),
        );
        registry.register(
            "sandboxes_ended",
            "Ended sandboxes the daemon keeps a record of, by why they ended",
            ended.clone(),
        );
        registry.register(
            "pool_ready",
            "Restored sandboxes ready in a template's pool",
            pool_ready.clone(),
        );
        registry.register(
            "pool_target",
            "How many ready sandboxes a template's pool keeps",
            pool_target.clone(),
        );
        Metrics {
            registry: Mutex::new(registry),
            create_seconds,
            suspend_seconds,
            resume_seconds,
            sandboxes,
            ended,
            pool_ready,
            pool_target,
        }
    }
}

impl Metrics {
    pub fn created(&self, source: CreateSource, took: Duration) {
        self.create_seconds
            .get_or_create(&SourceLabels {
                source: source.into(),
            })
            .observe(took.as_secs_f64());
    }

    pub fn suspended(&self, took: Duration) {
        self.suspend_seconds.observe(took.as_secs_f64());
    }

    pub fn resumed(&self, took: Duration) {
        self.resume_seconds.observe(took.as_secs_f64());
    }
}

impl Supervisor {
    /// The metrics in OpenMetrics text, the gauges read now.
    pub fn render_metrics(&self) -> anyhow::Result<String> {
        let (by_state, by_reason, targets) = {
            let store = self.store();
            (
                store.count_by_state()?,
                store.count_by_end_reason()?,
                store.pools()?,
            )
        };
        let m = &self.metrics;
        // Every state and reason, zero included: a series that vanishes
        // reads as missing data, not as none.
        m.sandboxes.clear();
        for state in [
            SandboxState::Creating,
            SandboxState::Running,
            SandboxState::Suspended,
            SandboxState::Ended,
        ] {
            let n = by_state
                .iter()
                .find(|(s, _)| *s == state)
                .map_or(0, |c| c.1);
            m.sandboxes
                .get_or_create(&StateLabels {
                    state: state.to_string(),
                })
                .set(n as i64);
        }
        m.ended.clear();
        for (reason, n) in by_reason {
            m.ended
                .get_or_create(&ReasonLabels {
                    reason: <&str>::from(reason).to_string(),
                })
                .set(n as i64);
        }
        m.pool_ready.clear();
        m.pool_target.clear();
        let pool = lock(&self.pool);
        for (template, warm) in targets {
            let labels = TemplateLabels { template };
            let ready = pool.get(&labels.template).map_or(0, Vec::len);
            m.pool_ready.get_or_create(&labels).set(ready as i64);
            m.pool_target.get_or_create(&labels).set(i64::from(warm));
        }
        drop(pool);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &lock(&m.registry))
            .context("encoding the metrics")?;
        Ok(text)
    }
}

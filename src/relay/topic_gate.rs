//! Rows routed to topics that do not exist.
//!
//! Invariant: a batch goes to Kafka only once every topic it names exists
//! (a broker that creates topics on first use creates them when asked).
//! Rows for a missing topic are created for, treated as poison, or held
//! back, as `routing.missing_topics` says; rows held back hold back every
//! row behind them (order is kept), and that stall is never silent: a
//! warning once a minute names the topics and the rows waiting, the
//! `rows_waiting_for_topic` metric counts them and `/readyz` says why.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{Config, CreateTopics, MissingTopics};
use crate::error::Result;
use crate::kafka::topics;
use crate::metrics::Metrics;

/// How often a stall on missing topics is logged again.
const REPORT_EVERY: Duration = Duration::from_secs(60);
/// Lookups of a topic found missing, `FIRST_USE_PAUSE` apart, before it
/// counts as missing: time for a broker that creates topics on first use.
const FIRST_USE_LOOKUPS: u32 = 8;
const FIRST_USE_PAUSE: Duration = Duration::from_millis(250);

pub struct TopicGate<'a> {
    admin: topics::Admin,
    policy: MissingTopics,
    settings: CreateTopics,
    /// Topics seen to exist in this session.
    known: HashSet<String>,
    last_report: Option<Instant>,
    metrics: &'a Metrics,
}

/// What to do with a batch whose topics were looked up.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every topic exists: produce.
    Open,
    /// These topics are missing and their rows are poison.
    Poison(Vec<String>),
    /// These topics are missing: hold the batch and look again later.
    Wait(Vec<String>),
}

impl<'a> TopicGate<'a> {
    pub fn new(config: &Config, metrics: &'a Metrics) -> Result<TopicGate<'a>> {
        Ok(TopicGate {
            admin: topics::admin_client(config)?,
            policy: config.routing.missing_topics,
            settings: config.routing.create_topics.clone(),
            known: HashSet::new(),
            last_report: None,
            metrics,
        })
    }

    /// Looks up the topics of a batch not yet seen to exist, creating the
    /// missing ones if configured to.
    pub async fn check(&mut self, batch_topics: &[&str]) -> Result<Verdict> {
        let unknown: Vec<String> = batch_topics
            .iter()
            .filter(|topic| !self.known.contains(**topic))
            .map(|topic| topic.to_string())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        if unknown.is_empty() {
            return Ok(Verdict::Open);
        }
        let mut missing = topics::missing_among(Arc::clone(&self.admin), unknown.clone()).await?;
        // A broker that creates topics on first use does so on that
        // lookup and answers "unknown" until it is done: look again.
        for _ in 0..FIRST_USE_LOOKUPS {
            if missing.is_empty() {
                break;
            }
            tokio::time::sleep(FIRST_USE_PAUSE).await;
            missing = topics::missing_among(Arc::clone(&self.admin), missing).await?;
        }
        if self.policy == MissingTopics::Create {
            missing = self.create(missing).await;
        }
        for topic in unknown {
            if !missing.contains(&topic) {
                self.known.insert(topic);
            }
        }
        Ok(match (missing.is_empty(), self.policy) {
            (true, _) => Verdict::Open,
            (false, MissingTopics::Poison) => Verdict::Poison(missing),
            // Wait, or creating them failed (said why already).
            (false, _) => Verdict::Wait(missing),
        })
    }

    /// Creates `missing`; returns those it could not create.
    async fn create(&self, missing: Vec<String>) -> Vec<String> {
        let mut failed = Vec::new();
        for topic in missing {
            match topics::create_event_topic(&self.admin, &self.settings, &topic).await {
                Ok(()) => tracing::info!(
                    topic = %topic,
                    partitions = self.settings.partitions,
                    replication_factor = self.settings.replication_factor,
                    "created a missing topic before producing to it (routing.missing_topics: create)"
                ),
                Err(reason) => {
                    tracing::error!(
                        topic = %topic,
                        %reason,
                        "cannot create a missing topic; its rows wait until it exists"
                    );
                    failed.push(topic);
                }
            }
        }
        failed
    }

    /// A produce failed in a way a deleted topic would explain: look every
    /// topic up again on the next attempt.
    pub fn forget_known(&mut self) {
        self.known.clear();
    }

    /// Records that rows wait for `waiting` (topic, rows), logging it now
    /// and then once a minute while it lasts.
    pub fn report_waiting(&mut self, waiting: &[(String, usize)], retry_in: Duration) {
        self.metrics.set_waiting_for_topics(waiting);
        if self
            .last_report
            .is_some_and(|at| at.elapsed() < REPORT_EVERY)
        {
            return;
        }
        self.last_report = Some(Instant::now());
        for (topic, rows) in waiting {
            tracing::warn!(
                topic = %topic,
                rows,
                ?retry_in,
                "rows wait for a topic that does not exist, and every row behind them waits too; \
                 the broker did not create it on first use (auto.create.topics.enable is off, or \
                 the relay may not create topics). Create the topic, or set \
                 routing.missing_topics to `create` (with routing.create_topics) or `poison`"
            );
        }
    }

    /// Nothing waits any more. Called for every batch, so it touches the
    /// metrics only when a wait was reported (which always sets `last_report`).
    pub fn clear_waiting(&mut self) {
        if self.last_report.take().is_some() {
            tracing::info!("the missing topics exist now; relaying the rows that waited for them");
            self.metrics.set_waiting_for_topics(&[]);
        }
    }
}

impl Drop for TopicGate<'_> {
    fn drop(&mut self) {
        // A session that ends is not stalled any more; the next one looks again.
        self.metrics.set_waiting_for_topics(&[]);
    }
}

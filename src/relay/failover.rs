//! What a replication session sets up so a Postgres failover cannot take
//! back what it publishes: the slot made a failover slot (PostgreSQL 17+),
//! and the gate that holds transactions back until the synchronous
//! standbys have them (`capture::standby_gate`).
//!
//! Invariant: with `capture.wait_for_sync_standbys` on, a session streams
//! only with a gate, or where the server itself holds decoding back for
//! its slot; and the slot is never altered while anything streams from it
//! (this runs before START_REPLICATION).

use crate::capture::slot;
use crate::capture::standby_gate::StandbyGate;
use crate::capture::wire::{self, StreamTarget};
use crate::error::Result;

use super::session::Session;

/// Makes the slot a failover slot where the server has them, then opens
/// the standby gate (`None`: off by config, or the server holds back).
pub(super) async fn prepare(
    session: &mut Session<'_>,
    target: &StreamTarget,
) -> Result<Option<StandbyGate>> {
    let context = session.context;
    let config = &context.config;
    let mut protection = slot::failover_protection(&mut session.connection, &target.slot).await?;
    if protection
        .as_ref()
        .is_some_and(|p| p.slot_failover == Some(false))
    {
        match wire::enable_failover(&config.postgres.url, target).await {
            Ok(()) => {
                tracing::info!(
                    slot = %target.slot,
                    "made the replication slot a failover slot: a standby with \
                     sync_replication_slots = on keeps it across a promotion"
                );
                protection =
                    slot::failover_protection(&mut session.connection, &target.slot).await?;
            }
            Err(error) => tracing::warn!(
                slot = %target.slot,
                error = %error.message,
                "the replication slot is not a failover slot, and making it one failed: a \
                 promoted standby will not have it, and the relay then republishes from the \
                 table (capture.on_slot_lost). Run ALTER_REPLICATION_SLOT {} ( FAILOVER true ) \
                 on a replication connection (psql \"dbname=… replication=database\") while \
                 the relay is stopped",
                target.slot
            ),
        }
    }
    if !config.capture.wait_for_sync_standbys {
        context.metrics.set_sync_standbys_required(0);
        return Ok(None);
    }
    let server_holds_back = protection
        .as_ref()
        .is_some_and(slot::FailoverProtection::server_holds_back);
    let connection = context.connect("connecting for the standby gate").await?;
    StandbyGate::open(
        connection,
        server_holds_back,
        std::sync::Arc::clone(&context.metrics),
        session.stop.clone(),
    )
    .await
}

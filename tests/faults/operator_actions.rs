//! What operators do to a running relay's world, mixed with kills, while
//! writers keep committing: the relay is killed or stopped, and while it is
//! down its slot is advanced past unpublished rows or dropped and created
//! again, or unsent rows are held locked by another session across its
//! next start (an operator's `SELECT … FOR UPDATE`): replication mode; in
//! polling mode only the kills and stops. The checker then finds every row
//! exactly once, in order.

use std::time::Duration;

use rand::Rng;
use sqlx::Connection;

use crate::support::faults::{random_between, size, Campaign, RelayProcess};
use crate::support::workload::Workload;
use crate::support::Mode;

const LIMIT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
enum Action {
    /// `pg_replication_slot_advance` to the current WAL position.
    AdvanceSlot,
    /// `pg_drop_replication_slot`, then a new slot of the same name.
    RecreateSlot,
    /// Unsent rows locked by another session across the next start.
    LockRows,
}

in_both_modes!(operator_actions_between_kills, worker_threads = 2);
async fn operator_actions_between_kills(mode: Mode) {
    let mut campaign = Campaign::start("operator-actions", mode, &Workload::realistic()).await;
    // Polling skips locked rows (SKIP LOCKED) and publishes them once
    // released, after later events of their aggregate: order, not loss or
    // duplication, as docs/operations.md says. So locks are mixed in only where
    // the relay waits for them (a new slot's catch-up drain).
    let actions: &[Action] = match mode {
        Mode::Replication => &[Action::AdvanceSlot, Action::RecreateSlot, Action::LockRows],
        _ => &[],
    };
    for _ in 0..size(3, 60) {
        let mut relay = RelayProcess::start(&campaign.env, None);
        campaign.env.wait_leader(LIMIT).await;
        tokio::time::sleep(random_between(
            Duration::from_millis(200)..=Duration::from_millis(2000),
        ))
        .await;
        if rand::rng().random_bool(0.5) {
            relay.kill();
        } else {
            relay.stop().await;
        }
        if !actions.is_empty() {
            let action = actions[rand::rng().random_range(0..actions.len())];
            act(&campaign, action).await;
        }
        campaign.runs += 1;
    }
    campaign.finish(Vec::new()).await;
}

async fn act(campaign: &Campaign, action: Action) {
    let env = &campaign.env;
    match action {
        Action::AdvanceSlot | Action::RecreateSlot => {
            env.wait_slot_inactive(LIMIT).await;
            // Rows committed now lie behind where the slot is moved to.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let statement = match action {
                Action::AdvanceSlot => {
                    "SELECT pg_replication_slot_advance($1, pg_current_wal_lsn()) \
                     FROM pg_replication_slots WHERE slot_name = $1"
                }
                _ => {
                    "SELECT pg_drop_replication_slot($1), \
                            pg_create_logical_replication_slot($1, 'pgoutput') \
                     FROM pg_replication_slots WHERE slot_name = $1"
                }
            };
            sqlx::query(statement)
                .bind(env.slot_name())
                .execute(&env.pool)
                .await
                .unwrap_or_else(|e| panic!("{action:?}: {e}"));
        }
        Action::LockRows => {
            // Held across the next relay's start, then released.
            let mut holder = sqlx::PgConnection::connect(&env.database_url)
                .await
                .expect("connect");
            let hold = random_between(Duration::from_millis(500)..=Duration::from_millis(3000));
            tokio::spawn(async move {
                let mut transaction = holder.begin().await.expect("BEGIN");
                sqlx::query(
                    "SELECT seq FROM outbox WHERE sent_at IS NULL ORDER BY seq DESC LIMIT 3 \
                     FOR UPDATE",
                )
                .fetch_all(&mut *transaction)
                .await
                .expect("lock unsent rows");
                tokio::time::sleep(hold).await;
                transaction.rollback().await.expect("ROLLBACK");
            });
        }
    }
}

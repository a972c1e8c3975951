//! What operators and services do to a running relay's world, mixed with
//! kills, while writers keep committing (poison rows among them). The
//! relay is killed or stopped, and while it is down one action follows,
//! each in turn, in a random order:
//!
//! - the `pg_control_system()` grant of the relay's least-privilege role is
//!   given or taken away (its identity changes);
//! - `kafka.checkpoint_topic` moves to a new topic or back to an earlier
//!   one, with or without `kafka.previous_checkpoint_topic` naming the
//!   topic it leaves;
//! - `outboxd dead-letters replay --all` puts the dead letters back (each
//!   copy is poison again and dead-lettered again, so replays keep coming);
//! - a service inserts an outbox row and changes it before COMMIT (refused);
//! - `TRUNCATE outbox RESTART IDENTITY` (seqs are handed out again);
//! - replication only: the slot is advanced past unpublished rows, or
//!   dropped and created again, or unsent rows are held locked by another
//!   session across the next start (polling skips locked rows and publishes
//!   them after later events of their aggregate: order, not loss, as
//!   docs/operations.md says, so that one is not mixed in there).
//!
//! The checker then finds every row exactly once, in order, the truncated
//! ones as they were.

use std::process::Command;
use std::time::Duration;

use rand::seq::SliceRandom;
use rand::Rng;
use sqlx::Connection;

use crate::support::checker::Row;
use crate::support::faults::{
    create_topic_keeping_history, random_between, size, Campaign, RelayProcess,
};
use crate::support::workload::{Workload, Written};
use crate::support::Mode;

const LIMIT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
enum Action {
    /// GRANT or REVOKE EXECUTE ON `pg_control_system()`, whichever changes it.
    ToggleGrant,
    /// Another `kafka.checkpoint_topic`, the old one as the previous one or not.
    MoveCheckpointTopic,
    /// `outboxd dead-letters replay --all`.
    Replay,
    /// INSERT, then UPDATE or DELETE of that row, in one transaction.
    ChangeBeforeCommit,
    /// `TRUNCATE outbox RESTART IDENTITY`.
    Truncate,
    /// `pg_replication_slot_advance` to the current WAL position.
    AdvanceSlot,
    /// `pg_drop_replication_slot`, then a new slot of the same name.
    RecreateSlot,
    /// Unsent rows locked by another session across the next start.
    LockRows,
}

/// What the campaign keeps between actions.
struct Operator {
    role: String,
    granted: bool,
    moves: usize,
    changes: usize,
}

in_both_modes!(operator_actions_between_kills, worker_threads = 2);
async fn operator_actions_between_kills(mode: Mode) {
    let workload = Workload::realistic().with_poison(40);
    let mut campaign = Campaign::start("operator-actions", mode, &workload).await;
    let role = campaign.env.relay_without_pg_control_system().await;
    let mut operator = Operator {
        role,
        granted: false,
        moves: 0,
        changes: 0,
    };
    let mut actions = vec![
        Action::ToggleGrant,
        Action::MoveCheckpointTopic,
        Action::Replay,
        Action::ChangeBeforeCommit,
        Action::Truncate,
    ];
    if mode == Mode::Replication {
        actions.extend([Action::AdvanceSlot, Action::RecreateSlot, Action::LockRows]);
    }
    // Every action at least once in a short run; a shuffled cycle after.
    actions.shuffle(&mut rand::rng());
    for run in 0..size(actions.len(), 60) {
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
        let action = actions[run % actions.len()];
        act(&mut campaign, &mut operator, action).await;
        campaign.runs += 1;
    }
    campaign.finish(Vec::new()).await;
}

async fn act(campaign: &mut Campaign, operator: &mut Operator, action: Action) {
    eprintln!("operator-actions: {action:?}");
    match action {
        Action::ToggleGrant => {
            if operator.granted {
                campaign.env.revoke_pg_control_system(&operator.role).await;
            } else {
                campaign.env.grant_pg_control_system(&operator.role).await;
            }
            operator.granted = !operator.granted;
        }
        Action::MoveCheckpointTopic => {
            // To a new topic, or back to one it was on before; naming the
            // topic it leaves as the previous one, or not.
            let back =
                !campaign.earlier_checkpoint_topics.is_empty() && rand::rng().random_bool(0.3);
            let topic = if back {
                let earlier = &campaign.earlier_checkpoint_topics;
                earlier[rand::rng().random_range(0..earlier.len())].clone()
            } else {
                operator.moves += 1;
                let topic = format!(
                    "{}-moved-{}.checkpoints",
                    campaign.env.topic_prefix(),
                    operator.moves
                );
                create_topic_keeping_history(&campaign.env, &topic, 1).await;
                topic
            };
            let name_previous = rand::rng().random_bool(0.5);
            eprintln!(
                "operator-actions: checkpoint topic {} {topic}, previous named: {name_previous}",
                if back { "back to" } else { "moved to" }
            );
            if topic != campaign.env.checkpoint_topic() {
                let previous = campaign.env.move_checkpoint_topic(&topic, name_previous);
                campaign.earlier_checkpoint_topics.push(previous);
            }
        }
        Action::Replay => replay(campaign),
        Action::ChangeBeforeCommit => {
            operator.changes += 1;
            let id = change_before_commit(campaign, operator.changes).await;
            campaign.extra_written(Written {
                rolled_back_ids: vec![id],
                ..Written::default()
            });
        }
        Action::Truncate => {
            let truncated = truncate(campaign).await;
            campaign.truncated.extend(truncated);
        }
        Action::AdvanceSlot | Action::RecreateSlot => {
            let env = &campaign.env;
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
            let mut holder = sqlx::PgConnection::connect(&campaign.env.database_url)
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

/// `outboxd dead-letters replay --all`, as the relay's role. Nothing to
/// replay (no dead letter yet, or all truncated away) is the one failure
/// expected.
fn replay(campaign: &Campaign) {
    let output = Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args(["dead-letters", "replay", "--all", "--config"])
        .arg(&campaign.env.config_path)
        .output()
        .expect("run outboxd dead-letters replay");
    let stdout = String::from_utf8_lossy(&output.stdout);
    eprintln!(
        "operator-actions: replay re-inserted {} dead letters, refused {} replayed before",
        stdout.matches("re-inserted as seq").count(),
        stdout.matches("was replayed before").count()
    );
    assert!(
        output.status.success() || stdout.contains("no dead-lettered row of this table matches"),
        "dead-letters replay failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A service that inserts an event and then patches or withdraws it in the
/// same transaction: the insert-only guard refuses, so nothing commits.
/// Returns the refused row's event id.
async fn change_before_commit(campaign: &Campaign, count: usize) -> String {
    let aggregate = format!("changed-{count}");
    let mut connection = sqlx::PgConnection::connect(&campaign.env.database_url)
        .await
        .expect("connect");
    let mut transaction = connection.begin().await.expect("BEGIN");
    let id: String = sqlx::query_scalar(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         VALUES ('Order', $1, 'OrderPatched', '{\"n\": 1}') RETURNING id::text",
    )
    .bind(&aggregate)
    .fetch_one(&mut *transaction)
    .await
    .expect("insert an event");
    let change = if count % 2 == 0 {
        "UPDATE outbox SET payload = '{\"n\": 2}' WHERE aggregateid = $1"
    } else {
        "DELETE FROM outbox WHERE aggregateid = $1"
    };
    let refused = sqlx::query(change)
        .bind(&aggregate)
        .execute(&mut *transaction)
        .await
        .expect_err("an outbox row changed before COMMIT is refused");
    assert!(
        refused.to_string().contains("outbox rows are insert-only"),
        "{refused}"
    );
    transaction.rollback().await.expect("ROLLBACK");
    id
}

/// Takes the rows as they are and truncates the table in one transaction
/// (the writers wait for its lock), so no row escapes both. Returns them.
async fn truncate(campaign: &Campaign) -> Vec<Row> {
    let mut connection = sqlx::PgConnection::connect(&campaign.env.database_url)
        .await
        .expect("connect");
    let mut transaction = connection.begin().await.expect("BEGIN");
    sqlx::raw_sql("LOCK TABLE outbox IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *transaction)
        .await
        .expect("lock the outbox");
    let rows: Vec<(i64, String, bool)> =
        sqlx::query_as("SELECT seq, id::text, sent_at IS NOT NULL FROM outbox ORDER BY seq")
            .fetch_all(&mut *transaction)
            .await
            .expect("read the rows");
    sqlx::raw_sql("TRUNCATE outbox RESTART IDENTITY")
        .execute(&mut *transaction)
        .await
        .expect("TRUNCATE");
    transaction.commit().await.expect("COMMIT");
    rows.into_iter()
        .map(|(seq, id, sent)| Row::truncated(seq, id, sent))
        .collect()
}

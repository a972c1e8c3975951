//! Two relay processes of one config over four outboxes (four databases:
//! two tables in the run's capture mode, one in the other, and a
//! WAL-message outbox), while writers commit to all of them. Each round
//! SIGKILLs one replica and starts it again, taking turns, so the
//! leadership of each outbox moves between them and the two lead
//! different outboxes at once. Every outbox is checked on its own: exactly
//! once, in order, nothing invented, checkpoints naming its events.

use std::time::Duration;

use crate::support::checker::{self, Report};
use crate::support::faults::{
    create_checkpoint_topic_keeping_history, exclusive, random_between, record, size,
    wait_messages_published, RelayProcess,
};
use crate::support::workload::{writer_pool, LiveWriter, Workload, Written};
use crate::support::{several, Mode, TestEnv};

in_both_modes!(
    several_outboxes_killed_at_random_moments,
    worker_threads = 2
);
async fn several_outboxes_killed_at_random_moments(mode: Mode) {
    let _servers = exclusive().await;
    let other = match mode {
        Mode::Polling => Mode::Replication,
        _ => Mode::Polling,
    };
    let mut envs = [
        TestEnv::new("several-a", mode).await,
        TestEnv::new("several-b", mode).await,
        TestEnv::new("several-c", other).await,
        TestEnv::new("several-d", Mode::Replication).await,
    ];
    let [_, _, _, messages] = &mut envs;
    // Before any writer emits: a message reaches only the slots that exist
    // when it is written.
    messages.use_messages().await;
    let mut writers = Vec::new();
    for env in &envs {
        create_checkpoint_topic_keeping_history(env, 1).await;
        let pool = writer_pool(&env.database_url, 3).await;
        let workload = match env.is_messages() {
            true => Workload::realistic().in_messages(),
            false => Workload::realistic(),
        };
        writers.push(LiveWriter::start_many(&pool, &workload, 0..2, 10));
    }
    let env_refs: Vec<&TestEnv> = envs.iter().collect();
    let config = several::write_config(&env_refs, "  max_message_bytes: 100000\n");
    let runs = size(6, 120);
    // Two replicas; each round SIGKILLs one and starts it again, taking
    // turns, so every kill hits a replica that leads some outboxes (both
    // start together and split the locks; then the survivor of each kill
    // takes over the outboxes the killed one led).
    let logs = [0, 1].map(|replica| {
        std::env::temp_dir().join(format!("outboxd-fault-{}-{replica}.log", envs[0].id))
    });
    let mut replicas = [0, 1].map(|replica| RelayProcess::spawn(&config, &logs[replica], None));
    for round in 0..runs {
        tokio::time::sleep(random_between(
            Duration::from_millis(100)..=Duration::from_millis(3000),
        ))
        .await;
        let replica = &mut replicas[round % 2];
        replica.assert_running("the replica should have been running until killed");
        replica.kill();
        *replica = RelayProcess::spawn(&config, &logs[round % 2], None);
    }
    let mut written = Vec::new();
    for writer in writers {
        written.push(writer.finish().await);
    }
    for (env, written) in envs.iter().zip(&mut written) {
        if env.is_messages() {
            let last = wait_messages_published(env, Duration::from_secs(300)).await;
            *written = Written::combined([std::mem::take(written), last]);
        } else {
            env.wait_all_sent(Duration::from_secs(300)).await;
        }
    }
    for replica in &mut replicas {
        replica.stop().await;
    }
    let mut all = Report::default();
    for (env, written) in envs.iter().zip(&written) {
        let report = match env.is_messages() {
            true => checker::check_messages(env, written).await,
            false => checker::check(env, written).await,
        };
        eprintln!(
            "several outboxes: outbox {} ({}): {} events, {} violations",
            env.relay_name(),
            match env.is_messages() {
                true => "messages",
                false => env.mode.config_value(),
            },
            report.events,
            report.violations().len()
        );
        merge(&mut all, &env.relay_name(), report);
    }
    record("several-outboxes", mode.into(), runs, &all);
    eprintln!(
        "several outboxes ({}): {runs} kills, {} events, {} violations; relay logs {}",
        mode.config_value(),
        all.events,
        all.violations().len(),
        logs[0].display()
    );
    all.assert_clean();
}

/// Adds one outbox's findings to the campaign's, each naming its outbox.
fn merge(all: &mut Report, outbox: &str, report: Report) {
    let named = |found: Vec<String>| found.into_iter().map(move |v| format!("{outbox}: {v}"));
    all.events += report.events;
    all.lost.extend(named(report.lost));
    all.duplicated.extend(named(report.duplicated));
    all.out_of_order.extend(named(report.out_of_order));
    all.other.extend(named(report.other));
}

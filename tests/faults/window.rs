//! Kills while several batches are committed in Kafka but not yet marked
//! sent. Marks are slowed (`OUTBOXD_SLOW_MARKS_MS`), so publishing runs
//! ahead of them and the window of unacknowledged batches fills; the relay
//! is then SIGKILLed right after a later Kafka commit. The next session
//! must mark every row of the window and publish none of them again.

use std::collections::HashSet;
use std::time::Duration;

use rand::Rng;

use crate::support::checker::table_checkpoints;
use crate::support::faults::{size, Campaign, RelayProcess};
use crate::support::workload::Workload;
use crate::support::Mode;

/// Small batches, so a kill finds several of them in the window.
const BATCH_SIZE: &str = "20";

in_both_modes!(
    killed_with_several_batches_unacknowledged,
    worker_threads = 2
);
async fn killed_with_several_batches_unacknowledged(mode: Mode) {
    let mut campaign = Campaign::start("window-kills", mode, &Workload::realistic()).await;
    let mut rounds_with_a_full_window = 0;
    let rounds = size(3, 30);
    for _ in 0..rounds {
        let nth = rand::rng().random_range(3..=8);
        let mut relay = RelayProcess::start_with(
            &campaign.env,
            Some(&format!("after-commit:{nth}")),
            &[
                (outboxd::failpoint::SLOW_MARKS_ENV, "400"),
                ("OUTBOXD__CAPTURE__BATCH_SIZE", BATCH_SIZE),
            ],
        );
        relay
            .killed_at_point("after-commit", Duration::from_secs(90))
            .await;
        campaign.runs += 1;
        if earlier_batches_were_unmarked_at_the_kill(&campaign).await {
            rounds_with_a_full_window += 1;
        }
    }
    eprintln!(
        "window-kills ({}): {rounds_with_a_full_window} of {rounds} kills found an earlier \
         batch committed but unmarked",
        mode.config_value()
    );
    assert!(
        rounds_with_a_full_window > 0,
        "no kill found more than one batch committed but unmarked: the test did not exercise the window"
    );
    campaign.finish(Vec::new()).await;
}

/// Whether the latest checkpoint names rows, still unmarked, that an
/// earlier checkpoint named too: rows of an earlier Kafka transaction than
/// the last, in Kafka but not marked when the relay died.
async fn earlier_batches_were_unmarked_at_the_kill(campaign: &Campaign) -> bool {
    let checkpoints = table_checkpoints(&campaign.env).await;
    let [.., previous, latest] = checkpoints.as_slice() else {
        return false;
    };
    let unmarked: HashSet<i64> = campaign
        .env
        .rows()
        .await
        .into_iter()
        .filter(|(_, _, sent)| !sent)
        .map(|(seq, _, _)| seq)
        .collect();
    let previous: HashSet<i64> = previous.published.to_seqs().into_iter().collect();
    latest
        .published
        .to_seqs()
        .into_iter()
        .any(|seq| previous.contains(&seq) && unmarked.contains(&seq))
}

//! Poison rows (unroutable, oversized) mixed into the stream while the
//! relay is killed now and then: each lands once in the dead-letter topic,
//! and the good rows around them keep their order.

use std::time::Duration;

use crate::support::faults::{size, Campaign, Source};
use crate::support::workload::Workload;

in_every_source!(poison_rows_mixed_into_the_stream, worker_threads = 2);
async fn poison_rows_mixed_into_the_stream(source: Source) {
    let workload = Workload::realistic().with_poison(15);
    let mut campaign = Campaign::start("poison-mix", source, &workload).await;
    for _ in 0..size(3, 30) {
        campaign
            .kill_relay_after(Duration::from_millis(500)..=Duration::from_secs(3))
            .await;
    }
    let written = campaign.finish(Vec::new()).await;
    assert!(
        !written.poison_ids.is_empty(),
        "the workload wrote poison rows"
    );
}

//! The relay SIGKILLed at each named point of its publish path, where a
//! crash is hardest to survive (see `outboxd::failpoint`).

use std::time::Duration;

use rand::Rng;

use crate::support::faults::{size, Campaign, RelayProcess, Source};
use crate::support::workload::Workload;

in_every_source!(killed_at_every_named_point, worker_threads = 2);
async fn killed_at_every_named_point(source: Source) {
    let mut campaign = Campaign::start("kill-points", source, &Workload::realistic()).await;
    for _ in 0..size(1, 5) {
        for point in outboxd::failpoint::POINTS {
            // Not always the first batch: also one after a few commits.
            let nth = rand::rng().random_range(1..=3);
            let mut relay = RelayProcess::start(&campaign.env, Some(&format!("{point}:{nth}")));
            relay.killed_at_point(point, Duration::from_secs(90)).await;
            campaign.runs += 1;
        }
    }
    campaign.finish(Vec::new()).await;
}

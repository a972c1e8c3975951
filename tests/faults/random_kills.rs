//! The relay SIGKILLed at random moments while writers keep committing:
//! during start-up, fencing, reconciling, claiming, producing, committing.

use std::time::Duration;

use crate::support::faults::{size, Campaign, Source};
use crate::support::workload::Workload;

in_every_source!(killed_at_random_moments, worker_threads = 2);
async fn killed_at_random_moments(source: Source) {
    let mut campaign = Campaign::start("random-kills", source, &Workload::realistic()).await;
    for _ in 0..size(5, 300) {
        campaign
            .kill_relay_after(Duration::from_millis(100)..=Duration::from_millis(2500))
            .await;
    }
    campaign.finish(Vec::new()).await;
}

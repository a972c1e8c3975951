//! The relay SIGKILLed at random moments while writers keep committing:
//! during start-up, fencing, reconciling, claiming, producing, committing.

use std::time::Duration;

use crate::support::faults::{size, Campaign};
use crate::support::workload::Workload;
use crate::support::Mode;

in_both_modes!(killed_at_random_moments, worker_threads = 2);
async fn killed_at_random_moments(mode: Mode) {
    let mut campaign = Campaign::start("random-kills", mode, &Workload::realistic()).await;
    for _ in 0..size(5, 300) {
        campaign
            .kill_relay_after(Duration::from_millis(100)..=Duration::from_millis(2500))
            .await;
    }
    campaign.finish(Vec::new()).await;
}

//! The Postgres primary fails over again and again under a running relay
//! (issue 21): a primary with a synchronous physical standby
//! (`support::pg_pair`, strict: a promoted server commits nothing until its
//! own new standby streams, as Patroni's `synchronous_mode_strict`), three
//! writers committing the realistic workload, and one relay, writers and
//! relay reaching Postgres through a proxy that follows the primary, as
//! HAProxy does on Patroni's health check. Each round, at a random moment:
//! the primary is crashed (`-m immediate`), the standby promoted, the proxy
//! switched to it (resetting every session), and a new synchronous standby
//! base-backed-up from it for the next round. In even rounds the relay
//! rides the failover out through its retries (and, in replication mode,
//! the lost-slot path, as the promoted server has no slot on PostgreSQL
//! before 17) and must still be running after it; in odd rounds it dies
//! with the primary (SIGKILL) and a new one starts through the proxy once
//! the promoted server takes connections, as an operator's restart would.
//! (Riding out only would be as correct, but the relay resets its retry
//! backoff only after a session healthy for 60 s, so back-to-back
//! failovers would each wait up to a minute.)
//!
//! What must hold, judged by what the last promoted server holds: every row
//! it has is in Kafka exactly once and in order per aggregate; nothing is
//! in Kafka that it lacks (a commit the standby had not flushed when the
//! primary died is never published: the standby gate, or in polling the
//! commit's own wait for the standby); every writer whose COMMIT returned
//! finds its row there. A writer whose COMMIT failed in the crash may or
//! may not have its row: the checker takes the table's word for it.

use std::time::Duration;

use crate::support::faults::{exclusive, random_between, size, Campaign, RelayProcess};
use crate::support::pg_pair::{PairOption, PgPair};
use crate::support::proxy::Proxy;
use crate::support::workload::Workload;
use crate::support::Mode;

/// `host:port` of a `postgres://user@host:port/db` URL.
fn address(url: &str) -> String {
    let after_at = url.rsplit_once('@').map_or(url, |(_, rest)| rest);
    after_at
        .split('/')
        .next()
        .expect("a host:port in the URL")
        .to_string()
}

in_both_modes!(primary_failovers, worker_threads = 2);
async fn primary_failovers(mode: Mode) {
    // The pair and the proxy only once this test holds the servers: fault
    // tests run one at a time.
    let servers = exclusive().await;
    let mut pair = PgPair::start_with("failovers", &[PairOption::Strict]).await;
    let proxy = Proxy::start("127.0.0.1:0", &address(&pair.primary_url)).await;
    let through_proxy = format!("postgres://postgres@{}/postgres", proxy.local_addr());
    let mut campaign = Campaign::start_on_server(
        servers,
        "primary-failovers",
        mode,
        &Workload::realistic(),
        3,
        None,
        &through_proxy,
    )
    .await;
    let mut relay = RelayProcess::start(&campaign.env, None);
    campaign.env.wait_leader(Duration::from_secs(60)).await;
    campaign.env.wait_streaming(Duration::from_secs(60)).await;

    for round in 0..size(2, 30) {
        // Writers never stop, so commits are waiting for the standby (and,
        // in replication mode, decoded and held by the relay) at any moment.
        tokio::time::sleep(random_between(
            Duration::from_millis(300)..=Duration::from_millis(3000),
        ))
        .await;
        let restart = round % 2 == 1;
        pair.crash_primary().await;
        if restart {
            relay.kill();
        }
        pair.promote().await;
        proxy.switch_to(&address(&pair.primary_url));
        if restart {
            relay = RelayProcess::start(&campaign.env, None);
        }
        // Strict: nothing commits on the promoted server, and nothing is
        // released to the relay, until its new standby streams.
        pair.new_standby().await;
        campaign.runs += 1;
        eprintln!(
            "primary-failovers ({}): round {round}: promoted {}, relay {}",
            mode.config_value(),
            pair.primary_url,
            if restart { "restarted" } else { "rode it out" }
        );
        // The relay found the promoted server by itself: it leads there
        // (and streams, in replication mode) before the next crash.
        campaign.env.wait_leader(Duration::from_secs(120)).await;
        campaign.env.wait_streaming(Duration::from_secs(120)).await;
        relay.assert_running("the relay must ride out a failover of the primary");
    }
    campaign.finish(vec![relay]).await;
    drop(proxy);
    drop(pair);
}

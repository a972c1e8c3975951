//! The network between the relay and its servers cut and stalled through
//! a TCP proxy: connections reset, or bytes held back, including a stall
//! longer than the Kafka transaction timeout.

use std::time::Duration;

use crate::support::faults::{
    kafka_proxy_addresses, random_between, size, Campaign, RelayProcess, Source,
};
use crate::support::proxy::Proxy;
use crate::support::workload::Workload;

/// Alternates cuts and stalls of `proxy` under a running relay; `longest`
/// bounds how long one lasts.
async fn cut_and_stall(
    campaign: &mut Campaign,
    relay: &mut RelayProcess,
    proxy: &Proxy,
    faults: usize,
    longest: Duration,
) {
    for i in 0..faults {
        tokio::time::sleep(random_between(
            Duration::from_millis(300)..=Duration::from_secs(2),
        ))
        .await;
        if i % 2 == 0 {
            proxy.cut();
        } else {
            proxy.stall();
        }
        tokio::time::sleep(random_between(Duration::from_millis(500)..=longest)).await;
        proxy.restore();
        campaign.runs += 1;
        relay.assert_running("the relay must reconnect after a network fault");
    }
}

in_every_source!(postgres_link_cut_and_stalled, worker_threads = 2);
async fn postgres_link_cut_and_stalled(source: Source) {
    let mut campaign = Campaign::start("postgres-network", source, &Workload::realistic()).await;
    let server = campaign
        .env
        .database_url
        .split('@')
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .expect("host:port in the database url")
        .to_string();
    let proxy = Proxy::start("127.0.0.1:0", &server).await;
    // The relay's SQL and replication connections both go through it; the
    // writers and the checker do not.
    campaign
        .env
        .replace_in_config(&format!("@{server}/"), &format!("@{}/", proxy.local_addr()));
    let mut relay = RelayProcess::start(&campaign.env, None);
    campaign.env.wait_leader(Duration::from_secs(30)).await;
    cut_and_stall(
        &mut campaign,
        &mut relay,
        &proxy,
        size(2, 20),
        Duration::from_secs(4),
    )
    .await;
    campaign.finish(vec![relay]).await;
    drop(proxy);
}

in_every_source!(kafka_link_cut_and_stalled, worker_threads = 2);
async fn kafka_link_cut_and_stalled(source: Source) {
    let mut campaign = Campaign::start("kafka-network", source, &Workload::realistic()).await;
    // The broker advertises the proxy's address on its PROXIED listener, so
    // a client bootstrapping there reaches the broker only through it.
    let (listen, upstream) = kafka_proxy_addresses();
    let proxy = Proxy::start(&listen, &upstream).await;
    campaign.env.replace_in_config(
        &format!("bootstrap_servers: {}", campaign.env.kafka),
        &format!("bootstrap_servers: {listen}"),
    );
    campaign
        .env
        .replace_in_config("transaction_timeout: 20s", "transaction_timeout: 4s");
    let mut relay = RelayProcess::start(&campaign.env, None);
    campaign.env.wait_leader(Duration::from_secs(30)).await;
    cut_and_stall(
        &mut campaign,
        &mut relay,
        &proxy,
        size(2, 20),
        Duration::from_secs(3),
    )
    .await;

    // A stall longer than the transaction timeout: the coordinator aborts
    // the open transaction behind the relay's back.
    for _ in 0..size(1, 5) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        proxy.stall();
        tokio::time::sleep(Duration::from_secs(7)).await;
        proxy.restore();
        campaign.runs += 1;
        relay.assert_running("the relay must recover from a transaction the broker timed out");
    }
    campaign.finish(vec![relay]).await;
    drop(proxy);
}

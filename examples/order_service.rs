//! A tiny order service for the demo: it writes its business change and its
//! events in one Postgres transaction, the way a real service adopts the
//! outbox pattern, and can read the events back from Kafka.
//!
//! ```text
//! order_service write   POSTGRES_URL ORDERS    # place orders, some roll back
//! order_service consume KAFKA TOPIC...         # print committed events
//! ```

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::postgres::PgPoolOptions;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("write") if args.len() == 3 => write(&args[1], args[2].parse()?).await,
        Some("consume") if args.len() >= 3 => consume(&args[1], &args[2..]),
        _ => Err("usage: order_service write POSTGRES_URL ORDERS | consume KAFKA TOPIC...".into()),
    }
}

/// Places `orders` orders. Each is one transaction: insert the order, then
/// its `OrderCreated` event; most are paid right away (`PaymentCaptured` in
/// a second transaction); every fifth order fails validation and rolls
/// back, taking its event with it.
async fn write(url: &str, orders: u32) -> Result<(), Box<dyn std::error::Error>> {
    let pool = PgPoolOptions::new().max_connections(2).connect(url).await?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS orders (id text PRIMARY KEY, customer text NOT NULL, \
         total_cents bigint NOT NULL, status text NOT NULL)",
    )
    .execute(&pool)
    .await?;
    let (mut committed, mut rolled_back) = (0, 0);
    for n in 1..=orders {
        let order_id = format!("order-{n:04}-{}", std::process::id());
        let total_cents = 1_000 + i64::from(n) * 137 % 9_000;
        let mut tx = pool.begin().await?;
        sqlx::query(
            "INSERT INTO orders (id, customer, total_cents, status) VALUES ($1, $2, $3, 'created')",
        )
        .bind(&order_id)
        .bind(format!("customer-{}", n % 7))
        .bind(total_cents)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload, headers) VALUES \
             ('Order', $1, 'OrderCreated', jsonb_build_object('orderId', $1::text, 'totalCents', $2::bigint), \
              jsonb_build_object('source', 'order-service'))",
        )
        .bind(&order_id)
        .bind(total_cents)
        .execute(&mut *tx)
        .await?;
        if n % 5 == 0 {
            // Business validation failed after the event was written: the
            // rollback removes the order and its event together.
            tx.rollback().await?;
            rolled_back += 1;
            continue;
        }
        tx.commit().await?;
        committed += 1;

        let mut tx = pool.begin().await?;
        sqlx::query("UPDATE orders SET status = 'paid' WHERE id = $1")
            .bind(&order_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES \
             ('Order', $1, 'PaymentCaptured', jsonb_build_object('orderId', $1::text, 'amountCents', $2::bigint))",
        )
        .bind(&order_id)
        .bind(total_cents)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
    }
    println!("order service: {committed} orders committed (each OrderCreated + PaymentCaptured), {rolled_back} rolled back");
    Ok(())
}

/// Prints every committed event in `topics`, read with `read_committed`.
fn consume(bootstrap: &str, topics: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "order-service-demo")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .create()?;
    let mut assignment = TopicPartitionList::new();
    for topic in topics {
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
            assignment.add_partition_offset(topic, partition.id(), Offset::Beginning)?;
        }
    }
    consumer.assign(&assignment)?;
    let (mut at_end, mut events) = (0, 0);
    while at_end < assignment.count() {
        match consumer.poll(Duration::from_secs(10)) {
            None => break,
            Some(Err(KafkaError::PartitionEOF(_))) => at_end += 1,
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(message)) => {
                events += 1;
                let event_type = message
                    .headers()
                    .and_then(|h| h.iter().find(|h| h.key == "type").and_then(|h| h.value))
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default();
                println!(
                    "  {:<22} {}[{}]@{:<4} key={:<18} {}",
                    event_type,
                    message.topic(),
                    message.partition(),
                    message.offset(),
                    String::from_utf8_lossy(message.key().unwrap_or_default()),
                    String::from_utf8_lossy(message.payload().unwrap_or_default()),
                );
            }
        }
    }
    println!(
        "consumer: {events} committed events read from {}",
        topics.join(", ")
    );
    Ok(())
}

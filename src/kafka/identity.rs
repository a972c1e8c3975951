//! Which names a relay uses in Kafka: one set per outbox table, whatever the
//! relay is called.
//!
//! Invariant: every relay that ever leads a table uses the same
//! `transactional.id`, checkpoint key and checkpoint group, all derived from
//! the table and the database it lives in. So `init_transactions` by the
//! new leader fences *every* earlier leader of the table, including one with
//! another `relay.name` that died or lost its lock inside its very first
//! Kafka transaction, before anything else is read or published; and the
//! latest checkpoint of the table is found in one place, whoever wrote it.
//! `relay.name` only names the process (client id, slot, logs, metrics).
//!
//! The identity can still change under a table: a role that could not read
//! the system identifier (and fell back to `relay.name`) is granted it, or
//! the table was led by a release from before table-keyed checkpoints. So a
//! takeover also reads and fences the identities a predecessor can have had
//! (`alternates`, and the legacy keys in `kafka::checkpoint_scan`).

/// The Kafka identity of one outbox table's relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableIdentity {
    /// Key of the table's checkpoint records: `<source>/<schema.table>`.
    pub checkpoint_key: String,
    /// The producer's `transactional.id`: fencing is per table.
    pub transactional_id: String,
    /// The consumer group whose committed offset, written inside each Kafka
    /// transaction, points at that transaction's checkpoint record.
    pub checkpoint_group: String,
    /// Whether the identity names the database (`false` when the role may not
    /// read the system identifier, and the relay name stands in for it).
    pub names_the_database: bool,
}

impl TableIdentity {
    /// `source` is `<Postgres system identifier>/<database>`; a physical
    /// replica promoted after a failover keeps the system identifier, so the
    /// identity survives it. Without it, `relay.name` stands in: the names
    /// are still unique per table when one name is used per table, but a
    /// relay renamed later is no longer fenced by its successor.
    pub fn new(source: Option<&str>, table: &str, relay_name: &str) -> TableIdentity {
        let (checkpoint_key, names_the_database) = match source {
            Some(source) => (format!("{source}/{table}"), true),
            None => (format!("relay:{relay_name}/{table}"), false),
        };
        TableIdentity {
            transactional_id: format!("outboxd-{checkpoint_key}"),
            checkpoint_group: format!("outboxd-{checkpoint_key}"),
            checkpoint_key,
            names_the_database,
        }
    }

    /// The identity whose checkpoints are keyed `checkpoint_key`: every
    /// name of an identity derives from its key.
    pub fn from_checkpoint_key(checkpoint_key: &str) -> TableIdentity {
        TableIdentity {
            transactional_id: format!("outboxd-{checkpoint_key}"),
            checkpoint_group: format!("outboxd-{checkpoint_key}"),
            checkpoint_key: checkpoint_key.to_string(),
            names_the_database: !checkpoint_key.starts_with("relay:"),
        }
    }

    /// The other identity this relay's table may have had: the `relay.name`
    /// stand-in, used before the role was granted EXECUTE on
    /// `pg_control_system()`. (The reverse, a grant taken away, or a new
    /// system identifier, cannot be named without it: the first start under
    /// the new identity scans the topic, fences the identities it finds for
    /// this table and matches rows by event id, see
    /// `checkpoint_scan::Found::same_database`.)
    pub fn alternates(&self, table: &str, relay_name: &str) -> Vec<TableIdentity> {
        if self.names_the_database {
            vec![TableIdentity::new(None, table, relay_name)]
        } else {
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relays_with_different_names_on_one_table_share_the_identity() {
        let a = TableIdentity::new(Some("7710644134332591330/orders"), "public.outbox", "a");
        let b = TableIdentity::new(Some("7710644134332591330/orders"), "public.outbox", "b");
        assert_eq!(a, b);
        assert_eq!(
            a.transactional_id,
            "outboxd-7710644134332591330/orders/public.outbox"
        );
        assert!(a.names_the_database);
    }

    #[test]
    fn the_same_table_in_another_database_is_another_identity() {
        let orders = TableIdentity::new(Some("77/orders"), "public.outbox", "a");
        let payments = TableIdentity::new(Some("77/payments"), "public.outbox", "a");
        let other_server = TableIdentity::new(Some("78/orders"), "public.outbox", "a");
        assert_ne!(orders.checkpoint_key, payments.checkpoint_key);
        assert_ne!(orders.transactional_id, other_server.transactional_id);
    }

    #[test]
    fn an_identity_is_found_again_from_its_checkpoint_key() {
        for identity in [
            TableIdentity::new(Some("77/orders"), "public.outbox", "orders"),
            TableIdentity::new(None, "public.outbox", "orders"),
        ] {
            assert_eq!(
                TableIdentity::from_checkpoint_key(&identity.checkpoint_key),
                identity
            );
        }
    }

    #[test]
    fn without_the_database_the_relay_name_stands_in() {
        let identity = TableIdentity::new(None, "public.outbox", "orders");
        assert_eq!(identity.checkpoint_key, "relay:orders/public.outbox");
        assert!(!identity.names_the_database);
    }

    #[test]
    fn a_relay_that_names_the_database_also_looks_under_its_old_stand_in() {
        let identity = TableIdentity::new(Some("77/orders"), "public.outbox", "orders");
        let alternates = identity.alternates("public.outbox", "orders");
        assert_eq!(alternates.len(), 1);
        assert_eq!(alternates[0].checkpoint_key, "relay:orders/public.outbox");
        let stand_in = TableIdentity::new(None, "public.outbox", "orders");
        assert!(stand_in.alternates("public.outbox", "orders").is_empty());
    }
}

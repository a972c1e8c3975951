//! The outbox table contract: its name, its columns, and the SQL the relay
//! runs against it.
//!
//! Invariant: every identifier that reaches SQL comes from here, quoted, so a
//! user's schema, table or column name can never change a statement's meaning.

use crate::config::{validate_identifier, ColumnNames, Partitioning, PostgresConfig};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxTable {
    pub schema: String,
    pub name: String,
    pub columns: ColumnNames,
    /// How the table is partitioned by `created_at`, as configured; the
    /// live table may differ (`schema::TableReport::partitioned` says).
    pub partitioning: Option<Partitioning>,
}

/// How the payload column is read: JSON kinds as UTF-8 text, bytea as raw
/// bytes (Avro, Protobuf), always handed to Kafka byte for byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadEncoding {
    Text,
    Bytes,
}

impl PayloadEncoding {
    /// From Postgres' `format_type` of the payload column.
    pub fn from_type_name(type_name: &str) -> Self {
        if type_name == "bytea" {
            PayloadEncoding::Bytes
        } else {
            PayloadEncoding::Text
        }
    }
}

/// Double-quotes an identifier, doubling any quote inside it.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A string literal for DDL where bind parameters are not allowed.
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

impl ColumnNames {
    /// Every configured column, for checks and tests.
    pub fn all(&self) -> Vec<&str> {
        let mut names = vec![
            self.seq.as_str(),
            self.id.as_str(),
            self.aggregate_type.as_str(),
            self.aggregate_id.as_str(),
            self.event_type.as_str(),
            self.payload.as_str(),
        ];
        names.extend(self.headers.as_deref());
        names.extend(self.tracing_span_context.as_deref());
        names.push(self.created_at.as_str());
        names.push(self.sent_at.as_str());
        names
    }
}

impl OutboxTable {
    /// Splits `schema.table` (schema defaults to `public`) and checks the column names.
    /// The error names the key under `postgres.`.
    pub fn from_config(config: &PostgresConfig) -> Result<OutboxTable, String> {
        let (schema, name) = match config.table.split_once('.') {
            Some((schema, name)) => (schema, name),
            None => ("public", config.table.as_str()),
        };
        validate_identifier(schema).map_err(|e| format!("table: schema {e}"))?;
        validate_identifier(name).map_err(|e| format!("table: {e}"))?;
        if name.contains('.') {
            return Err(format!(
                "table: `{}` has more than one dot; write `schema.table`",
                config.table
            ));
        }
        for column in config.columns.all() {
            validate_identifier(column).map_err(|e| format!("columns: {e}"))?;
        }
        Ok(OutboxTable {
            schema: schema.to_string(),
            name: name.to_string(),
            columns: config.columns.clone(),
            partitioning: config.partitioning.clone(),
        })
    }

    /// `"schema"."table"`.
    pub fn qualified(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }

    /// `schema.table` for people.
    pub fn display_name(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }

    /// Claims the oldest unsent rows. `FOR UPDATE SKIP LOCKED` keeps a row
    /// claimed by another transaction out of this batch; `sent_at IS NULL`
    /// (not a seq cursor) means a row whose transaction commits late, with a
    /// seq below rows already sent, is still found.
    ///
    /// `$1` is the most rows, `$2` the most payload bytes. Before it locks
    /// anything, the claim sizes up to `$4` unsent rows after seq `$3` (the
    /// highest seq this relay's open claims may hold: rows at or below it
    /// are held by them, or committed late) and takes them up to the first
    /// whose payloads before it reach `$2`: at least one row, and at most
    /// one payload past `$2`. A row committed late, below `$3`, is taken
    /// unsized. `$4` keeps the sizing from converting far more large rows
    /// than the claim can take (`capture::polling::ClaimLimits`).
    ///
    /// A payload is sized without fetching it where Postgres knows its size:
    /// a `bytea`'s length, and any uncompressed value's stored size. A
    /// compressed value (large text or jsonb) is sized as the text the claim
    /// sends, which costs the server a conversion for large rows only: its
    /// stored size can be a hundredth of it.
    ///
    /// `created_at_text`: also format `created_at` as RFC 3339 (column 9),
    /// which only CloudEvents' `time` needs; else column 9 is NULL.
    pub fn claim_sql(&self, payload: PayloadEncoding, created_at_text: bool) -> String {
        self.claim_sql_where(payload, created_at_text, "")
    }

    /// Like [`claim_sql`](Self::claim_sql), only rows with seq ≤ `$5`: a
    /// drain that ends even while services keep writing.
    pub fn claim_up_to_sql(&self, payload: PayloadEncoding, created_at_text: bool) -> String {
        self.claim_sql_where(
            payload,
            created_at_text,
            &format!(" AND {} <= $5", quote_ident(&self.columns.seq)),
        )
    }

    fn claim_sql_where(
        &self,
        payload: PayloadEncoding,
        created_at_text: bool,
        extra_condition: &str,
    ) -> String {
        let c = &self.columns;
        let payload_expr = match payload {
            PayloadEncoding::Bytes => quote_ident(&c.payload),
            PayloadEncoding::Text => {
                format!("convert_to({}::text, 'UTF8')", quote_ident(&c.payload))
            }
        };
        let optional_text = |column: &Option<String>| match column {
            Some(name) => format!("{}::text", quote_ident(name)),
            None => "NULL::text".to_string(),
        };
        let created_at_text = match created_at_text {
            true => format!(
                "CASE WHEN EXTRACT(YEAR FROM {created_at} AT TIME ZONE 'UTC') BETWEEN 1 AND 9999 \
                 THEN to_char({created_at} AT TIME ZONE 'UTC', {created_at_format}) END",
                created_at = quote_ident(&c.created_at),
                created_at_format = crate::postgres::timestamp::POLLING_FORMAT_SQL,
            ),
            false => "NULL::text".to_string(),
        };
        let payload_size = match payload {
            PayloadEncoding::Bytes => format!("octet_length({})", quote_ident(&c.payload)),
            PayloadEncoding::Text => format!(
                "CASE WHEN pg_column_compression({payload}) IS NULL \
                 THEN pg_column_size({payload}) ELSE octet_length({payload}::text) END",
                payload = quote_ident(&c.payload)
            ),
        };
        // The event id (and the fields that route and key a record) are
        // read, and the id matched everywhere, as the column type's output
        // function writes them (`format('%s', …)`), which is what the
        // replication stream carries; `::text` can differ (a padded
        // `character(n)` loses its blanks). Marks and the catch-up filter
        // match streamed rows by seq and event id, and an aggregate keyed
        // one way by a catch-up drain and another by the stream would land
        // on two partitions.
        format!(
            "SELECT {seq}::bigint, {id_text}, {aggregate_type_text}, {aggregate_id_text}, {event_type_text}, \
             {payload_expr}, {headers}, {trace}, EXTRACT(EPOCH FROM {created_at})::float8, {created_at_text} \
             FROM {table} WHERE {sent_at} IS NULL{extra_condition} AND {seq} <= \
               (SELECT coalesce(max(seq), $3::bigint) FROM \
                  (SELECT {seq} AS seq, sum(size) OVER (ORDER BY {seq}) - size AS before \
                   FROM (SELECT {seq}, coalesce({payload_size}, 0)::bigint AS size FROM {table} \
                         WHERE {sent_at} IS NULL{extra_condition} AND {seq} > $3::bigint \
                         ORDER BY {seq} LIMIT $4) AS next) AS sized \
                WHERE before < $2::bigint) \
             ORDER BY {seq} LIMIT $1 FOR UPDATE SKIP LOCKED",
            seq = quote_ident(&c.seq),
            id_text = output_text(&c.id),
            aggregate_type_text = output_text(&c.aggregate_type),
            aggregate_id_text = output_text(&c.aggregate_id),
            event_type_text = output_text(&c.event_type),
            headers = optional_text(&c.headers),
            trace = optional_text(&c.tracing_span_context),
            created_at = quote_ident(&c.created_at),
            table = self.qualified(),
            sent_at = quote_ident(&c.sent_at),
        )
    }

    /// Which of the seqs in `$1` (a `bigint[]`) have the ids in `$2`
    /// (`text[]`, index for index): dead letters of this table.
    pub fn rows_with_ids_sql(&self) -> String {
        let c = &self.columns;
        format!(
            "SELECT t.{seq}::bigint FROM {table} t \
             JOIN unnest($1::bigint[], $2::text[]) AS d(dead_seq, dead_id) \
             ON t.{seq} = d.dead_seq \
               AND (format('%s', t.{id}) = d.dead_id OR t.{id}::text = d.dead_id)",
            seq = quote_ident(&c.seq),
            id = quote_ident(&c.id),
            table = self.qualified(),
        )
    }

    /// Inserts row `$1` again as a new, unsent row with the same event id,
    /// type, aggregate, payload and headers, unless a later row already has
    /// its id (it was replayed before); returns the new row's seq.
    pub fn replay_sql(&self) -> String {
        let c = &self.columns;
        let mut columns = vec![
            quote_ident(&c.id),
            quote_ident(&c.aggregate_type),
            quote_ident(&c.aggregate_id),
            quote_ident(&c.event_type),
            quote_ident(&c.payload),
        ];
        columns.extend(c.headers.iter().map(|name| quote_ident(name)));
        columns.extend(c.tracing_span_context.iter().map(|name| quote_ident(name)));
        let columns = columns.join(", ");
        format!(
            "INSERT INTO {table} ({columns}) SELECT {columns} FROM {table} o WHERE o.{seq} = $1 \
             AND NOT EXISTS (SELECT 1 FROM {table} r WHERE r.{id} = o.{id} AND r.{seq} > o.{seq}) \
             RETURNING {seq}::bigint",
            table = self.qualified(),
            seq = quote_ident(&c.seq),
            id = quote_ident(&c.id),
        )
    }

    /// Marks the rows in `$1` (a `bigint[]` of seq) whose event id is in
    /// `$2` (a `text[]`) sent; rows already marked keep their first time, so
    /// replays are harmless. The event id keeps a mark off a new row that
    /// took a published row's seq (`TRUNCATE … RESTART IDENTITY` while the
    /// batch was in flight, a restore): seq is indexed, the id only filters.
    pub fn mark_sent_sql(&self) -> String {
        let c = &self.columns;
        format!(
            "UPDATE {table} SET {sent_at} = now() \
             WHERE {seq} = ANY($1) AND format('%s', {id}) = ANY($2) AND {sent_at} IS NULL",
            table = self.qualified(),
            sent_at = quote_ident(&c.sent_at),
            seq = quote_ident(&c.seq),
            id = quote_ident(&c.id),
        )
    }

    /// The event id (as text) of each row in `$1` (a `bigint[]` of seq).
    pub fn row_ids_sql(&self) -> String {
        let c = &self.columns;
        format!(
            "SELECT {seq}::bigint, format('%s', {id}) FROM {table} WHERE {seq} = ANY($1)",
            table = self.qualified(),
            id = quote_ident(&c.id),
            seq = quote_ident(&c.seq),
        )
    }

    /// The highest seq among unsent rows this snapshot sees (NULL if none).
    /// The lowest seq of an unsent row above `$1` (and, with `up_to`, at
    /// or below `$2`): where claims size next when every row of the last
    /// sized run was held locked by another session.
    pub fn first_unsent_after_sql(&self, up_to: bool) -> String {
        let c = &self.columns;
        format!(
            "SELECT min({seq})::bigint FROM {table} WHERE {sent_at} IS NULL AND {seq} > $1{bound}",
            table = self.qualified(),
            sent_at = quote_ident(&c.sent_at),
            seq = quote_ident(&c.seq),
            bound = if up_to {
                format!(" AND {} <= $2", quote_ident(&c.seq))
            } else {
                String::new()
            },
        )
    }

    pub fn max_unsent_seq_sql(&self) -> String {
        let c = &self.columns;
        format!(
            "SELECT max({seq})::bigint FROM {table} WHERE {sent_at} IS NULL",
            table = self.qualified(),
            sent_at = quote_ident(&c.sent_at),
            seq = quote_ident(&c.seq),
        )
    }

    /// Which of the rows in `$1` (a `bigint[]` of seq) are still unsent,
    /// each with its event id (as text): a seq alone may name another row
    /// after `TRUNCATE … RESTART IDENTITY`.
    pub fn unsent_among_sql(&self) -> String {
        let c = &self.columns;
        format!(
            "SELECT {seq}::bigint, format('%s', {id}) FROM {table} WHERE {seq} = ANY($1) AND {sent_at} IS NULL",
            table = self.qualified(),
            sent_at = quote_ident(&c.sent_at),
            seq = quote_ident(&c.seq),
            id = quote_ident(&c.id),
        )
    }

    /// Up to `$2` unsent rows with seq ≤ `$1`, lowest first, read without
    /// locking them: a row another session holds locked is seen, not skipped
    /// (as a claim's `SKIP LOCKED` does) and not waited for.
    pub fn unsent_up_to_sql(&self) -> String {
        let c = &self.columns;
        format!(
            "SELECT {seq}::bigint FROM {table} WHERE {sent_at} IS NULL AND {seq} <= $1 \
             ORDER BY {seq} LIMIT $2",
            table = self.qualified(),
            sent_at = quote_ident(&c.sent_at),
            seq = quote_ident(&c.seq),
        )
    }

    /// Like [`unsent_up_to_sql`](Self::unsent_up_to_sql), only rows whose
    /// inserting transaction is older than the `catalog_xmin` of the slot
    /// named `$2` (`$3` is the limit): rows that committed before a WAL
    /// position the slot has passed (`relay::catch_up::behind_slot`).
    pub fn unsent_behind_slot_sql(&self) -> String {
        let c = &self.columns;
        format!(
            "SELECT o.{seq}::bigint FROM {table} o, pg_replication_slots s \
             WHERE s.slot_name = $2 AND o.{sent_at} IS NULL AND o.{seq} <= $1 \
               AND age(o.xmin) > age(s.catalog_xmin) \
             ORDER BY o.{seq} LIMIT $3",
            table = self.qualified(),
            sent_at = quote_ident(&c.sent_at),
            seq = quote_ident(&c.seq),
        )
    }

    /// Deletes up to `$2` rows marked sent more than `$1` seconds ago, oldest
    /// seq first (old rows sit at the start of the primary key).
    pub fn delete_sent_before_sql(&self) -> String {
        let c = &self.columns;
        format!(
            "DELETE FROM {table} WHERE {seq} IN (SELECT {seq} FROM {table} \
             WHERE {sent_at} < now() - make_interval(secs => $1) ORDER BY {seq} LIMIT $2)",
            table = self.qualified(),
            sent_at = quote_ident(&c.sent_at),
            seq = quote_ident(&c.seq),
        )
    }

    /// Deletes the rows in `$1` (a `bigint[]` of seq) whose event id is in
    /// `$2` (a `text[]`), for the reason `mark_sent_sql` gives.
    pub fn delete_sql(&self) -> String {
        format!(
            "DELETE FROM {} WHERE {} = ANY($1) AND format('%s', {}) = ANY($2)",
            self.qualified(),
            quote_ident(&self.columns.seq),
            quote_ident(&self.columns.id)
        )
    }

    /// Counts unsent rows and the age in seconds of the oldest: the lag.
    pub fn lag_sql(&self) -> String {
        let c = &self.columns;
        format!(
            "SELECT count(*)::bigint, COALESCE(EXTRACT(EPOCH FROM now() - min({created_at}))::float8, 0) \
             FROM {table} WHERE {sent_at} IS NULL",
            created_at = quote_ident(&c.created_at),
            table = self.qualified(),
            sent_at = quote_ident(&c.sent_at),
        )
    }
}

/// `column` as its type's output function writes it, as the replication
/// stream carries it (`format('%s', …)`, which `::text` is not for every
/// type), NULL kept NULL.
fn output_text(column: &str) -> String {
    let column = quote_ident(column);
    format!("CASE WHEN {column} IS NULL THEN NULL ELSE format('%s', {column}) END")
}

#[cfg(test)]
impl OutboxTable {
    /// The table `name` with the default columns, as a config that names
    /// only the table gives it: for tests that need no database.
    pub(crate) fn named(name: &str) -> Result<OutboxTable, String> {
        let config: PostgresConfig = serde_json::from_value(serde_json::json!({
            "url": "postgres://localhost/db",
            "table": name,
        }))
        .expect("test config");
        OutboxTable::from_config(&config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_defaults_to_public() {
        let outbox = OutboxTable::named("outbox").unwrap();
        assert_eq!(outbox.qualified(), "\"public\".\"outbox\"");
        let outbox = OutboxTable::named("orders.events").unwrap();
        assert_eq!(outbox.qualified(), "\"orders\".\"events\"");
        assert!(OutboxTable::named("a.b.c")
            .unwrap_err()
            .contains("more than one dot"));
        assert!(OutboxTable::named(".x")
            .unwrap_err()
            .starts_with("table: schema"));
    }

    #[test]
    fn identifiers_are_quoted_so_they_cannot_inject() {
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        let outbox = OutboxTable::named("public.\"; DROP TABLE x; --").unwrap();
        assert!(outbox.qualified().starts_with("\"public\".\"\"\"; DROP"));
    }

    #[test]
    fn claim_reads_unsent_rows_in_seq_order_past_rows_locked_elsewhere() {
        let sql = OutboxTable::named("outbox")
            .unwrap()
            .claim_sql(PayloadEncoding::Text, false);
        assert!(
            sql.contains("WHERE \"sent_at\" IS NULL AND \"seq\" <= (SELECT"),
            "{sql}"
        );
        assert!(
            sql.ends_with("ORDER BY \"seq\" LIMIT $1 FOR UPDATE SKIP LOCKED"),
            "{sql}"
        );
        assert!(sql.contains("convert_to(\"payload\"::text, 'UTF8')"));
        assert!(
            sql.contains("::float8, NULL::text FROM"),
            "no created_at text: {sql}"
        );
        let sql = OutboxTable::named("outbox")
            .unwrap()
            .claim_sql(PayloadEncoding::Bytes, true);
        assert!(sql.contains(", \"payload\", "));
        assert!(
            sql.contains("to_char(\"created_at\" AT TIME ZONE 'UTC'"),
            "{sql}"
        );
    }

    #[test]
    fn payload_encoding_follows_the_column_type() {
        assert_eq!(
            PayloadEncoding::from_type_name("bytea"),
            PayloadEncoding::Bytes
        );
        assert_eq!(
            PayloadEncoding::from_type_name("jsonb"),
            PayloadEncoding::Text
        );
        assert_eq!(
            PayloadEncoding::from_type_name("text"),
            PayloadEncoding::Text
        );
    }
}

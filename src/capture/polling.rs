//! Polling capture: claim the oldest unsent rows with
//! `SELECT … FOR UPDATE SKIP LOCKED`.
//!
//! Invariant: a claim reads at most `batch_size` rows and, by their sizes
//! read before locking, at most one payload past `batch_bytes` (rows
//! committed late aside), so memory stays bounded whatever the backlog or
//! the row size, and because it filters on `sent_at IS NULL`
//! rather than a seq cursor, a row whose transaction commits after rows with
//! a higher seq were sent is still claimed on a later round.

use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};

use crate::error::{Error, Result};
use crate::event::OutboxEvent;

/// How much one claim may take.
#[derive(Debug, Clone, Copy)]
pub struct ClaimLimits {
    /// Most rows (`capture.batch_size`).
    pub rows: usize,
    /// Most payload bytes (`capture.batch_bytes`): a claim stops at the
    /// first row whose payloads before it reach this, so it holds at most
    /// one payload more, and always one row.
    pub bytes: usize,
    /// How many rows to size, at most `rows`: sizing a compressed payload
    /// costs the server its conversion to text, so with large payloads a
    /// claim sizes about as many as it can take (`sized_rows_after`).
    pub sized_rows: usize,
}

/// Rows a session's first claim sizes, before any payload size is known.
const FIRST_SIZED_ROWS: usize = 16;

impl ClaimLimits {
    /// The rows to size for the next claim, from the smallest payload of
    /// the last one: twice as many as would fit if they were that small
    /// (at least 16; 16 for a session's first claim). Payloads shrinking
    /// faster than that only make the next claim smaller; it never takes
    /// more bytes for it.
    pub fn sized_rows_after(self, smallest_payload: Option<usize>) -> usize {
        match smallest_payload {
            None => FIRST_SIZED_ROWS.min(self.rows),
            Some(smallest) => (self.bytes / smallest.max(1))
                .saturating_mul(2)
                .clamp(16, self.rows.max(16))
                .min(self.rows),
        }
    }
}

/// Where a session's next claim starts sizing rows: above the highest seq
/// it has claimed, since its open claims hold the rows below.
///
/// An empty claim with an unsent row above that seq has two causes that
/// look alike: another session holds the row locked, or the row committed
/// between the claim and the look. The floor moves past the row only when
/// two looks in a row find the same one; moving at once would let the next
/// claim take a just-committed row unsized, on top of a full batch.
#[derive(Debug, Default, Clone, Copy)]
pub struct SizingFloor {
    highest_claimed: i64,
    unclaimable_once: Option<i64>,
}

impl SizingFloor {
    /// The seq the next claim sizes rows after (`claim_batch`'s
    /// `sized_after`).
    pub fn sized_after(self) -> i64 {
        self.highest_claimed
    }

    /// A claim took rows up to `highest`.
    pub fn claimed(&mut self, highest: i64) {
        self.highest_claimed = self.highest_claimed.max(highest);
        self.unclaimable_once = None;
    }

    /// An empty claim left an unsent row at `seq` (`first_unsent_after`).
    pub fn empty_claim_left(&mut self, seq: i64) {
        if self.unclaimable_once == Some(seq) {
            // Seen twice: held by another session. Size past it; it is
            // taken, unsized, once free, like a row committed late.
            self.highest_claimed = self.highest_claimed.max(seq);
            self.unclaimable_once = None;
        } else {
            self.unclaimable_once = Some(seq);
        }
    }
}

/// Claims unsent rows within `limits` inside the caller's transaction; the
/// row locks last until that transaction ends, after the rows are marked.
/// `sized_after`: the highest seq this relay's open claims may hold (0 at
/// first); rows above it are sized before anything is locked
/// (`OutboxTable::claim_sql`). `up_to` binds `$5` of a bounded claim
/// (`OutboxTable::claim_up_to_sql`).
pub async fn claim_batch(
    connection: &mut PgConnection,
    claim_sql: &str,
    limits: ClaimLimits,
    sized_after: i64,
    up_to: Option<i64>,
) -> Result<Vec<OutboxEvent>> {
    let as_i64 = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    let mut query = sqlx::query(claim_sql)
        .bind(as_i64(limits.rows))
        .bind(as_i64(limits.bytes))
        .bind(sized_after)
        .bind(as_i64(limits.sized_rows.clamp(1, limits.rows.max(1))));
    if let Some(up_to) = up_to {
        query = query.bind(up_to);
    }
    let rows = query
        .fetch_all(connection)
        .await
        .map_err(|e| Error::from_postgres("claiming outbox rows", e))?;
    rows.iter().map(event_from_row).collect()
}

/// The lowest seq of an unsent row above `after` (up to `up_to`), locked
/// or not: `sql` is `OutboxTable::first_unsent_after_sql`. An empty claim
/// with such a row left means every row it sized is held by another
/// session, or that the row has just committed (`SizingFloor`).
pub async fn first_unsent_after(
    connection: &mut PgConnection,
    sql: &str,
    after: i64,
    up_to: Option<i64>,
) -> Result<Option<i64>> {
    let mut query = sqlx::query_scalar(sql).bind(after);
    if let Some(up_to) = up_to {
        query = query.bind(up_to);
    }
    query
        .fetch_one(connection)
        .await
        .map_err(|e| Error::from_postgres("looking for unsent rows past locked ones", e))
}

fn event_from_row(row: &PgRow) -> Result<OutboxEvent> {
    let decode = |e: sqlx::Error| Error::stop(format!("reading an outbox row: {e}"));
    Ok(OutboxEvent {
        seq: row.try_get(0).map_err(decode)?,
        id: row.try_get(1).map_err(decode)?,
        aggregate_type: row.try_get(2).map_err(decode)?,
        aggregate_id: row.try_get(3).map_err(decode)?,
        event_type: row.try_get(4).map_err(decode)?,
        payload: row.try_get(5).map_err(decode)?,
        headers_json: row.try_get(6).map_err(decode)?,
        trace_parent: row.try_get(7).map_err(decode)?,
        position: None,
        created_at: row.try_get(9).map_err(decode)?,
        committed_at: row
            .try_get::<Option<f64>, _>(8)
            .map_err(decode)?
            .and_then(|epoch| {
                std::time::SystemTime::UNIX_EPOCH
                    .checked_add(std::time::Duration::try_from_secs_f64(epoch).ok()?)
            }),
        poison: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_committed_after_an_empty_claim_is_sized_by_the_next() {
        let mut floor = SizingFloor::default();
        floor.claimed(46);
        // The claim saw nothing; the look after it saw seq 47 commit.
        floor.empty_claim_left(47);
        assert_eq!(floor.sized_after(), 46, "47 is sized, not taken on top");
        // The next claim takes it.
        floor.claimed(48);
        assert_eq!(floor.sized_after(), 48);
        // A later empty claim starts the count again.
        floor.empty_claim_left(49);
        assert_eq!(floor.sized_after(), 48);
    }

    #[test]
    fn a_row_held_by_another_session_is_sized_past_once_seen_twice() {
        let mut floor = SizingFloor::default();
        floor.claimed(10);
        floor.empty_claim_left(11);
        assert_eq!(floor.sized_after(), 10);
        floor.empty_claim_left(11);
        assert_eq!(floor.sized_after(), 11, "held: claims size past it");
        // The next held row is looked at twice as well.
        floor.empty_claim_left(12);
        assert_eq!(floor.sized_after(), 11);
        floor.empty_claim_left(12);
        assert_eq!(floor.sized_after(), 12);
    }

    #[test]
    fn two_different_rows_in_a_row_do_not_move_the_floor() {
        let mut floor = SizingFloor::default();
        floor.empty_claim_left(5);
        floor.empty_claim_left(3);
        assert_eq!(floor.sized_after(), 0);
        floor.empty_claim_left(3);
        assert_eq!(floor.sized_after(), 3);
    }

    #[test]
    fn claims_size_about_as_many_rows_as_fit() {
        let limits = ClaimLimits {
            rows: 2_000,
            bytes: 8 << 20,
            sized_rows: 2_000,
        };
        assert_eq!(limits.sized_rows_after(None), 16, "first claim");
        assert_eq!(limits.sized_rows_after(Some(256)), 2_000, "small rows: all");
        assert_eq!(limits.sized_rows_after(Some(100_000)), 166, "100 KB rows");
        assert_eq!(limits.sized_rows_after(Some(4 << 20)), 16, "at least 16");
        assert_eq!(limits.sized_rows_after(Some(0)), 2_000, "empty payloads");
        let few = ClaimLimits { rows: 5, ..limits };
        assert_eq!(
            few.sized_rows_after(Some(100_000)),
            5,
            "never past batch_size"
        );
        assert_eq!(few.sized_rows_after(None), 5);
    }
}

//! Waking the claim loop: `LISTEN` on the channel the migration's insert
//! trigger notifies, with the poll interval as a fallback.
//!
//! Invariant: the listener is subscribed before the first claim, so a row
//! committed after a claim always either was seen by it or produces a
//! notification (or, if one is lost, the poll interval catches it).

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};

use crate::error::{Error, Result};
use crate::shutdown::Shutdown;

pub struct Wakeup {
    listener: PgListener,
    poll_interval: Duration,
}

impl Wakeup {
    pub async fn listen(
        options: &PgConnectOptions,
        channel: &str,
        poll_interval: Duration,
    ) -> Result<Wakeup> {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect_lazy_with(options.clone());
        let mut listener = PgListener::connect_with(&pool)
            .await
            .map_err(|e| Error::from_postgres("connecting the LISTEN session", e))?;
        listener
            .listen(channel)
            .await
            .map_err(|e| Error::from_postgres(&format!("LISTEN {channel}"), e))?;
        Ok(Wakeup {
            listener,
            poll_interval,
        })
    }

    /// Returns when a notification arrives, the poll interval passes, or
    /// shutdown is requested.
    pub async fn wait(&mut self, shutdown: &mut Shutdown) {
        tokio::select! {
            received = self.listener.try_recv() => {
                if let Err(error) = received {
                    // PgListener reconnects on the next call; until then the
                    // poll interval keeps rows flowing.
                    tracing::warn!(%error, "LISTEN connection failed; falling back to the poll interval until it reconnects");
                    tokio::time::sleep(self.poll_interval).await;
                }
            }
            _ = tokio::time::sleep(self.poll_interval) => {}
            _ = shutdown.wait() => {}
        }
    }
}

//! The request to stop, as every task of the relay sees it.
//!
//! Invariant: once requested, a shutdown stays requested, and every wait
//! on it returns at once from then on. A trigger dropped without a request
//! counts as one: nobody is left who could ask, so nothing waits for it.

use std::time::Duration;

use tokio::sync::watch;

/// Requests the shutdown; held by whoever decides (the signal handler).
pub struct Trigger(watch::Sender<bool>);

/// What a task checks and waits on; clone one per task.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// A trigger and the shutdown it requests.
pub fn channel() -> (Trigger, Shutdown) {
    let (sender, receiver) = watch::channel(false);
    (Trigger(sender), Shutdown(receiver))
}

impl Trigger {
    pub fn request(&self) {
        self.0.send_replace(true);
    }
}

impl Shutdown {
    pub fn is_requested(&self) -> bool {
        *self.0.borrow() || self.0.has_changed().is_err()
    }

    /// Returns once shutdown is requested.
    pub async fn wait(&mut self) {
        // An error means the trigger is gone: requested, by the invariant.
        let _ = self.0.wait_for(|requested| *requested).await;
    }

    /// Waits up to `duration` for a shutdown request; says whether one came.
    pub async fn requested_within(&mut self, duration: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(duration) => self.is_requested(),
            _ = self.wait() => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_is_seen_by_every_clone_and_stays() {
        let (trigger, mut shutdown) = channel();
        let mut other = shutdown.clone();
        assert!(!shutdown.is_requested());
        assert!(!shutdown.requested_within(Duration::from_millis(10)).await);
        trigger.request();
        shutdown.wait().await;
        other.wait().await;
        // Waiting again returns at once: the request stays.
        shutdown.wait().await;
        assert!(shutdown.is_requested() && other.is_requested());
        assert!(other.requested_within(Duration::from_secs(3600)).await);
    }

    #[tokio::test]
    async fn a_dropped_trigger_counts_as_a_request() {
        let (trigger, mut shutdown) = channel();
        drop(trigger);
        assert!(shutdown.is_requested());
        shutdown.wait().await;
    }
}

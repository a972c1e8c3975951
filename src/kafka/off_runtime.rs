//! Dropping librdkafka clients away from the async workers.
//!
//! Invariant: a producer or admin client that async code owns is destroyed
//! on a blocking thread. librdkafka's destroy joins the client's threads,
//! and a producer's first flushes for up to 500 ms; on a tokio worker that
//! would stall every task scheduled there (the lag sampler, the HTTP
//! endpoints, the other stages) for as long.

use std::ops::Deref;

pub struct DropOffRuntime<T: Send + 'static>(Option<T>);

impl<T: Send + 'static> DropOffRuntime<T> {
    pub fn new(client: T) -> Self {
        DropOffRuntime(Some(client))
    }
}

impl<T: Send + 'static> Deref for DropOffRuntime<T> {
    type Target = T;

    fn deref(&self) -> &T {
        self.0.as_ref().expect("present until dropped")
    }
}

impl<T: Send + 'static> Drop for DropOffRuntime<T> {
    fn drop(&mut self) {
        let Some(client) = self.0.take() else { return };
        match tokio::runtime::Handle::try_current() {
            // If the runtime is shutting down the task never runs and the
            // client is dropped with it, on whichever thread that is.
            Ok(runtime) => drop(runtime.spawn_blocking(move || drop(client))),
            Err(_) => drop(client),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Notes the thread it was dropped on.
    struct Witness(std::sync::mpsc::Sender<std::thread::ThreadId>);

    impl Drop for Witness {
        fn drop(&mut self) {
            let _ = self.0.send(std::thread::current().id());
        }
    }

    #[test]
    fn inside_a_runtime_the_client_is_dropped_on_another_thread() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (sender, dropped_on) = std::sync::mpsc::channel();
        let worker = runtime.block_on(async move {
            drop(DropOffRuntime::new(Witness(sender)));
            std::thread::current().id()
        });
        let thread = dropped_on
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("dropped");
        assert_ne!(thread, worker, "dropped on the async worker");
    }

    #[test]
    fn outside_a_runtime_it_is_dropped_at_once() {
        let (sender, dropped_on) = std::sync::mpsc::channel();
        drop(DropOffRuntime::new(Witness(sender)));
        assert_eq!(dropped_on.try_recv().unwrap(), std::thread::current().id());
    }
}

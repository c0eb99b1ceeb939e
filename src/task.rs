//! Named, traced, cancellable tasks.
//!
//! Every long-lived task the appliance or the installer starts goes through [`Tasks::spawn`] (or
//! [`spawn_with_cancel`] for a lone one): it runs inside a tracing span that names it, ends when
//! its cancellation token fires, and is tracked so that its owner can wait for all of them to
//! end ([`Tasks::shutdown`]) instead of leaving them detached. Tasks may spawn further tasks
//! from inside (a listener starting one task per connection) because [`Tasks`] is a cheap clone.

use std::future::Future;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, Span, debug};

/// Spawns `fut` inside `span`; it is dropped when `token` is cancelled. The handle yields
/// `Some(output)` when the future finished and `None` when it was cancelled first. The task's
/// end is logged at debug with `name`.
pub fn spawn_with_cancel<F>(span: Span, name: &'static str, token: CancellationToken, fut: F) -> JoinHandle<Option<F::Output>>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(cancellable(name, token, fut).instrument(span))
}

async fn cancellable<F: Future>(name: &'static str, token: CancellationToken, fut: F) -> Option<F::Output> {
    tokio::select! {
        // CANCEL-SAFETY: dropping `fut` on cancellation is what is asked for; a task started
        // here must not hold state that someone else needs it to finish writing.
        out = fut => {
            debug!(task = name, "task ended");
            Some(out)
        }
        () = token.cancelled() => {
            debug!(task = name, "task cancelled");
            None
        }
    }
}

/// A set of tasks sharing one cancellation token, joined as a whole. Clones share the set.
#[derive(Clone, Debug)]
pub struct Tasks {
    tracker: TaskTracker,
    token: CancellationToken,
}

impl Tasks {
    /// A set whose tasks end when `token` (or a parent of it) is cancelled.
    pub fn new(token: CancellationToken) -> Self {
        Self { tracker: TaskTracker::new(), token }
    }

    /// The token the set's tasks watch; cancel it to end them all.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Spawns `fut` in the set, inside `span`, dropped on cancellation (see [`spawn_with_cancel`]).
    pub fn spawn<F>(&self, span: Span, name: &'static str, fut: F) -> JoinHandle<Option<F::Output>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(cancellable(name, self.token.clone(), fut).instrument(span))
    }

    /// Runs blocking work on the blocking pool as a member of the set: [`Tasks::shutdown`]
    /// waits for it too (blocking work cannot be interrupted; it should check the token itself
    /// when it runs long).
    pub fn spawn_blocking<T, F>(&self, name: &'static str, f: F) -> JoinHandle<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let span = tracing::debug_span!("blocking", task = name);
        self.tracker.spawn_blocking(move || span.in_scope(f))
    }

    /// How many of the set's tasks are still running.
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    /// Whether no task of the set is running.
    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }

    /// Cancels every task of the set and waits until all have ended. Tasks spawned after this
    /// start already cancelled.
    pub async fn shutdown(&self) {
        self.token.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn a_finished_task_yields_its_output_and_a_cancelled_one_none() {
        let token = CancellationToken::new();
        let done = spawn_with_cancel(Span::none(), "done", token.clone(), async { 7 });
        assert_eq!(done.await.unwrap(), Some(7));
        let stuck = spawn_with_cancel(Span::none(), "stuck", token.clone(), std::future::pending::<u8>());
        token.cancel();
        assert_eq!(stuck.await.unwrap(), None);
    }

    #[tokio::test]
    async fn shutdown_waits_for_nested_tasks_and_their_cleanup() {
        let tasks = Tasks::new(CancellationToken::new());
        let cleaned = Arc::new(AtomicUsize::new(0));
        struct Cleanup(Arc<AtomicUsize>);
        impl Drop for Cleanup {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let (inner, c) = (tasks.clone(), cleaned.clone());
        tasks.spawn(Span::none(), "outer", async move {
            for _ in 0..3 {
                let c = Cleanup(c.clone());
                inner.spawn(Span::none(), "inner", async move {
                    let _c = c;
                    std::future::pending::<()>().await
                });
            }
            let _c = Cleanup(c);
            std::future::pending::<()>().await
        });
        let started = async {
            while tasks.len() < 4 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), started).await.expect("four tasks start");
        tokio::time::timeout(Duration::from_secs(10), tasks.shutdown()).await.expect("shutdown joins");
        assert_eq!(cleaned.load(Ordering::SeqCst), 4);
        assert!(tasks.is_empty());
    }
}

//! Tasks the daemon starts on the side of a request (refills, a delegated container's exit
//! watch): owned by one `JoinSet` so that none of them outlives [`super::run`]. At shutdown
//! the set is closed (a later spawn is dropped unstarted), every task in it aborted, and each
//! one awaited: a refill cancelled mid-connect closes its socket when its future is dropped.

use std::future::Future;
use std::sync::{Mutex, MutexGuard, PoisonError};
use tokio::task::JoinSet;

/// The daemon's background tasks.
#[derive(Debug, Default)]
pub struct Background {
    /// `None` once shut down.
    set: Mutex<Option<JoinSet<()>>>,
    /// Set at shutdown: spawns are refused from then on.
    closed: std::sync::atomic::AtomicBool,
}

impl Background {
    fn set(&self) -> MutexGuard<'_, Option<JoinSet<()>>> {
        self.set.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Run `task` in the set (on the current runtime). False, and `task` dropped unstarted,
    /// after [`Background::shutdown`].
    pub(crate) fn spawn<F: Future<Output = ()> + Send + 'static>(&self, task: F) -> bool {
        let mut guard = self.set();
        if self.closed.load(std::sync::atomic::Ordering::Relaxed) {
            return false;
        }
        let set = guard.get_or_insert_with(JoinSet::new);
        // Reap finished tasks so the set does not grow with every refill ever started.
        while set.try_join_next().is_some() {}
        set.spawn(task);
        true
    }

    /// Tasks still in the set (finished ones not yet reaped included).
    #[must_use]
    pub fn len(&self) -> usize {
        self.set().as_ref().map_or(0, JoinSet::len)
    }

    /// No task in the set.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Refuse new tasks, abort every running one and wait until all have ended. The number
    /// of tasks that were still running (aborted).
    pub(crate) async fn shutdown(&self) -> usize {
        let taken = {
            let mut guard = self.set();
            self.closed.store(true, std::sync::atomic::Ordering::Relaxed);
            guard.take()
        };
        let Some(mut set) = taken else { return 0 };
        set.abort_all();
        let mut aborted = 0;
        while let Some(r) = set.join_next().await {
            if r.is_err_and(|e| e.is_cancelled()) {
                aborted += 1;
            }
        }
        aborted
    }
}

#[cfg(test)]
mod tests {
    use super::Background;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn shutdown_aborts_and_refuses() {
        let bg = Background::default();
        let ran = Arc::new(AtomicBool::new(false));
        let r = ran.clone();
        assert!(bg.spawn(async move {
            tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
            r.store(true, Ordering::Relaxed);
        }));
        assert!(bg.spawn(async {}));
        tokio::task::yield_now().await;
        assert_eq!(bg.shutdown().await, 1, "the sleeping task is aborted, the finished one is not");
        assert!(bg.is_empty());
        assert!(!ran.load(Ordering::Relaxed));
        let late = Arc::new(AtomicBool::new(false));
        let l = late.clone();
        assert!(!bg.spawn(async move { l.store(true, Ordering::Relaxed) }), "a spawn after shutdown is refused");
        tokio::task::yield_now().await;
        assert!(!late.load(Ordering::Relaxed));
        assert!(bg.is_empty());
    }
}

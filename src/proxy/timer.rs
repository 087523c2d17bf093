//! The timer behind hyper's header-read timeout on a client connection.
//!
//! hyper arms that timeout for every request head it waits for and drops it once the head is
//! in. With hyper-util's `TokioTimer` each arming creates a tokio timer, registers it in the
//! runtime's timer wheel (under the wheel's lock) and removes it again: ~1,360 instructions
//! per request, 3.5 % of the proxy's (benches/README.md). A `ConnTimer` belongs to one
//! connection and keeps one tokio timer for its whole life: arming it again moves the deadline
//! later, which tokio does with one atomic operation while the timer is registered. The wheel
//! then sees the timer once per timeout period instead of twice per request; what is left per
//! request (~500 instructions) is mostly the boxed sleep hyper's `Timer` interface asks for.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Instant;

use hyper::rt::{Sleep, Timer};

/// The connection's one tokio timer, made on first use. Only that connection's task polls it,
/// so the lock is never contended; hyper needs the sleep to be `Send + Sync`.
type SharedSleep = Arc<Mutex<Option<Pin<Box<tokio::time::Sleep>>>>>;

/// One connection's timer (see the module doc).
#[derive(Clone, Default)]
pub struct ConnTimer {
    sleep: SharedSleep,
}

impl ConnTimer {
    pub fn new() -> Self {
        ConnTimer::default()
    }
}

impl Timer for ConnTimer {
    fn sleep(&self, duration: std::time::Duration) -> Pin<Box<dyn Sleep>> {
        self.sleep_until(self.now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn Sleep>> {
        Box::pin(ConnSleep {
            timer: self.sleep.clone(),
            deadline: deadline.into(),
        })
    }

    /// tokio's clock, which the deadlines are compared with (and which tests can pause).
    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }
}

/// One arming of the connection's timer: done when the timer, set to `deadline`, fires.
struct ConnSleep {
    timer: SharedSleep,
    deadline: tokio::time::Instant,
}

impl Future for ConnSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut slot = self.timer.lock().unwrap_or_else(PoisonError::into_inner);
        let sleep = slot.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(self.deadline)));
        if sleep.deadline() != self.deadline {
            sleep.as_mut().reset(self.deadline);
        }
        sleep.as_mut().poll(cx)
    }
}

impl Sleep for ConnSleep {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Polls once: whether the sleep is over.
    fn done(sleep: &mut Pin<Box<dyn Sleep>>) -> bool {
        futures_util::FutureExt::now_or_never(sleep).is_some()
    }

    fn armed(timer: &ConnTimer, after: Duration) -> Pin<Box<dyn Sleep>> {
        timer.sleep_until(timer.now() + after)
    }

    #[tokio::test(start_paused = true)]
    async fn fires_at_its_deadline_and_not_before() {
        let timer = ConnTimer::new();
        let mut sleep = armed(&timer, Duration::from_secs(30));
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(!done(&mut sleep));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(done(&mut sleep));
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_arming_moves_the_deadline() {
        let timer = ConnTimer::new();
        let mut first = armed(&timer, Duration::from_secs(30));
        assert!(!done(&mut first));
        drop(first);
        // The next request head: armed 20 s later, so due at 50 s, not at 30 s.
        tokio::time::advance(Duration::from_secs(20)).await;
        let mut second = armed(&timer, Duration::from_secs(30));
        assert!(!done(&mut second));
        tokio::time::advance(Duration::from_secs(15)).await;
        assert!(!done(&mut second));
        tokio::time::advance(Duration::from_secs(16)).await;
        assert!(done(&mut second));
    }

    #[tokio::test(start_paused = true)]
    async fn rearmed_after_firing() {
        let timer = ConnTimer::new();
        let mut first = armed(&timer, Duration::from_secs(1));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(done(&mut first));
        let mut second = armed(&timer, Duration::from_secs(5));
        assert!(!done(&mut second));
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(done(&mut second));
    }
}

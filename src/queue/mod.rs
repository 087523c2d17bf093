//! The wait queue of `on_limit = "queue"`: calls that hit a budget wait in memory, in order,
//! and leave as soon as budget frees.
//!
//! Each integration with a queue has one FIFO. While it is non-empty a single dispatcher task
//! serves its head: it asks the meter again, and when the meter says no, sleeps until the
//! moment the meter named (`Retry-After`), the head's deadline, or a budget change signalled by
//! the meter (a refund, a lower usage report) — whichever comes first. There is no polling, and
//! only the head is tried, so calls leave in the order they came. The queue is bounded by
//! `max_depth` and every call by `max_wait`; at shutdown, waiting calls are answered at once.
//! The lock is a `std::sync::Mutex` held for a push or a pop: only limited calls take it.

pub mod deferred;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use crate::meter::{IntegrationMeter, Limited, Ticket, Verdict};

/// Why a queued call was not forwarded.
#[derive(Debug, Error)]
pub enum QueueError {
    #[error("the wait queue is full ({depth} calls waiting)")]
    Full {
        depth: usize,
        limited: Option<Limited>,
    },
    #[error("the call waited {} in the queue for budget", humantime::format_duration(std::time::Duration::from_millis(.waited.as_millis() as u64)))]
    TimedOut {
        waited: Duration,
        limited: Option<Limited>,
    },
    #[error("the proxy is shutting down")]
    ShuttingDown,
}

struct Waiter {
    units: u32,
    deadline: Instant,
    enqueued: Instant,
    /// The latest answer of the meter for this call, kept for the timeout response (`None` for
    /// a call that queued behind others without being tried yet).
    limited: Option<Limited>,
    reply: oneshot::Sender<Result<Ticket, QueueError>>,
}

struct State {
    waiters: VecDeque<Waiter>,
    dispatching: bool,
}

/// One integration's wait queue.
pub struct WaitQueue {
    meter: Arc<IntegrationMeter>,
    max_depth: usize,
    max_wait: Duration,
    state: Mutex<State>,
    /// Mirrors `waiters.len()` for lock-free reads (metrics, the "is anyone waiting" check).
    depth: AtomicUsize,
    shutdown: watch::Receiver<bool>,
}

impl WaitQueue {
    pub fn new(
        meter: Arc<IntegrationMeter>,
        max_depth: usize,
        max_wait: Duration,
        shutdown: watch::Receiver<bool>,
    ) -> Arc<Self> {
        Arc::new(WaitQueue {
            meter,
            max_depth,
            max_wait,
            state: Mutex::new(State {
                waiters: VecDeque::new(),
                dispatching: false,
            }),
            depth: AtomicUsize::new(0),
            shutdown,
        })
    }

    /// Calls waiting now.
    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }

    /// Whether calls wait: a new call then queues behind them even if budget is there, so
    /// nobody overtakes.
    pub fn is_busy(&self) -> bool {
        self.depth() > 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves a consistent VecDeque; keep serving.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits for budget for a call of `units` that the meter refused with `limited` (or that
    /// queues behind others: `None`).
    pub async fn wait(
        self: &Arc<Self>,
        units: u32,
        limited: Option<Limited>,
    ) -> Result<Ticket, QueueError> {
        if *self.shutdown.borrow() {
            return Err(QueueError::ShuttingDown);
        }
        let (reply, answer) = oneshot::channel();
        let now = Instant::now();
        {
            let mut state = self.lock();
            if state.waiters.len() >= self.max_depth {
                return Err(QueueError::Full {
                    depth: state.waiters.len(),
                    limited,
                });
            }
            state.waiters.push_back(Waiter {
                units,
                deadline: now + self.max_wait,
                enqueued: now,
                limited,
                reply,
            });
            self.set_depth(state.waiters.len());
            if !state.dispatching {
                state.dispatching = true;
                tokio::spawn(self.clone().dispatch());
            }
        }
        // A closed channel means the dispatcher stopped for shutdown.
        answer.await.unwrap_or(Err(QueueError::ShuttingDown))
    }

    /// Serves the head of the queue until the queue is empty.
    async fn dispatch(self: Arc<Self>) {
        let org = self.meter.org().clone();
        org.watch();
        let mut shutdown = self.shutdown.clone();
        loop {
            if *shutdown.borrow() {
                self.drain();
                break;
            }
            let (units, deadline) = {
                let mut state = self.lock();
                // Calls whose client went away leave the queue without being counted.
                while state.waiters.front().is_some_and(|w| w.reply.is_closed()) {
                    state.waiters.pop_front();
                }
                self.set_depth(state.waiters.len());
                match state.waiters.front() {
                    Some(head) => (head.units, head.deadline),
                    None => {
                        state.dispatching = false;
                        break;
                    }
                }
            };
            let now = Instant::now();
            if now >= deadline {
                if let Some(w) = self.pop() {
                    let waited = now - w.enqueued;
                    let _ = w.reply.send(Err(QueueError::TimedOut {
                        waited,
                        limited: w.limited,
                    }));
                }
                continue;
            }
            // Register for the wake-up before asking, so a change in between is not missed.
            let freed = org.budget_freed();
            tokio::pin!(freed);
            freed.as_mut().enable();
            match self.meter.decide(units) {
                Verdict::Forward(ticket) => {
                    if let Some(w) = self.pop() {
                        if let Err(Ok(ticket)) = w.reply.send(Ok(ticket)) {
                            self.meter.refund(ticket); // the client left meanwhile
                        }
                    } else {
                        self.meter.refund(ticket);
                    }
                }
                Verdict::Limited(limited) => {
                    if let Some(head) = self.lock().waiters.front_mut() {
                        head.limited = Some(limited);
                    }
                    let wake = deadline.min(now + limited.retry_after);
                    tokio::select! {
                        () = tokio::time::sleep_until(wake) => {}
                        () = &mut freed => {}
                        _ = shutdown.changed() => {}
                    }
                }
            }
        }
        org.unwatch();
    }

    fn pop(&self) -> Option<Waiter> {
        let mut state = self.lock();
        let w = state.waiters.pop_front();
        self.set_depth(state.waiters.len());
        w
    }

    /// At shutdown: every waiting call is answered now.
    fn drain(&self) {
        let mut state = self.lock();
        for w in state.waiters.drain(..) {
            let _ = w.reply.send(Err(QueueError::ShuttingDown));
        }
        state.dispatching = false;
        self.set_depth(0);
    }

    fn set_depth(&self, depth: usize) {
        self.depth.store(depth, Ordering::Relaxed);
        self.meter.set_queue_depth(depth);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meter::{Budget, Clock, OrgMeter};

    fn setup(
        quota: u64,
        window: &str,
        max_depth: usize,
        max_wait: &str,
    ) -> (Arc<IntegrationMeter>, Arc<WaitQueue>, watch::Sender<bool>) {
        let toml = format!(
            "[[listener]]\nname = \"main\"\nlisten = \"127.0.0.1:0\"\n[[org]]\nid = \"acme\"\n\
             instance_url = \"https://acme.my.salesforce.com\"\nwindow = \"{window}\"\n\
             [[integration]]\nid = \"a\"\norg = \"acme\"\nmatch = {{ path_prefix = \"/a\" }}\nquota = {quota}\n\
             on_limit = \"queue\"\nqueue = {{ max_depth = {max_depth}, max_wait = \"{max_wait}\" }}\n"
        );
        let cfg = crate::config::parse(&toml, std::path::Path::new("t.toml")).expect("config");
        let org = Arc::new(OrgMeter::new(&cfg.orgs[0], Clock::new()));
        let meter = Arc::new(IntegrationMeter::from_config(&cfg.integrations[0], org));
        let (stop, rx) = watch::channel(false);
        let q = WaitQueue::new(
            meter.clone(),
            max_depth,
            humantime::parse_duration(max_wait).expect("d"),
            rx,
        );
        (meter, q, stop)
    }

    fn limited_now(meter: &IntegrationMeter) -> Limited {
        match meter.decide(1) {
            Verdict::Limited(l) => l,
            Verdict::Forward(t) => panic!("expected the quota to be spent, forwarded {t:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn calls_leave_in_order_when_the_window_ages_out() {
        let (meter, q, _stop) = setup(2, "2m", 10, "10m");
        for _ in 0..2 {
            assert!(matches!(meter.decide(1), Verdict::Forward(_)));
        }
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for n in 0..3 {
            let (q, order, limited) = (q.clone(), order.clone(), limited_now(&meter));
            assert_eq!(limited.budget, Budget::Quota);
            tasks.push(tokio::spawn(async move {
                let ticket = q.wait(1, Some(limited)).await.expect("released");
                order.lock().expect("lock").push((n, Instant::now()));
                ticket
            }));
            tokio::task::yield_now().await; // enqueue in this order
        }
        tokio::task::yield_now().await;
        assert_eq!(q.depth(), 3);
        let start = Instant::now();
        for t in tasks {
            let _ = t.await.expect("task");
        }
        let order = order.lock().expect("lock").clone();
        assert_eq!(
            order.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        // Two calls fit when the first minute leaves the 2-minute window, the third one when the
        // next quota slot frees: all within the window length, and not before budget freed.
        let (_, first) = order[0];
        assert!(
            first - start <= Duration::from_secs(120),
            "{:?}",
            first - start
        );
        assert!(
            first - start >= Duration::from_secs(59),
            "released before the window moved: {:?}",
            first - start
        );
        assert_eq!(q.depth(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn overflow_and_timeout_are_answered() {
        let (meter, q, _stop) = setup(1, "60m", 1, "30s");
        assert!(matches!(meter.decide(1), Verdict::Forward(_)));
        let first = {
            let (q, l) = (q.clone(), limited_now(&meter));
            tokio::spawn(async move { q.wait(1, Some(l)).await })
        };
        tokio::task::yield_now().await;
        let overflow = q.wait(1, Some(limited_now(&meter))).await;
        assert!(
            matches!(overflow, Err(QueueError::Full { depth: 1, .. })),
            "{overflow:?}"
        );
        let timed_out = first.await.expect("task");
        match timed_out {
            Err(QueueError::TimedOut { waited, limited }) => {
                assert_eq!(waited, Duration::from_secs(30));
                assert_eq!(limited.map(|l| l.budget), Some(Budget::Quota));
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_refund_wakes_the_queue_before_its_timer() {
        let (meter, q, _stop) = setup(1, "60m", 5, "10m");
        let Verdict::Forward(ticket) = meter.decide(1) else {
            panic!("first call fits")
        };
        let waiting = {
            let (q, l) = (q.clone(), limited_now(&meter));
            tokio::spawn(async move { q.wait(1, Some(l)).await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before = Instant::now();
        meter.refund(ticket); // the first call never reached Salesforce
        let _ = waiting
            .await
            .expect("task")
            .expect("released by the refund");
        assert!(Instant::now() - before < Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_answers_every_waiting_call() {
        let (meter, q, stop) = setup(1, "60m", 5, "10m");
        let _ = meter.decide(1);
        let waiting = {
            let (q, l) = (q.clone(), limited_now(&meter));
            tokio::spawn(async move { q.wait(1, Some(l)).await })
        };
        tokio::task::yield_now().await;
        stop.send(true).expect("send");
        assert!(matches!(
            waiting.await.expect("task"),
            Err(QueueError::ShuttingDown)
        ));
        assert!(matches!(
            q.wait(1, None).await,
            Err(QueueError::ShuttingDown)
        ));
    }
}

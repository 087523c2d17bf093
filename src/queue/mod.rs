//! The wait queue of `on_limit = "queue"`: calls that hit a budget wait in memory, in order,
//! and leave as soon as budget frees.
//!
//! Each integration with a queue has one FIFO. While it is non-empty a single dispatcher task
//! serves its head: it asks the meter again, and when the meter says no, sleeps until the
//! moment the meter named (`Retry-After`), the head's deadline, or a budget change signalled by
//! the meter (a refund, a lower usage report) — whichever comes first. There is no polling, and
//! only the head is tried, so calls leave in the order they came. The queue is bounded by
//! `max_depth` and every call by `max_wait`; at shutdown, waiting calls are answered at once.
//! A call whose client hangs up leaves the queue when its request is dropped, so it holds no
//! place a live call could take. A call worth more than its quota or the org's limit can ever
//! hold is refused on arrival, and at the head if a reload shrank a budget under it: it would
//! only hold every call behind it until its `max_wait`. The lock is a `std::sync::Mutex` held for a push, a pop or a
//! removal: only limited calls take it.

pub mod deferred;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use crate::meter::{Budget, IntegrationMeter, Limited, Ticket, Verdict};

/// A call worth more units than one of its integration's budgets holds in a whole window: no
/// amount of waiting lets it through, so it is refused at once rather than queued or stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("the call is worth {units} calls, more than {} can ever hold; it was not sent (split it into smaller calls, or raise the budget)", self.describe())]
pub struct Oversized {
    pub units: u32,
    /// `Quota`, `Reserve` (the org's limit less the reserve, for a normal integration) or
    /// `OrgLimit`.
    pub budget: Budget,
    pub size: u64,
}

impl Oversized {
    /// Whether a call of `units` can never fit `meter`'s budgets as they stand. The rate is
    /// left out: a call worth more than its burst goes once the bucket is full. So is a budget
    /// of 0 (`quota = 0`, a reserve as large as the limit): that is a pause a reload ends, and
    /// calls wait it out as they wait for any spent budget.
    pub fn check(meter: &IntegrationMeter, units: u32) -> Option<Oversized> {
        let remaining = meter.remaining();
        let over = |size: u64| size > 0 && u64::from(units) > size;
        if let Some(quota) = remaining.quota.filter(|q| over(q.size)) {
            return Some(Oversized {
                units,
                budget: Budget::Quota,
                size: quota.size,
            });
        }
        let org = remaining.org.filter(|o| over(o.size))?;
        // `remaining` gives a normal integration the limit less the reserve.
        let below_limit = meter.org().limit().is_some_and(|limit| org.size < limit);
        Some(Oversized {
            units,
            budget: if below_limit {
                Budget::Reserve
            } else {
                Budget::OrgLimit
            },
            size: org.size,
        })
    }

    fn describe(&self) -> String {
        match self.budget {
            Budget::Quota => format!("the integration's quota of {}", self.size),
            Budget::Reserve => format!(
                "the org's limit less the reserve kept for critical integrations ({})",
                self.size
            ),
            _ => format!("the org's limit of {}", self.size),
        }
    }
}

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
    #[error(transparent)]
    Oversized(Oversized),
}

struct Waiter {
    /// Tells this call's entry apart when its client leaves before the dispatcher served it.
    id: u64,
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
    next_id: u64,
    /// The meter's latest refusal and when it came: the answer for a call refused before the
    /// meter was asked about it (a full queue, a timeout before its turn), so that its
    /// `Retry-After` still says when budget frees.
    last: Option<(Limited, Instant)>,
}

impl State {
    /// The latest refusal as it stands at `now`: its wait less the time since it was given.
    fn latest(&self, now: Instant) -> Option<Limited> {
        self.last.map(|(limited, at)| Limited {
            retry_after: limited
                .retry_after
                .saturating_sub(now - at)
                .max(Duration::from_secs(1)),
            ..limited
        })
    }
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
                next_id: 0,
                last: None,
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
        if let Some(oversized) = Oversized::check(&self.meter, units) {
            return Err(QueueError::Oversized(oversized));
        }
        let (reply, answer) = oneshot::channel();
        let now = Instant::now();
        let id = {
            let mut state = self.lock();
            if state.waiters.len() >= self.max_depth {
                return Err(QueueError::Full {
                    depth: state.waiters.len(),
                    limited: limited.or_else(|| state.latest(now)),
                });
            }
            let id = state.next_id;
            state.next_id += 1;
            state.waiters.push_back(Waiter {
                id,
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
            id
        };
        let mut waiting = Waiting {
            queue: self,
            id,
            answer,
            answered: false,
        };
        // A closed channel means the dispatcher stopped for shutdown.
        let answer = (&mut waiting.answer).await;
        waiting.answered = true;
        answer.unwrap_or(Err(QueueError::ShuttingDown))
    }

    /// A call's request was dropped (its client hung up) while it waited: its entry leaves the
    /// queue now rather than when it reaches the head, and a ticket sent to it meanwhile is
    /// refunded, as that call never leaves the proxy.
    fn leave(&self, id: u64, answer: &mut oneshot::Receiver<Result<Ticket, QueueError>>) {
        {
            let mut state = self.lock();
            if let Some(at) = state.waiters.iter().position(|w| w.id == id) {
                state.waiters.remove(at);
                self.set_depth(state.waiters.len());
                return;
            }
        }
        answer.close();
        if let Ok(Ok(ticket)) = answer.try_recv() {
            self.meter.refund(ticket);
        }
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
            let (id, units, deadline) = {
                let mut state = self.lock();
                match state.waiters.front() {
                    Some(head) => (head.id, head.units, head.deadline),
                    None => {
                        state.dispatching = false;
                        break;
                    }
                }
            };
            let now = Instant::now();
            if now >= deadline {
                let (head, latest) = {
                    let mut state = self.lock();
                    (self.pop(&mut state, id), state.latest(now))
                };
                if let Some(w) = head {
                    let _ = w.reply.send(Err(QueueError::TimedOut {
                        waited: now - w.enqueued,
                        limited: w.limited.or(latest),
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
                    let head = self.pop(&mut self.lock(), id);
                    if let Some(w) = head {
                        if let Err(Ok(ticket)) = w.reply.send(Ok(ticket)) {
                            self.meter.refund(ticket); // the client left meanwhile
                        }
                    } else {
                        self.meter.refund(ticket);
                    }
                }
                Verdict::Limited(limited) => {
                    // A reload shrank a budget below this call since it queued.
                    if let Some(oversized) = Oversized::check(&self.meter, units) {
                        if let Some(w) = self.pop(&mut self.lock(), id) {
                            let _ = w.reply.send(Err(QueueError::Oversized(oversized)));
                        }
                        continue;
                    }
                    {
                        let mut state = self.lock();
                        state.last = Some((limited, now));
                        if let Some(head) = state.waiters.front_mut().filter(|h| h.id == id) {
                            head.limited = Some(limited);
                        }
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

    /// Takes the head if it is still call `id`: its client may have left since it was looked
    /// at, and the next call may be of another size.
    fn pop(&self, state: &mut State, id: u64) -> Option<Waiter> {
        if state.waiters.front()?.id != id {
            return None;
        }
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

/// A call in the queue, from its side: dropping it before its answer takes it out.
struct Waiting<'a> {
    queue: &'a WaitQueue,
    id: u64,
    answer: oneshot::Receiver<Result<Ticket, QueueError>>,
    /// The answer came: the entry left the queue when it was served.
    answered: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if !self.answered {
            self.queue.leave(self.id, &mut self.answer);
        }
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
        // Two calls fit when the first minute leaves the 2-minute window (once the minute 2
        // minutes after it has ended), the third one when the next quota slot frees: all
        // within the window length and a minute, and not before budget freed.
        let (_, first) = order[0];
        assert!(
            first - start <= Duration::from_secs(180),
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

    /// A call whose client hangs up while it waits (its `wait` future is dropped) must leave
    /// the queue: not count in the depth, and not take the place of a live call.
    #[tokio::test(start_paused = true)]
    async fn a_call_whose_client_left_frees_its_place_in_the_queue() {
        let (meter, q, _stop) = setup(1, "60m", 1, "10m");
        assert!(matches!(meter.decide(1), Verdict::Forward(_)));
        let abandoned = {
            let (q, l) = (q.clone(), limited_now(&meter));
            tokio::spawn(async move { q.wait(1, Some(l)).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(q.depth(), 1);
        abandoned.abort(); // the client hung up: the proxy drops the request's future
        let _ = abandoned.await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            q.depth(),
            0,
            "nobody waits, yet the queue reports a waiting call"
        );
        let live = {
            let (q, l) = (q.clone(), limited_now(&meter));
            tokio::spawn(async move { q.wait(1, Some(l)).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(
            !live.is_finished(),
            "a live call was refused by a queue holding only an abandoned call: {:?}",
            live.await
        );
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

    /// An exhausted org lets one probe through per interval. When the queue hands the probe to
    /// a call whose client hung up just then, the call is refunded (it never left the proxy),
    /// and the probe is given back: the next call goes in its place, rather than every call
    /// being refused for another whole interval with nothing in flight to end the exhaustion.
    #[tokio::test(start_paused = true)]
    async fn a_probe_refunded_to_a_client_that_left_is_given_back() {
        let (meter, q, _stop) = setup(1_000, "60m", 5, "10m");
        meter.org().observe_exhausted(); // the next probe in 5 minutes
        let limited = limited_now(&meter);
        assert_eq!(limited.budget, Budget::Exhausted);
        let mut waiting = Box::pin(q.wait(1, Some(limited)));
        assert!(futures_util::FutureExt::now_or_never(waiting.as_mut()).is_none());
        assert_eq!(q.depth(), 1);
        // The probe is due: the dispatcher takes it for the waiting call...
        tokio::time::sleep(Duration::from_secs(301)).await;
        assert_eq!(q.depth(), 0, "served");
        // ...whose client hung up before its request went on.
        drop(waiting);
        assert_eq!(
            meter.window_count(),
            0,
            "refunded: nothing reached Salesforce"
        );
        assert!(meter.org().is_exhausted());
        let next = meter.decide(1);
        assert!(matches!(next, Verdict::Forward(_)), "{next:?}");
    }

    /// A call that can never fit the integration's quota (a composite batch of 11 against a
    /// quota of 10) is refused on arrival: queued, it headed the queue for its whole
    /// `max_wait`, and every call behind it waited that long with the quota untouched.
    #[tokio::test(start_paused = true)]
    async fn a_call_larger_than_the_quota_is_refused_at_once_not_queued() {
        let (meter, q, _stop) = setup(10, "60m", 10, "10m");
        let l = match meter.decide(11) {
            Verdict::Limited(l) => l,
            Verdict::Forward(_) => panic!("11 > quota of 10"),
        };
        let start = Instant::now();
        let big = q.wait(11, Some(l)).await;
        match big {
            Err(QueueError::Oversized(o)) => {
                assert_eq!((o.units, o.budget, o.size), (11, Budget::Quota, 10));
                assert!(o.to_string().contains("can ever hold"), "{o}");
            }
            other => panic!("expected the batch refused as too large, got {other:?}"),
        }
        assert_eq!(Instant::now(), start, "refused without waiting");
        assert!(!q.is_busy());
        // The quota is untouched: a 1-call request goes at once.
        let small = q.wait(1, None).await;
        assert!(small.is_ok(), "{small:?}");
        assert_eq!(Instant::now(), start);
    }

    /// A call waiting at the head when a reload shrinks the quota below its size is refused
    /// then, rather than left to block the calls behind it until `max_wait`.
    #[tokio::test(start_paused = true)]
    async fn a_waiting_call_a_reload_makes_too_large_is_refused() {
        let (meter, q, _stop) = setup(10, "60m", 10, "10m");
        for _ in 0..8 {
            assert!(matches!(meter.decide(1), Verdict::Forward(_)));
        }
        let l = match meter.decide(5) {
            Verdict::Limited(l) => l,
            Verdict::Forward(_) => panic!("8 + 5 > quota of 10"),
        };
        let waiting = {
            let q = q.clone();
            tokio::spawn(async move { q.wait(5, Some(l)).await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(q.depth(), 1);
        let start = Instant::now();
        meter.set_budget(crate::meter::IntegrationBudget {
            quota: Some(crate::config::Amount::Calls(4)),
            ..Default::default()
        });
        let got = waiting.await.expect("task");
        assert!(
            matches!(got, Err(QueueError::Oversized(Oversized { size: 4, .. }))),
            "{got:?}"
        );
        assert!(Instant::now() - start < Duration::from_secs(1));
        assert_eq!(q.depth(), 0);
    }
}

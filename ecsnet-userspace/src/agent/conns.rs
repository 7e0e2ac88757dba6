//! The agent's listeners, bounded: every accepted connection holds one of a fixed number of
//! slots, waits for its request at most an idle timeout, and a connection that is only waiting
//! gives its slot up to a new one when all are taken; accept errors back off and are logged at
//! most once per interval. Nothing here runs for a listener the agent does not open.
//!
//! So a flood of idle connections (any local user can open them to the metrics port) costs the
//! agent at most `cap` descriptors per listener, never stops it answering, and never fills its
//! log: what it closed is counted (`stats --json`, `agent`) instead of logged one by one.

use std::{
    collections::BTreeMap,
    future::Future,
    io,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::Notify;

use crate::agent::stats::ListenerStats;

/// At most one log line per this interval for each kind of repeated failure.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);
/// First pause after a failed accept; it doubles on each failure in a row.
const BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest pause after failed accepts.
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The bounds of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Names the listener in log lines and counters: `metrics`, `control`.
    pub name: &'static str,
    /// Connections held at once.
    pub cap: usize,
    /// How long a connection may wait for its next request, or take to drain a reply.
    pub idle: Duration,
    /// Sent (without waiting) to a connection closed because every slot is busy.
    pub busy_reply: &'static [u8],
}

/// What a listener closed and what failed, since the agent started.
#[derive(Debug, Default)]
pub struct Counters {
    accept_errors: AtomicU64,
    over_cap: AtomicU64,
    evicted: AtomicU64,
    timed_out: AtomicU64,
}

impl Counters {
    pub fn snapshot(&self) -> ListenerStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ListenerStats {
            accept_errors: get(&self.accept_errors),
            over_cap: get(&self.over_cap),
            evicted: get(&self.evicted),
            timed_out: get(&self.timed_out),
        }
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Counts occurrences of one failure and says when a log line about them may be written.
#[derive(Debug)]
pub struct RateLimited {
    interval: Duration,
    last: Option<Instant>,
    pending: u64,
}

impl RateLimited {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: None,
            pending: 0,
        }
    }

    /// Counts one occurrence at `now`. Some(n) when a line may be written: n occurrences since
    /// the last line, this one included.
    pub fn hit_at(&mut self, now: Instant) -> Option<u64> {
        self.pending += 1;
        if self
            .last
            .is_some_and(|t| now.saturating_duration_since(t) < self.interval)
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.pending))
    }

    pub fn hit(&mut self) -> Option<u64> {
        self.hit_at(Instant::now())
    }
}

/// Pauses after failed accepts: doubling from `BACKOFF_MIN` to `BACKOFF_MAX`, reset by a
/// success. A listener that cannot accept (out of descriptors, memory) must not spin.
#[derive(Debug, Default)]
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn failed(&mut self) -> Duration {
        self.next = (self.next * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
        self.next
    }
    fn reset(&mut self) {
        self.next = Duration::ZERO;
    }
}

#[derive(Debug, Default)]
struct SlotTable {
    held: usize,
    next_seq: u64,
    /// Connections waiting for a request, oldest wait first: whom to close for a new one.
    waiting: BTreeMap<u64, Arc<Notify>>,
}

/// The slots of one listener.
#[derive(Debug)]
pub struct Slots {
    limits: Limits,
    counters: Arc<Counters>,
    table: Mutex<SlotTable>,
}

impl Slots {
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            counters: Arc::default(),
            table: Mutex::default(),
        })
    }

    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    fn table(&self) -> std::sync::MutexGuard<'_, SlotTable> {
        // The table is consistent after every statement; a panic elsewhere cannot break it.
        self.table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A slot for a new connection: a free one, else the one of the connection that has waited
    /// longest for a request (it is told to close). None when every slot is busy. The new
    /// connection waits for its first request from now on: a burst of connections accepted
    /// before their tasks run can be displaced like any other.
    pub fn take(self: &Arc<Self>) -> Option<Slot> {
        let mut t = self.table();
        if t.held < self.limits.cap {
            t.held += 1;
        } else {
            // The slot passes from the one closed to the new one: `held` stays.
            let (_, oldest) = t.waiting.pop_first()?;
            oldest.notify_one();
            bump(&self.counters.evicted);
        }
        let wake = Arc::new(Notify::new());
        let seq = t.next_seq;
        t.next_seq += 1;
        t.waiting.insert(seq, wake.clone());
        Some(Slot {
            slots: self.clone(),
            wake,
            waiting: Some(seq),
            evicted: false,
        })
    }

    /// Connections holding a slot.
    pub fn held(&self) -> usize {
        self.table().held
    }
}

/// One connection's slot; given back on drop.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<Slots>,
    wake: Arc<Notify>,
    /// Our key in `waiting` while we wait for a request.
    waiting: Option<u64>,
    /// Our slot went to a newer connection: close.
    evicted: bool,
}

impl Slot {
    /// Waits for `request` (the read of the next request) for at most the idle timeout, giving
    /// the slot up to a new connection if all are taken meanwhile. None: close the connection.
    pub async fn wait_for<F: Future>(&mut self, request: F) -> Option<F::Output> {
        if self.evicted {
            return None;
        }
        if self.waiting.is_none() {
            let mut t = self.slots.table();
            let seq = t.next_seq;
            t.next_seq += 1;
            t.waiting.insert(seq, self.wake.clone());
            self.waiting = Some(seq);
        }
        let idle = self.slots.limits.idle;
        let out = tokio::select! {
            biased;
            () = self.wake.notified() => None,
            r = tokio::time::timeout(idle, request) => self.in_time(r),
        };
        if !self.stop_waiting() {
            return None;
        }
        out
    }

    /// Runs `work` (writing a reply) for at most the idle timeout. None: it timed out, close.
    /// Called after `wait_for` returned a request, so the slot is no longer up for taking.
    pub async fn busy<F: Future>(&self, work: F) -> Option<F::Output> {
        self.in_time(tokio::time::timeout(self.slots.limits.idle, work).await)
    }

    /// What finished within the idle timeout; a timeout is counted.
    fn in_time<T>(&self, r: Result<T, tokio::time::error::Elapsed>) -> Option<T> {
        if r.is_err() {
            bump(&self.slots.counters.timed_out);
        }
        r.ok()
    }

    /// Leaves `waiting`; false when the slot was taken from us meanwhile.
    fn stop_waiting(&mut self) -> bool {
        if let Some(seq) = self.waiting.take()
            && self.slots.table().waiting.remove(&seq).is_none()
        {
            self.evicted = true;
        }
        !self.evicted
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.stop_waiting() {
            self.slots.table().held -= 1;
        }
    }
}

/// A listening socket whose connections `serve` bounds.
pub trait Listener: Send + 'static {
    type Stream: Send + 'static;
    fn accept(&self) -> impl Future<Output = io::Result<Self::Stream>> + Send;
    /// Writes what fits of `bytes` without waiting.
    fn try_send(stream: &Self::Stream, bytes: &[u8]);
}

/// `Listener` for tokio's listeners, whose `accept` also gives the peer's address.
macro_rules! tokio_listener {
    ($($listener:ident => $stream:ident),+) => {$(
        impl Listener for tokio::net::$listener {
            type Stream = tokio::net::$stream;
            async fn accept(&self) -> io::Result<Self::Stream> {
                tokio::net::$listener::accept(self).await.map(|(s, _)| s)
            }
            fn try_send(stream: &Self::Stream, bytes: &[u8]) {
                let _ = stream.try_write(bytes);
            }
        }
    )+};
}

tokio_listener!(TcpListener => TcpStream, UnixListener => UnixStream);

/// Accepts connections on `listener` forever, each handled by `handler` on a task of its own
/// with a slot of `slots`. Over the cap a connection is closed at once; a failed accept is
/// counted, pauses the loop (`Backoff`) and is logged at most once per `LOG_INTERVAL`.
pub async fn serve<L, H, F>(listener: L, slots: Arc<Slots>, handler: H)
where
    L: Listener,
    H: Fn(L::Stream, Slot) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let limits = slots.limits;
    let mut backoff = Backoff::default();
    let mut accept_log = RateLimited::new(LOG_INTERVAL);
    let mut closed_log = RateLimited::new(LOG_INTERVAL);
    loop {
        match listener.accept().await {
            Ok(stream) => {
                backoff.reset();
                let evicted = slots.counters.evicted.load(Ordering::Relaxed);
                if let Some(slot) = slots.take() {
                    tokio::spawn(handler(stream, slot));
                } else {
                    bump(&slots.counters.over_cap);
                    L::try_send(&stream, limits.busy_reply);
                }
                let crowded = slots.counters.evicted.load(Ordering::Relaxed) != evicted
                    || slots.held() >= limits.cap;
                if crowded && let Some(n) = closed_log.hit() {
                    log::warn!(
                        "{}: at its cap of {} connections, {n} new one(s) since the last report; \
                         the one waiting longest for a request, or the new one when none waits, \
                         is closed (counts: `ecsnet stats --json`, agent)",
                        limits.name,
                        limits.cap
                    );
                }
            }
            Err(e) => {
                bump(&slots.counters.accept_errors);
                let pause = backoff.failed();
                if let Some(n) = accept_log.hit() {
                    log::warn!(
                        "{}: accept failed {n} time(s) since the last report, last: {e}; \
                         retrying after pauses of up to {BACKOFF_MAX:?}",
                        limits.name
                    );
                }
                tokio::time::sleep(pause).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(cap: usize, idle_ms: u64) -> Limits {
        Limits {
            name: "test",
            cap,
            idle: Duration::from_millis(idle_ms),
            busy_reply: b"",
        }
    }

    #[test]
    fn one_line_per_interval_with_the_count_since_the_last() {
        let mut r = RateLimited::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(r.hit_at(t0), Some(1), "the first failure is reported");
        let mut lines = 0;
        for ms in 1..100_000u64 {
            if r.hit_at(t0 + Duration::from_millis(ms / 10)).is_some() {
                lines += 1;
            }
        }
        assert_eq!(lines, 0, "100k failures within 10 s: no other line");
        assert_eq!(
            r.hit_at(t0 + Duration::from_secs(10)),
            Some(100_000),
            "the next line counts every failure since the last"
        );
        assert_eq!(r.hit_at(t0 + Duration::from_secs(11)), None);
    }

    #[test]
    fn backoff_doubles_to_its_ceiling_and_resets() {
        let mut b = Backoff::default();
        let pauses: Vec<Duration> = (0..12).map(|_| b.failed()).collect();
        assert_eq!(pauses[0], BACKOFF_MIN);
        assert_eq!(pauses[1], BACKOFF_MIN * 2);
        assert_eq!(*pauses.last().unwrap(), BACKOFF_MAX);
        assert!(pauses.windows(2).all(|w| w[0] <= w[1]));
        b.reset();
        assert_eq!(b.failed(), BACKOFF_MIN);
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_new_connection_takes_the_slot_of_the_longest_waiting() {
        rt().block_on(async {
            let slots = Slots::new(limits(2, 60_000));
            let mut a = slots.take().expect("free slot");
            let mut b = slots.take().expect("free slot");
            let (tx_a, rx_a) = tokio::sync::oneshot::channel::<()>();
            let (_tx_b, rx_b) = tokio::sync::oneshot::channel::<()>();
            let wait_a = tokio::spawn(async move { (a.wait_for(rx_a).await, a) });
            tokio::task::yield_now().await;
            let wait_b = tokio::spawn(async move { (b.wait_for(rx_b).await, b) });
            tokio::task::yield_now().await;
            let c = slots
                .take()
                .expect("a waiting connection gives its slot up");
            let (got, a) = wait_a.await.unwrap();
            assert!(got.is_none(), "the longest waiting one is told to close");
            drop(tx_a);
            drop(a);
            assert_eq!(slots.held(), 2, "the closed one's slot went to the new one");
            assert_eq!(slots.counters.snapshot().evicted, 1);
            // b still waits, c is answered: a fourth takes b's slot; a fifth finds none.
            let mut c = c;
            assert_eq!(c.wait_for(async { 3 }).await, Some(3));
            let mut d = slots.take().expect("b's slot");
            let (got, b) = wait_b.await.unwrap();
            assert!(got.is_none());
            drop(b);
            assert_eq!(d.wait_for(async { 4 }).await, Some(4));
            assert!(
                slots.take().is_none(),
                "c and d are being answered: no slot"
            );
            assert_eq!(slots.held(), 2);
            drop((c, d));
            assert_eq!(slots.held(), 0);
        });
    }

    #[test]
    fn a_connection_not_yet_reading_can_be_displaced() {
        rt().block_on(async {
            let slots = Slots::new(limits(1, 60_000));
            let mut a = slots.take().expect("free slot");
            let b = slots.take().expect("a has not asked for anything yet");
            assert!(a.wait_for(async { 1 }).await.is_none(), "a was displaced");
            drop(a);
            assert_eq!(slots.held(), 1, "b holds the one slot");
            drop(b);
            assert_eq!(slots.held(), 0);
        });
    }

    #[test]
    fn waiting_ends_at_the_idle_timeout_and_an_answer_keeps_the_slot() {
        rt().block_on(async {
            let slots = Slots::new(limits(1, 50));
            let mut s = slots.take().unwrap();
            let start = Instant::now();
            let never = std::future::pending::<()>();
            assert!(s.wait_for(never).await.is_none());
            assert!(start.elapsed() >= Duration::from_millis(50));
            assert_eq!(slots.counters.snapshot().timed_out, 1);
            drop(s);
            let mut s = slots.take().unwrap();
            assert_eq!(s.wait_for(async { 7 }).await, Some(7));
            assert!(
                slots.take().is_none(),
                "a connection being answered keeps its slot"
            );
            assert_eq!(s.busy(async { 8 }).await, Some(8));
            assert!(
                s.busy(std::future::pending::<()>()).await.is_none(),
                "a reply that never drains times out"
            );
            assert_eq!(slots.counters.snapshot().timed_out, 2);
        });
    }

    /// A listener whose every accept fails as when the process is out of descriptors.
    struct Exhausted(Arc<AtomicU64>);

    impl Listener for Exhausted {
        type Stream = ();
        fn accept(&self) -> impl Future<Output = io::Result<()>> + Send {
            self.0.fetch_add(1, Ordering::Relaxed);
            async { Err(io::Error::from_raw_os_error(libc::EMFILE)) }
        }
        fn try_send((): &(), _: &[u8]) {}
    }

    #[test]
    fn failed_accepts_back_off_instead_of_spinning() {
        let calls = Arc::new(AtomicU64::new(0));
        let slots = Slots::new(limits(4, 1000));
        rt().block_on(async {
            let serving = serve(Exhausted(calls.clone()), slots.clone(), |(), _| async {});
            let _ = tokio::time::timeout(Duration::from_millis(1500), serving).await;
        });
        let n = calls.load(Ordering::Relaxed);
        // 10 + 20 + ... + 640 ms, then 1 s pauses: 8 or 9 tries in 1.5 s; a spin makes millions.
        assert!((5..=12).contains(&n), "{n} accepts in 1.5 s");
        assert_eq!(slots.counters.snapshot().accept_errors, n);
    }
}

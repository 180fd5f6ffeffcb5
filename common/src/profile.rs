//! Where a training step's time goes: opt-in wall-clock spans, summed by name.
//!
//! Every fused kernel of [`crate::kernels`] opens a span named after itself around its CPU work (the
//! backward kernels are separate ops, named `…-grad`), the GEMM calls inside the kernels open a `gemm`
//! span (nested inside their kernel's), and [`crate::train::Trainer::step`] opens `step/forward`,
//! `step/backward` and `step/optimizer` around its phases. What a phase holds beyond its kernels' spans is
//! candle's own work: its composite ops (embedding lookup, residual adds, pooling), and, in the backward
//! phase, autograd's bookkeeping (one zero-filled buffer and one addition per gradient it accumulates).
//! `fedsb-client bench --profile` prints the table.
//!
//! Off by default; when off a span costs one relaxed atomic load. Spans are only recorded on threads that
//! are not rayon workers, so work that a kernel fans out is counted once, in wall time.
use std::cell::Cell;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

static ENABLED: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<Vec<SpanTotal>> = Mutex::new(Vec::new());

/// Spans whose name starts with this are phases: the spans opened inside one are recorded under it.
pub const PHASE_PREFIX: &str = "step/";

thread_local! {
    static PHASE: Cell<&'static str> = const { Cell::new("") };
}

/// The summed time of every span of one name since the last [`take`].
#[derive(Clone, Debug, PartialEq)]
pub struct SpanTotal {
    /// The phase (a `step/…` span) open on the thread when the span was opened; empty outside any.
    pub phase: &'static str,
    /// The span's name (a kernel's op name, `gemm`, or a `step/…` phase).
    pub name: &'static str,
    /// Wall-clock seconds, summed over the spans.
    pub seconds: f64,
    /// How many spans were closed.
    pub calls: u64,
}

/// Turns recording on or off (process-wide).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether spans are being recorded.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// An open span: its time is added to its name's total when it is dropped.
#[must_use = "a span measures until it is dropped"]
pub struct Span {
    phase: &'static str,
    name: &'static str,
    start: Instant,
    /// The phase to restore on drop (phases only).
    outer: Option<&'static str>,
}

/// Opens a span named `name`, or nothing when recording is off or this is a rayon worker thread.
pub fn span(name: &'static str) -> Option<Span> {
    if !enabled() || rayon::current_thread_index().is_some() {
        return None;
    }
    let phase = PHASE.with(|p| p.get());
    let outer = name.starts_with(PHASE_PREFIX).then(|| PHASE.with(|p| p.replace(name)));
    Some(Span { phase, name, start: Instant::now(), outer })
}

impl Drop for Span {
    fn drop(&mut self) {
        let s = self.start.elapsed().as_secs_f64();
        if let Some(outer) = self.outer {
            PHASE.with(|p| p.set(outer));
        }
        let mut t = TOTALS.lock().unwrap_or_else(|p| p.into_inner());
        match t.iter_mut().find(|x| x.name == self.name && x.phase == self.phase) {
            Some(x) => {
                x.seconds += s;
                x.calls += 1;
            }
            None => t.push(SpanTotal { phase: self.phase, name: self.name, seconds: s, calls: 1 }),
        }
    }
}

/// The totals recorded since the last call, largest first; the record is emptied.
pub fn take() -> Vec<SpanTotal> {
    let mut t = std::mem::take(&mut *TOTALS.lock().unwrap_or_else(|p| p.into_inner()));
    t.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_sum_by_name_only_while_enabled() {
        // The only test that toggles the global switch; kernels of tests running meanwhile may add their own
        // names, so only these four are checked.
        take();
        drop(span("off"));
        set_enabled(true);
        for _ in 0..3 {
            let _s = span("a");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        {
            let _phase = span("step/x");
            drop(span("b"));
        }
        drop(span("b"));
        set_enabled(false);
        drop(span("after"));
        let t = take();
        let get = |n: &str| t.iter().find(|x| x.name == n && x.phase.is_empty());
        let a = get("a").expect("span a recorded");
        assert_eq!(a.calls, 3);
        assert!(a.seconds >= 0.006, "{a:?}");
        assert_eq!(get("b").map(|x| x.calls), Some(1));
        let inner = t.iter().find(|x| x.name == "b" && x.phase == "step/x").expect("b inside the phase");
        assert_eq!(inner.calls, 1);
        assert_eq!(get("step/x").map(|x| x.calls), Some(1));
        assert!(get("off").is_none() && get("after").is_none(), "{t:?}");
        assert!(t.windows(2).all(|w| w[0].seconds >= w[1].seconds), "largest first");
    }
}

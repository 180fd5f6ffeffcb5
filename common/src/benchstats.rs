//! Figures benchmarks report: the process's peak resident set size (Linux `VmHWM`, resettable) and medians.

/// Peak resident set size of this process in MiB (Linux `VmHWM`; NaN where unavailable).
pub fn peak_rss_mib() -> f64 {
    proc_status_kib("VmHWM:").map_or(f64::NAN, |kib| kib / 1024.0)
}

/// Current resident set size of this process in MiB (Linux `VmRSS`; NaN where unavailable).
pub fn rss_mib() -> f64 {
    proc_status_kib("VmRSS:").map_or(f64::NAN, |kib| kib / 1024.0)
}

fn proc_status_kib(key: &str) -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines().find(|l| l.starts_with(key))?.split_whitespace().nth(1)?.parse::<f64>().ok()
}

/// Resets the kernel's peak-RSS counter of this process to the current RSS (Linux: `echo 5 >
/// /proc/self/clear_refs`), so a later [`peak_rss_mib`] measures one phase. Returns whether it worked.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Returns the allocator's free pages to the OS (glibc's `malloc_trim(0)`, which releases free memory anywhere in
/// the heap, not only at its top). Loading a model frees many tensor-sized temporaries between the weights it
/// keeps; the client's allocator settings never trim on their own (see `fedsb-client`'s `tune_malloc`), so
/// without this they would stay resident. A no-op off glibc.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of the allocator's own heaps.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The median of `v` (sorted in place; NaN when empty).
pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { 0.5 * (v[n / 2 - 1] + v[n / 2]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&mut []).is_nan());
    }

    #[test]
    fn peak_rss_is_at_least_the_current_rss() {
        if cfg!(target_os = "linux") {
            let (peak, now) = (peak_rss_mib(), rss_mib());
            assert!(peak >= now * 0.99 && now > 0.0, "peak {peak} now {now}");
        }
    }
}

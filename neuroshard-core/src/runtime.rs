//! Process-wide compute settings that must be fixed before the first tensor operation.
//!
//! candle sizes its CPU thread pools from `RAYON_NUM_THREADS` / `CANDLE_NUM_THREADS`. Left unset,
//! it re-reads `/proc/cpuinfo` on every f32/f16 matmul (~28 µs, hundreds of times per token), and
//! its spin-waiting pool collapses when more threads than idle cores are asked for. So the thread
//! count is chosen once, deliberately, here (see DESIGN.md, "Verified facts and traps").

use std::sync::OnceLock;

static THREADS: OnceLock<usize> = OnceLock::new();
/// The available core count when busy cores made [`init_threads`] choose fewer threads.
static LOWERED_FROM: OnceLock<usize> = OnceLock::new();

/// Sets the compute thread count for this process (first call wins) and returns it.
///
/// `requested` overrides; otherwise an existing `RAYON_NUM_THREADS` is honoured; otherwise the
/// number of cores that are idle now ([`idle_cores`], at most the available cores, at least
/// one): a spin-waiting pool with a thread on a busy core runs at a fraction of one thread's
/// speed, so asking for fewer threads than cores is the safe side. Call it before any other
/// candle work (the CLI does so first thing); [`crate::ShardEngine::load`] calls it too.
pub fn init_threads(requested: Option<usize>) -> usize {
    *THREADS.get_or_init(|| {
        let from_env = std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n > 0);
        let n = requested
            .filter(|&n| n > 0)
            .or(from_env)
            .unwrap_or_else(|| {
                let available = std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1);
                let n = match idle_cores(std::time::Duration::from_millis(60)) {
                    Some(idle) => threads_for_idle(available, idle),
                    None => available,
                };
                if n < available {
                    let _ = LOWERED_FROM.set(available);
                }
                n
            });
        // Setting the environment is only sound while no other thread reads it; this runs once,
        // at start-up, before candle or tokio spawn threads in the programs we ship.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
        n
    })
}

/// How many cores were idle over `window`, from two readings of `/proc/stat` (Linux); `None`
/// where the platform does not report it.
pub fn idle_cores(window: std::time::Duration) -> Option<f64> {
    let read = || {
        std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| cpu_times(&s))
    };
    let (idle0, total0) = read()?;
    std::thread::sleep(window);
    let (idle1, total1) = read()?;
    let cores = std::thread::available_parallelism().ok()?.get() as f64;
    let total = total1.checked_sub(total0)?;
    if total == 0 {
        return None;
    }
    Some(cores * idle1.saturating_sub(idle0) as f64 / total as f64)
}

/// `(idle, total)` jiffies of the aggregate `cpu` line of `/proc/stat` (idle includes iowait).
pub fn cpu_times(proc_stat: &str) -> Option<(u64, u64)> {
    let line = proc_stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    if fields.len() < 4 {
        return None;
    }
    let idle = fields[3] + fields.get(4).copied().unwrap_or(0);
    // guest and guest_nice (fields 8, 9) are already counted in user and nice.
    let total = fields.iter().take(8).sum();
    Some((idle, total))
}

/// Threads for `available` cores of which `idle` are idle: a core counts when it is at least
/// three quarters idle; never more than `available`, never fewer than one.
pub fn threads_for_idle(available: usize, idle: f64) -> usize {
    ((idle + 0.25).floor().max(1.0) as usize).min(available.max(1))
}

/// When [`init_threads`] chose fewer threads than cores because some were busy: the number
/// of available cores (the CLI says so, since the user may want `--threads`).
pub fn lowered_from() -> Option<usize> {
    LOWERED_FROM.get().copied()
}

/// The thread count chosen by [`init_threads`], if it ran.
pub fn threads() -> Option<usize> {
    THREADS.get().copied()
}

/// Peak resident memory of this process in bytes (Linux `VmHWM`), if the platform reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_cores_lower_the_default_thread_count() {
        assert_eq!(threads_for_idle(2, 2.0), 2);
        assert_eq!(threads_for_idle(2, 1.8), 2, "a mostly idle core counts");
        assert_eq!(threads_for_idle(2, 1.1), 1, "one core busy: one thread");
        assert_eq!(threads_for_idle(2, 0.1), 1, "never fewer than one");
        assert_eq!(threads_for_idle(4, 9.0), 4, "never more than available");
        assert_eq!(threads_for_idle(0, 0.0), 1);
    }

    #[test]
    fn proc_stat_cpu_line_is_parsed() {
        let stat = "cpu  100 5 50 800 20 1 2 3 0 0\ncpu0 50 2 25 400 10 0 1 1 0 0\nintr 1 2\n";
        assert_eq!(cpu_times(stat), Some((820, 981)));
        assert_eq!(cpu_times("cpu0 1 2 3 4\n"), None, "no aggregate line");
        assert_eq!(cpu_times("cpu  1 x 3 4\n"), None, "garbage");
        assert_eq!(cpu_times("cpu  1 2\n"), None, "too short");
    }

    #[test]
    fn idle_cores_reads_this_machine() {
        if let Some(idle) = idle_cores(std::time::Duration::from_millis(20)) {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
            assert!((0.0..=cores + 1e-9).contains(&idle), "{idle} of {cores}");
        }
    }
}

//! Process-wide compute settings that must be fixed before the first tensor operation.
//!
//! candle sizes its CPU thread pools from `RAYON_NUM_THREADS` / `CANDLE_NUM_THREADS`. Left unset,
//! it re-reads `/proc/cpuinfo` on every f32/f16 matmul (~28 µs, hundreds of times per token), and
//! its spin-waiting pool collapses when more threads than idle cores are asked for. So the thread
//! count is chosen once, deliberately, here (see DESIGN.md, "Verified facts and traps").

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

static THREADS: OnceLock<usize> = OnceLock::new();
/// Whether the block kernels spread work over the whole thread pool (see [`spread_work`]).
static SPREAD: AtomicBool = AtomicBool::new(true);
/// Set once [`spread_work`] has turned false (the CLI reports it).
static NARROWED: AtomicBool = AtomicBool::new(false);
/// The available core count when busy cores made [`init`] choose fewer threads.
static LOWERED_FROM: OnceLock<usize> = OnceLock::new();

/// Process-wide compute settings, applied once by [`init`].
///
/// A library load path never changes these: the host program (the CLI, `neuroshard/__init__.py`
/// before the native import, `ns_init` in C, or a Rust `main`) calls [`init`] once at start-up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuntimeConfig {
    /// Compute threads. `None`: an existing `RAYON_NUM_THREADS`, else the cores idle now
    /// (measured over 60 ms, see [`idle_cores`]).
    pub threads: Option<usize>,
    /// Start the busy-core watcher behind [`spread_work`] (a thread that reads `/proc` every
    /// half second). Off by default; the CLI turns it on when it chose the thread count itself.
    pub watch_busy_cores: bool,
}

/// What [`init`] settled on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuntimeInfo {
    /// Compute threads of the process.
    pub threads: usize,
    /// `Some(cores)` when busy cores made the default lower than the available core count.
    pub lowered_from: Option<usize>,
    /// Whether this call was the first (later calls return the first call's settings).
    pub first: bool,
}

/// Fixes the compute thread count for this process (the first call wins) and returns it.
///
/// candle sizes its pools from `RAYON_NUM_THREADS` / `CANDLE_NUM_THREADS` and re-reads
/// `/proc/cpuinfo` on every f32 matmul while they are unset, so this sets both when they do not
/// already hold the chosen count. Setting the environment is only sound while no other thread
/// reads it: call this at start-up, before starting threads. Engines, nodes and swarms never
/// call it; without it they still work, with candle's defaults.
pub fn init(config: &RuntimeConfig) -> RuntimeInfo {
    let mut first = false;
    let threads = *THREADS.get_or_init(|| {
        first = true;
        let from_env = std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n > 0);
        let chosen_here = config.threads.filter(|&n| n > 0).or(from_env).is_none();
        let n = config
            .threads
            .filter(|&n| n > 0)
            .or(from_env)
            .unwrap_or_else(|| {
                let available = available_cores();
                let n = match idle_cores(Duration::from_millis(60)) {
                    Some(idle) => threads_for_idle(available, idle),
                    None => available,
                };
                if n < available {
                    let _ = LOWERED_FROM.set(available);
                }
                n
            });
        // The watcher only makes sense where a default count could turn out wrong later.
        if config.watch_busy_cores && chosen_here && n > 1 {
            start_core_watch(available_cores());
        }
        let value = n.to_string();
        for var in ["RAYON_NUM_THREADS", "CANDLE_NUM_THREADS"] {
            if std::env::var(var).ok().as_deref() != Some(value.as_str()) {
                std::env::set_var(var, &value);
            }
        }
        n
    });
    RuntimeInfo {
        threads,
        lowered_from: LOWERED_FROM.get().copied(),
        first,
    }
}

/// Cores this process may run on.
fn available_cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// How many cores were idle over `window`, from two readings of `/proc/stat` (Linux); `None`
/// where the platform does not report it.
pub fn idle_cores(window: Duration) -> Option<f64> {
    let (idle0, total0) = machine_times()?;
    std::thread::sleep(window);
    let (idle1, total1) = machine_times()?;
    let cores = std::thread::available_parallelism().ok()?.get() as f64;
    let total = total1.checked_sub(total0)?;
    if total == 0 {
        return None;
    }
    Some(cores * idle1.saturating_sub(idle0) as f64 / total as f64)
}

/// [`cpu_times`] of this machine now.
fn machine_times() -> Option<(u64, u64)> {
    cpu_times(&std::fs::read_to_string("/proc/stat").ok()?)
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

/// Whether the block kernels and attention should spread their work over the whole thread
/// pool now. It turns false while other programs keep a core busy (checked every half second
/// when [`init`] chose the thread count itself and the watcher was asked for): a pool thread on a busy core makes
/// every parallel step wait for it, and one thread on the free core is faster. The results are
/// bit-identical either way (the same rows, the same arithmetic, in one thread or several).
pub fn spread_work() -> bool {
    SPREAD.load(Ordering::Relaxed)
}

/// Whether [`spread_work`] has been false at some point since start-up.
pub fn work_was_narrowed() -> bool {
    NARROWED.load(Ordering::Relaxed)
}

/// Starts the background check behind [`spread_work`] (once, from [`init`]; a no-op where
/// `/proc` is missing or `NEUROSHARD_CORE_WATCH=off`).
fn start_core_watch(cores: usize) {
    if std::env::var("NEUROSHARD_CORE_WATCH").is_ok_and(|v| v == "off") {
        return;
    }
    let Some(mut last) = CpuSample::read() else {
        return;
    };
    let spawned = std::thread::Builder::new()
        .name("neuroshard-core-watch".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_millis(500));
            let Some(now) = CpuSample::read() else {
                // No more readings: leave the kernels spreading rather than stuck on one thread.
                SPREAD.store(true, Ordering::Relaxed);
                return;
            };
            if let Some(others) = others_busy_cores(&last, &now, cores) {
                let spread = next_spread(SPREAD.load(Ordering::Relaxed), others);
                SPREAD.store(spread, Ordering::Relaxed);
                if !spread {
                    NARROWED.store(true, Ordering::Relaxed);
                }
            }
            last = now;
        });
    // Without the thread the kernels simply keep spreading, as before.
    drop(spawned);
}

/// Clock ticks from `/proc/stat` (whole machine) and `/proc/self/stat` (this process, every
/// thread), read together.
#[derive(Debug, Clone, Copy, PartialEq)]
struct CpuSample {
    idle: u64,
    total: u64,
    ours: u64,
}

impl CpuSample {
    fn read() -> Option<Self> {
        let (idle, total) = machine_times()?;
        let ours = process_ticks(&std::fs::read_to_string("/proc/self/stat").ok()?)?;
        Some(CpuSample { idle, total, ours })
    }
}

/// `utime + stime` of a `/proc/<pid>/stat` line, in clock ticks (the unit of `/proc/stat`).
fn process_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, utime field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Cores kept busy by everything but this process between two samples (steal time counts:
/// a core the hypervisor gives away is not ours either).
fn others_busy_cores(before: &CpuSample, after: &CpuSample, cores: usize) -> Option<f64> {
    let total = after.total.checked_sub(before.total)?;
    if total == 0 || cores == 0 {
        return None;
    }
    let idle = after.idle.saturating_sub(before.idle);
    let ours = after.ours.saturating_sub(before.ours);
    let others = total.saturating_sub(idle).saturating_sub(ours);
    Some(cores as f64 * others as f64 / total as f64)
}

/// Stop spreading when others keep more than 0.6 of a core busy; start again below 0.3 (the
/// gap keeps a fluctuating load from flipping the choice every check).
fn next_spread(spread: bool, others_busy: f64) -> bool {
    if spread {
        others_busy <= 0.6
    } else {
        others_busy < 0.3
    }
}

/// The thread count chosen by [`init`], if it ran.
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
    fn other_programs_load_is_measured_without_our_own() {
        let stat = "4242 (neuro shard) (x)) R 1 2 3 4 5 6 7 8 9 10 250 40 0 0 20 0 3 0 99\n";
        assert_eq!(
            process_ticks(stat),
            Some(290),
            "utime + stime after the last ')'"
        );
        assert_eq!(process_ticks("12 (x) R 1 2"), None, "truncated");
        let at = |idle, total, ours| CpuSample { idle, total, ours };
        // 2 cores over 200 ticks: 20 idle, we used 100, others 80 = 0.8 of a core.
        let others = others_busy_cores(&at(0, 0, 0), &at(20, 200, 100), 2).expect("busy");
        assert!((others - 0.8).abs() < 1e-9, "{others}");
        // Only we ran: nothing busy elsewhere.
        assert_eq!(
            others_busy_cores(&at(0, 0, 0), &at(0, 200, 200), 2),
            Some(0.0)
        );
        assert_eq!(
            others_busy_cores(&at(5, 9, 0), &at(5, 9, 0), 2),
            None,
            "no time passed"
        );
        // Hysteresis.
        assert!(next_spread(true, 0.5));
        assert!(!next_spread(true, 0.8));
        assert!(!next_spread(false, 0.45), "stays off until clearly free");
        assert!(next_spread(false, 0.1));
    }

    #[test]
    fn this_process_ticks_are_readable() {
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            assert!(process_ticks(&stat).is_some(), "{stat}");
        }
    }

    #[test]
    fn idle_cores_reads_this_machine() {
        if let Some(idle) = idle_cores(std::time::Duration::from_millis(20)) {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
            assert!((0.0..=cores + 1e-9).contains(&idle), "{idle} of {cores}");
        }
    }
}

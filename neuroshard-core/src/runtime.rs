//! Process-wide compute settings that must be fixed before the first tensor operation.
//!
//! candle sizes its CPU thread pools from `RAYON_NUM_THREADS` / `CANDLE_NUM_THREADS`. Left unset,
//! it re-reads `/proc/cpuinfo` on every f32/f16 matmul (~28 µs, hundreds of times per token), and
//! its spin-waiting pool collapses when more threads than idle cores are asked for. So the thread
//! count is chosen once, deliberately, here (see DESIGN.md, "Verified facts and traps").

use std::sync::OnceLock;

static THREADS: OnceLock<usize> = OnceLock::new();

/// Sets the compute thread count for this process (first call wins) and returns it.
///
/// `requested` overrides; otherwise an existing `RAYON_NUM_THREADS` is honoured; otherwise the
/// number of available cores. Call it before any other candle work (the CLI does so first
/// thing); [`crate::ShardEngine::load`] calls it too.
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
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            });
        // Setting the environment is only sound while no other thread reads it; this runs once,
        // at start-up, before candle or tokio spawn threads in the programs we ship.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
        n
    })
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

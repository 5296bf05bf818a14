//! The server's counters, written as Prometheus text (`GET /metrics`).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// A latency histogram with fixed buckets (seconds).
#[derive(Debug)]
pub(crate) struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub(crate) fn observe(&self, value: Duration) {
        let secs = value.as_secs_f64();
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            if secs <= *bound {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_us
            .fetch_add(value.as_micros() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn write(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let sep = if labels.is_empty() { "" } else { "," };
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {}",
                count.load(Ordering::Relaxed)
            );
        }
        let total = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {total}");
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(
            out,
            "{name}_sum{braces} {}",
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{braces} {total}");
    }
}

/// Buckets for per-token and per-hop times.
const STEP_BUCKETS: &[f64] = &[0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0];
/// Buckets for whole requests and first tokens.
const REQUEST_BUCKETS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// One hop's last node counters (compute µs, steps) and its per-step histogram.
type HopSeries = ((u64, u64), Histogram);

/// Everything `/metrics` reports.
#[derive(Debug)]
pub(crate) struct Metrics {
    /// Requests by (endpoint, status code).
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    pub(crate) prompt_tokens: AtomicU64,
    pub(crate) cached_prompt_tokens: AtomicU64,
    pub(crate) completion_tokens: AtomicU64,
    pub(crate) generations_active: AtomicU64,
    pub(crate) sessions_opened: AtomicU64,
    pub(crate) conversations_reused: AtomicU64,
    pub(crate) failovers: AtomicU64,
    pub(crate) disconnects: AtomicU64,
    pub(crate) time_to_first_token: Histogram,
    pub(crate) token_interval: Histogram,
    pub(crate) request_duration: Histogram,
    /// Per hop: its node's last (compute µs, steps) and the compute time per step between
    /// looks (one look after each generation).
    hop_step: Mutex<BTreeMap<String, HopSeries>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::default(),
            prompt_tokens: AtomicU64::new(0),
            cached_prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            generations_active: AtomicU64::new(0),
            sessions_opened: AtomicU64::new(0),
            conversations_reused: AtomicU64::new(0),
            failovers: AtomicU64::new(0),
            disconnects: AtomicU64::new(0),
            time_to_first_token: Histogram::new(REQUEST_BUCKETS),
            token_interval: Histogram::new(STEP_BUCKETS),
            request_duration: Histogram::new(REQUEST_BUCKETS),
            hop_step: Mutex::default(),
        }
    }
}

impl Metrics {
    /// Counts one answered request.
    pub(crate) fn request(&self, endpoint: &'static str, status: u16) {
        *crate::net::lock(&self.requests)
            .entry((endpoint, status))
            .or_default() += 1;
    }

    /// Takes a hop's node counters (`hop`: its node id and layers, as labels): the compute
    /// time per step since the last look at that hop is one observation.
    pub(crate) fn hop_counters(&self, hop: String, compute_us: u64, steps: u64) {
        let mut hops = crate::net::lock(&self.hop_step);
        let (last, histogram) = hops
            .entry(hop)
            .or_insert_with(|| ((0, 0), Histogram::new(STEP_BUCKETS)));
        let (d_us, d_steps) = (
            compute_us.saturating_sub(last.0),
            steps.saturating_sub(last.1),
        );
        if let Some(per_step) = d_us.checked_div(d_steps) {
            histogram.observe(Duration::from_micros(per_step));
        }
        *last = (compute_us, steps);
    }

    /// The Prometheus text exposition; `kept` is the number of kept conversations.
    pub(crate) fn render(&self, kept: usize) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP neuroshard_requests_total HTTP requests answered, by endpoint and status.\n\
             # TYPE neuroshard_requests_total counter"
        );
        for ((endpoint, code), n) in crate::net::lock(&self.requests).iter() {
            let _ = writeln!(
                out,
                "neuroshard_requests_total{{endpoint=\"{endpoint}\",code=\"{code}\"}} {n}"
            );
        }
        let counters = [
            (
                "neuroshard_prompt_tokens_total",
                "Prompt tokens of generation requests.",
                &self.prompt_tokens,
            ),
            (
                "neuroshard_cached_prompt_tokens_total",
                "Prompt tokens reused from a kept conversation (not computed again).",
                &self.cached_prompt_tokens,
            ),
            (
                "neuroshard_completion_tokens_total",
                "Tokens generated.",
                &self.completion_tokens,
            ),
            (
                "neuroshard_sessions_opened_total",
                "Swarm sessions opened.",
                &self.sessions_opened,
            ),
            (
                "neuroshard_conversations_reused_total",
                "Requests served on a kept conversation's session.",
                &self.conversations_reused,
            ),
            (
                "neuroshard_failovers_total",
                "Routes re-planned after a node failed mid-generation.",
                &self.failovers,
            ),
            (
                "neuroshard_disconnects_total",
                "Generations stopped because the client went away.",
                &self.disconnects,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP neuroshard_generations_active Generations running now.\n\
             # TYPE neuroshard_generations_active gauge\n\
             neuroshard_generations_active {}",
            self.generations_active.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP neuroshard_conversations_kept Swarm sessions kept open for prefix reuse.\n\
             # TYPE neuroshard_conversations_kept gauge\n\
             neuroshard_conversations_kept {kept}"
        );
        self.time_to_first_token.write(
            &mut out,
            "neuroshard_time_to_first_token_seconds",
            "From the request to its first generated text.",
            "",
        );
        self.token_interval.write(
            &mut out,
            "neuroshard_token_interval_seconds",
            "Between consecutive pieces of generated text, as the server sees them.",
            "",
        );
        self.request_duration.write(
            &mut out,
            "neuroshard_request_duration_seconds",
            "Whole generation requests.",
            "",
        );
        let hops = crate::net::lock(&self.hop_step);
        let mut first = true;
        for (labels, (_, histogram)) in hops.iter() {
            let mut text = String::new();
            histogram.write(
                &mut text,
                "neuroshard_hop_step_seconds",
                "Compute time per step of each hop of the routes used (node counters after each generation).",
                labels,
            );
            if !first {
                // One HELP/TYPE header per metric family.
                text = text.lines().skip(2).map(|l| format!("{l}\n")).collect();
            }
            first = false;
            out.push_str(&text);
        }
        out
    }
}

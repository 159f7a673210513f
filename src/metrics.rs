//! Prometheus metrics: plain atomic counters on the request path (in this
//! process, or in the shared-memory file so that every worker of a host
//! counts into the same numbers), turned into the text exposition at scrape
//! time by `prometheus-client`.

use std::any::Any;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::pool::{KeyPool, KeyState, Reason};
use crate::ratelimit::{LimitKind, RateLimits};

/// A run of counters: in this process, or in a shared mapping.
pub(crate) enum Block {
    Local(Box<[AtomicU64]>),
    Shared {
        ptr: NonNull<AtomicU64>,
        len: usize,
        _owner: Arc<dyn Any + Send + Sync>,
    },
}

// SAFETY: a shared block is atomics in a mapping its owner keeps alive.
unsafe impl Send for Block {}
unsafe impl Sync for Block {}

impl Block {
    pub fn local(len: usize) -> Self {
        Block::Local((0..len).map(|_| AtomicU64::new(0)).collect())
    }

    fn slots(&self) -> &[AtomicU64] {
        match self {
            Block::Local(slots) => slots,
            // SAFETY: `len` atomics at `ptr`, alive as long as `_owner`.
            Block::Shared { ptr, len, .. } => unsafe {
                std::slice::from_raw_parts(ptr.as_ptr(), *len)
            },
        }
    }

    pub fn add(&self, index: usize, n: u64) {
        if let Some(slot) = self.slots().get(index) {
            slot.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub fn set(&self, index: usize, value: u64) {
        if let Some(slot) = self.slots().get(index) {
            slot.store(value, Ordering::Relaxed);
        }
    }

    pub fn get(&self, index: usize) -> u64 {
        self.slots()
            .get(index)
            .map_or(0, |slot| slot.load(Ordering::Relaxed))
    }
}

/// Why keys changed state, in the order of their counters.
pub const REASONS: [Reason; 8] = [
    Reason::RateLimited,
    Reason::QuotaExhausted,
    Reason::Revoked,
    Reason::Reset,
    Reason::Manual,
    Reason::Depleted,
    Reason::GroupRateLimited,
    Reason::Unreachable,
];
/// Room kept for reasons to come (the layout is shared between processes).
const REASON_SLOTS: usize = 8;
/// The status codes counted one by one; any other counts as "other".
pub const CODES: [u16; 24] = [
    200, 201, 202, 204, 301, 302, 304, 307, 400, 401, 402, 403, 404, 405, 408, 409, 413, 422, 429,
    500, 502, 503, 504, 529,
];
/// Where a key's latest rate-limit values are kept: per limit kind, the
/// limit and what remains, each stored plus one (0: not heard of).
const LIMITS: usize = REASON_SLOTS + CODES.len() + 1;
/// A key's last error: its status and when (Unix ms).
const LAST_ERROR: usize = LIMITS + 2 * LimitKind::ALL.len();
/// Requests that failed over from a key.
const FAILOVERS: usize = LAST_ERROR + 2;
/// When (the pool's clock, plus one) a key last said it had no requests left.
const RAN_OUT: usize = FAILOVERS + 1;
/// A key's counters: transitions by reason, responses by code, then its
/// latest rate-limit values and last error (gauges, kept with them so that
/// workers share them), then its failovers and when it last ran out.
pub const KEY_COUNTERS: usize = RAN_OUT + 1;

/// How a request ended, for `keyfailover_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Upstream answered and it was relayed (any status).
    Ok,
    ExhaustedRateLimited,
    ExhaustedAuth,
    UpstreamUnreachable,
    UpstreamTimeout,
    /// The body broke after the head was relayed.
    StreamBroken,
    /// Sent with the caller's own key.
    Byok,
    /// Refused by the proxy (client token, body too large, a refused method or path).
    Rejected,
}

impl Outcome {
    pub const ALL: [Outcome; 8] = [
        Outcome::Ok,
        Outcome::ExhaustedRateLimited,
        Outcome::ExhaustedAuth,
        Outcome::UpstreamUnreachable,
        Outcome::UpstreamTimeout,
        Outcome::StreamBroken,
        Outcome::Byok,
        Outcome::Rejected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::ExhaustedRateLimited => "exhausted_rate_limited",
            Outcome::ExhaustedAuth => "exhausted_auth",
            Outcome::UpstreamUnreachable => "upstream_unreachable",
            Outcome::UpstreamTimeout => "upstream_timeout",
            Outcome::StreamBroken => "stream_broken",
            Outcome::Byok => "byok",
            Outcome::Rejected => "rejected",
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|o| *o == self).unwrap_or(0)
    }
}

/// Buckets of `keyfailover_request_attempts`: 1 to 8 attempts, then more.
const ATTEMPT_BUCKETS: usize = 9;
/// Upper bounds (seconds) of `keyfailover_upstream_duration_seconds`.
pub const DURATION_BOUNDS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

// A pool's counters: outcomes, then the attempts histogram (buckets, sum,
// count), then the duration histogram (buckets with +Inf, sum in µs, count).
const OUTCOMES: usize = 0;
const ATTEMPTS: usize = OUTCOMES + 8;
const ATTEMPTS_SUM: usize = ATTEMPTS + ATTEMPT_BUCKETS;
const ATTEMPTS_COUNT: usize = ATTEMPTS_SUM + 1;
const DURATION: usize = ATTEMPTS_COUNT + 1;
const DURATION_SUM: usize = DURATION + DURATION_BOUNDS.len() + 1;
const DURATION_COUNT: usize = DURATION_SUM + 1;
/// A pool's counters in all.
pub const POOL_COUNTERS: usize = DURATION_COUNT + 1;

/// Whether requests are counted: always, unless the environment says
/// `KEYFAILOVER_METRICS=off` when the process first counts. That is for
/// measuring what counting costs (`make bench` compares the two); with it
/// off, the request counts, the histograms and the dashboard's rates stay 0,
/// while key states, transitions and rate-limit values are kept as ever.
fn counting() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("KEYFAILOVER_METRICS").map_or(true, |v| v != "off"))
}

/// The counters of one key.
pub(crate) struct KeyCounters(pub Block);

impl KeyCounters {
    pub fn transition(&self, reason: Reason) {
        if let Some(i) = REASONS.iter().position(|r| *r == reason) {
            self.0.add(i, 1);
        }
    }

    /// Every response a key got, for its counts and its last error.
    pub fn response(&self, status: u16) {
        if !counting() {
            return;
        }
        if status >= 400 {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            self.0.set(LAST_ERROR, u64::from(status));
            self.0.set(LAST_ERROR + 1, now);
        }
        self.count_response(status);
    }

    /// A request failed over from the key (it answered with a key-specific
    /// failure).
    pub fn failover(&self) {
        if counting() {
            self.0.add(FAILOVERS, 1);
        }
    }

    pub fn failovers(&self) -> u64 {
        self.0.get(FAILOVERS)
    }

    /// The status and time (Unix ms) of the key's last error answer.
    pub fn last_error(&self) -> Option<(u16, u64)> {
        let status = u16::try_from(self.0.get(LAST_ERROR))
            .ok()
            .filter(|s| *s != 0)?;
        Some((status, self.0.get(LAST_ERROR + 1)))
    }

    /// Responses by code so far: (total, and the transitions by reason).
    pub fn totals(&self) -> (u64, Vec<(Reason, u64)>) {
        let responses = (0..=CODES.len())
            .map(|i| self.0.get(REASON_SLOTS + i))
            .sum();
        let transitions = REASONS
            .iter()
            .enumerate()
            .map(|(i, r)| (*r, self.0.get(i)))
            .collect();
        (responses, transitions)
    }

    fn count_response(&self, status: u16) {
        let i = CODES
            .iter()
            .position(|c| *c == status)
            .unwrap_or(CODES.len());
        self.0.add(REASON_SLOTS + i, 1);
    }

    /// Keeps the latest values a response reported (a few stores; no lock).
    pub fn observe(&self, limits: &RateLimits) {
        for kind in LimitKind::ALL {
            let limit = limits.get(kind);
            if let Some(n) = limit.limit {
                self.0.set(LIMITS + 2 * kind.index(), n.saturating_add(1));
            }
            if let Some(n) = limit.remaining {
                self.0
                    .set(LIMITS + 2 * kind.index() + 1, n.saturating_add(1));
            }
        }
    }

    /// The latest (limit, remaining) of a kind, where known.
    pub fn limit(&self, kind: LimitKind) -> (Option<u64>, Option<u64>) {
        let read = |i: usize| self.0.get(i).checked_sub(1);
        (
            read(LIMITS + 2 * kind.index()),
            read(LIMITS + 2 * kind.index() + 1),
        )
    }

    /// Notes that the key said, at `now` (the pool's clock), that it had no
    /// requests left.
    pub fn ran_out(&self, now: u64) {
        self.0.set(RAN_OUT, now.saturating_add(1));
    }

    /// The share of the request limit expected left, for a key that is
    /// available now: the latest remaining less the `in_flight` requests
    /// (sent since it was reported, mostly), so that concurrent walks do not
    /// all start at the key that answered last. 1.0 when not heard of.
    /// When the latest answer had none left: 1.0 if the key has cooled down
    /// since (`cooled_until`, its latest cooldown's end, is after that
    /// answer), as it waited out its reset or its 429; else 0.0, last (an
    /// upstream that says none is left but not when more will be).
    pub fn headroom(&self, in_flight: u32, cooled_until: u64) -> f64 {
        match self.limit(LimitKind::Requests) {
            (_, Some(0)) if cooled_until >= self.0.get(RAN_OUT) => 1.0,
            (_, Some(0)) => 0.0,
            (Some(limit), Some(remaining)) if limit > 0 => {
                (remaining as f64 - f64::from(in_flight)) / limit as f64
            }
            _ => 1.0,
        }
    }
}

/// The counters of one pool.
pub(crate) struct PoolCounters(pub Block);

impl PoolCounters {
    pub fn outcome(&self, outcome: Outcome) {
        if !counting() {
            return;
        }
        self.0.add(OUTCOMES + outcome.index(), 1);
    }

    /// Requests so far, by outcome.
    pub fn outcomes(&self) -> Vec<(Outcome, u64)> {
        Outcome::ALL
            .iter()
            .map(|o| (*o, self.0.get(OUTCOMES + o.index())))
            .collect()
    }

    pub fn attempts(&self, attempts: u32) {
        if !counting() {
            return;
        }
        let bucket = (attempts.max(1) as usize - 1).min(ATTEMPT_BUCKETS - 1);
        self.0.add(ATTEMPTS + bucket, 1);
        self.0.add(ATTEMPTS_SUM, u64::from(attempts));
        self.0.add(ATTEMPTS_COUNT, 1);
    }

    /// Attempts made so far and the requests they were made for.
    pub fn attempt_totals(&self) -> (u64, u64) {
        (self.0.get(ATTEMPTS_SUM), self.0.get(ATTEMPTS_COUNT))
    }

    pub fn upstream_duration(&self, took: Duration) {
        if !counting() {
            return;
        }
        let seconds = took.as_secs_f64();
        let bucket = DURATION_BOUNDS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(DURATION_BOUNDS.len());
        self.0.add(DURATION + bucket, 1);
        self.0.add(
            DURATION_SUM,
            u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
        );
        self.0.add(DURATION_COUNT, 1);
    }
}

/// The metric families of one pool, served under the name `pool`.
#[derive(Debug)]
struct PoolCollector {
    pool: KeyPool,
    name: String,
}

type Labels = Vec<(&'static str, String)>;

fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    series: Vec<(Labels, M)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in series {
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for PoolCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let pool_label = || vec![("pool", self.name.clone())];
        let key_labels = |label: &str| vec![("pool", self.name.clone()), ("key", label.to_owned())];
        let snapshot = self.pool.snapshot();
        let health = self.pool.health();
        let states = [
            (KeyState::Valid, health.valid),
            (KeyState::Temporary, health.temporary),
            (KeyState::Permanent, health.permanent),
        ];
        family(
            &mut encoder,
            "keyfailover_keys",
            "Keys of the pool in each state.",
            MetricType::Gauge,
            states
                .iter()
                .map(|(state, n)| {
                    let mut labels = pool_label();
                    labels.push(("state", state.as_str().to_owned()));
                    (labels, ConstGauge::new(*n as i64))
                })
                .collect(),
        )?;
        family(
            &mut encoder,
            "keyfailover_key_state",
            "1 for each key's current state, 0 for the others (group: its group, if any).",
            MetricType::Gauge,
            snapshot
                .iter()
                .flat_map(|key| {
                    states.iter().map(move |(state, _)| {
                        let mut labels = key_labels(&key.label);
                        labels.push(("group", key.group.clone().unwrap_or_default()));
                        labels.push(("state", state.as_str().to_owned()));
                        (labels, ConstGauge::new(i64::from(key.state == *state)))
                    })
                })
                .collect(),
        )?;
        family(
            &mut encoder,
            "keyfailover_key_cooldown_seconds",
            "Seconds until a cooling key is valid again (0 otherwise).",
            MetricType::Gauge,
            snapshot
                .iter()
                .map(|key| {
                    (
                        key_labels(&key.label),
                        ConstGauge::new(key.cooldown_remaining.as_secs_f64()),
                    )
                })
                .collect(),
        )?;
        let keys = self.pool.keys();
        family(
            &mut encoder,
            "keyfailover_key_remaining",
            "What each key has left of each limit, from the latest rate-limit headers.",
            MetricType::Gauge,
            keys.iter()
                .flat_map(|key| {
                    LimitKind::ALL.iter().filter_map(move |kind| {
                        let (_, remaining) = key.counters().limit(*kind);
                        remaining.map(|n| {
                            let mut labels = key_labels(key.label());
                            labels.push(("limit", kind.as_str().to_owned()));
                            (
                                labels,
                                ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX)),
                            )
                        })
                    })
                })
                .collect(),
        )?;
        family(
            &mut encoder,
            "keyfailover_key_transitions",
            "Key state changes, by reason.",
            MetricType::Counter,
            keys.iter()
                .flat_map(|key| {
                    let counters = key.counters();
                    REASONS.iter().enumerate().map(move |(i, reason)| {
                        let mut labels = key_labels(key.label());
                        labels.push(("reason", reason.as_str().to_owned()));
                        (labels, ConstCounter::new(counters.0.get(i)))
                    })
                })
                .collect(),
        )?;
        family(
            &mut encoder,
            "keyfailover_upstream_responses",
            "Upstream responses, by key and status code (\"other\": codes not counted one by one).",
            MetricType::Counter,
            keys.iter()
                .flat_map(|key| {
                    let counters = key.counters();
                    let codes = CODES
                        .iter()
                        .map(|c| c.to_string())
                        .chain(["other".to_owned()]);
                    codes.enumerate().filter_map(move |(i, code)| {
                        let n = counters.0.get(REASON_SLOTS + i);
                        (n > 0).then(|| {
                            let mut labels = key_labels(key.label());
                            labels.push(("code", code));
                            (labels, ConstCounter::new(n))
                        })
                    })
                })
                .collect(),
        )?;
        let counters = self.pool.counters();
        family(
            &mut encoder,
            "keyfailover_requests",
            "Requests, by how they ended.",
            MetricType::Counter,
            Outcome::ALL
                .iter()
                .map(|outcome| {
                    let mut labels = pool_label();
                    labels.push(("outcome", outcome.as_str().to_owned()));
                    (
                        labels,
                        ConstCounter::new(counters.0.get(OUTCOMES + outcome.index())),
                    )
                })
                .collect(),
        )?;
        let block = &counters.0;
        // Per-bucket counts: the encoder makes them cumulative.
        let buckets = |start: usize, bounds: &[f64]| -> Vec<(f64, u64)> {
            bounds
                .iter()
                .copied()
                .chain([f64::INFINITY])
                .enumerate()
                .map(|(i, bound)| (bound, block.get(start + i)))
                .collect()
        };
        let attempt_bounds: Vec<f64> = (1..ATTEMPT_BUCKETS).map(|n| n as f64).collect();
        let mut metric = encoder.encode_descriptor(
            "keyfailover_request_attempts",
            "Upstream attempts per request.",
            None,
            MetricType::Histogram,
        )?;
        metric
            .encode_family(&pool_label())?
            .encode_histogram::<Labels>(
                block.get(ATTEMPTS_SUM) as f64,
                block.get(ATTEMPTS_COUNT),
                &buckets(ATTEMPTS, &attempt_bounds),
                None,
            )?;
        let mut metric = encoder.encode_descriptor(
            "keyfailover_upstream_duration_seconds",
            "Time from sending an attempt to its response head.",
            None,
            MetricType::Histogram,
        )?;
        metric
            .encode_family(&pool_label())?
            .encode_histogram::<Labels>(
                block.get(DURATION_SUM) as f64 / 1e6,
                block.get(DURATION_COUNT),
                &buckets(DURATION, &DURATION_BOUNDS),
                None,
            )?;
        Ok(())
    }
}

/// The Prometheus text exposition (format 0.0.4) of `pool`'s metrics, with
/// `name` as the `pool` label.
pub fn exposition(pool: &KeyPool, name: &str) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(PoolCollector {
        pool: pool.clone(),
        name: name.to_owned(),
    }));
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
    out
}

/// One exposition of several pools (`(pool, name)`): each family once,
/// with every pool's series under it.
pub fn exposition_of(pools: &[(&KeyPool, &str)]) -> String {
    let texts: Vec<String> = pools
        .iter()
        .map(|(pool, name)| exposition(pool, name))
        .collect();
    merge_expositions(&texts)
}

/// Merges expositions with the same families in the same order: the
/// descriptor lines (`# HELP`, `# TYPE`, `# UNIT`) of each family once, then
/// the samples of every exposition, then one `# EOF` if they had it.
fn merge_expositions(texts: &[String]) -> String {
    use std::collections::HashMap;
    // Per family: the exposition its descriptors come from, them, the samples.
    let mut families: Vec<(&str, usize, Vec<&str>, Vec<&str>)> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    let mut eof = false;
    for (source, text) in texts.iter().enumerate() {
        let mut current = None;
        for line in text.lines() {
            if line == "# EOF" {
                eof = true;
                continue;
            }
            let descriptor = ["# HELP ", "# TYPE ", "# UNIT "]
                .iter()
                .find_map(|p| line.strip_prefix(p));
            match descriptor {
                Some(rest) => {
                    let name = rest.split(' ').next().unwrap_or_default();
                    let at = *index.entry(name).or_insert_with(|| {
                        families.push((name, source, Vec::new(), Vec::new()));
                        families.len() - 1
                    });
                    if families[at].1 == source {
                        families[at].2.push(line);
                    }
                    current = Some(at);
                }
                None => {
                    if let Some(at) = current {
                        families[at].3.push(line);
                    }
                }
            }
        }
    }
    let mut out = String::new();
    for (_, _, descriptors, samples) in &families {
        for line in descriptors.iter().chain(samples) {
            out.push_str(line);
            out.push('\n');
        }
    }
    if eof {
        out.push_str("# EOF\n");
    }
    out
}

/// The content type of [`exposition`].
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expositions_merge_into_one_family_each() {
        let a = "# HELP x_total Things.\n# TYPE x_total counter\nx_total{pool=\"a\"} 1\n\
                 # HELP y Other.\n# TYPE y gauge\n# EOF\n";
        let b = "# HELP x_total Things.\n# TYPE x_total counter\nx_total{pool=\"b\"} 2\n\
                 # HELP y Other.\n# TYPE y gauge\ny{pool=\"b\"} 3\n# EOF\n";
        assert_eq!(
            merge_expositions(&[a.to_owned(), b.to_owned()]),
            "# HELP x_total Things.\n# TYPE x_total counter\nx_total{pool=\"a\"} 1\n\
             x_total{pool=\"b\"} 2\n# HELP y Other.\n# TYPE y gauge\ny{pool=\"b\"} 3\n# EOF\n"
        );
    }
}

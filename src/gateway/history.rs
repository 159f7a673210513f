//! What the dashboard shows over time. Every second a sampler reads the
//! pool's counters and key states (shared by a host's workers with shm
//! state) and keeps ten minutes of samples; the per-key counts of the last
//! minute, the rate chart and the timeline of key transitions are all
//! differences between samples, so the page shows the same whichever worker
//! serves it, and from the moment it opens.

use std::collections::VecDeque;
use std::time::Duration;

use serde_json::{json, Value};

use crate::failover::FailoverClient;
use crate::metrics::{Outcome, REASONS};
use crate::pool::KeyState;

/// How often the sampler reads the pool.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// How far back samples are kept (seconds).
const KEEP: f64 = 600.0;
/// Transitions kept for the timeline.
const TIMELINE: usize = 100;
/// The width of one point of the rate chart (seconds).
const BUCKET: f64 = 10.0;

/// One key at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct KeySample {
    pub label: String,
    pub hint: String,
    pub state: KeyState,
    /// Answers the key got so far.
    pub responses: u64,
    /// Requests that failed over from the key so far.
    pub failovers: u64,
    /// Transitions so far, by reason, in the order of [`REASONS`].
    pub transitions: Vec<u64>,
}

/// The pool at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Unix seconds.
    pub at: f64,
    /// Requests answered so far (refusals by the proxy aside).
    pub requests: u64,
    /// Failovers so far: attempts beyond each request's first.
    pub failovers: u64,
    pub keys: Vec<KeySample>,
}

impl Sample {
    pub fn read(client: &FailoverClient, at: f64) -> Self {
        let pool = client.pool();
        let counters = pool.counters();
        let requests = counters
            .outcomes()
            .iter()
            .filter(|(outcome, _)| *outcome != Outcome::Rejected)
            .map(|(_, n)| n)
            .sum();
        let (attempts, counted) = counters.attempt_totals();
        let keys = pool
            .keys()
            .iter()
            .map(|key| {
                let counters = key.counters();
                let (responses, transitions) = counters.totals();
                KeySample {
                    label: key.label().to_owned(),
                    hint: key.hint().to_owned(),
                    state: key.status().state,
                    responses,
                    failovers: counters.failovers(),
                    transitions: transitions.iter().map(|(_, n)| *n).collect(),
                }
            })
            .collect();
        Self {
            at,
            requests,
            failovers: attempts.saturating_sub(counted),
            keys,
        }
    }
}

/// A change of one key seen between two samples.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub at: f64,
    pub label: String,
    pub hint: String,
    /// The state the key is in now ("removed" when it left the pool).
    pub state: &'static str,
    /// Why: the reasons of the transitions counted in between, or "added",
    /// "removed", "cooldown over".
    pub reasons: Vec<&'static str>,
}

/// Ten minutes of samples and the changes seen between them.
#[derive(Debug, Default)]
pub struct History {
    samples: VecDeque<Sample>,
    timeline: VecDeque<Change>,
}

impl History {
    pub fn push(&mut self, sample: Sample) {
        if let Some(last) = self.samples.back() {
            if sample.at < last.at {
                // The clock went back: start over rather than show nonsense.
                self.samples.clear();
            } else {
                for change in changes(last, &sample) {
                    if self.timeline.len() == TIMELINE {
                        self.timeline.pop_front();
                    }
                    self.timeline.push_back(change);
                }
            }
        }
        let oldest = sample.at - KEEP;
        self.samples.push_back(sample);
        while self.samples.front().is_some_and(|s| s.at < oldest) {
            self.samples.pop_front();
        }
    }

    pub fn latest(&self) -> Option<&Sample> {
        self.samples.back()
    }

    /// The oldest sample at most `seconds` older than the latest.
    fn since(&self, seconds: f64) -> Option<&Sample> {
        let latest = self.samples.back()?;
        self.samples.iter().find(|s| s.at >= latest.at - seconds)
    }

    /// A key's answers and failovers over the last minute (or since the
    /// first sample, when there is less than a minute of them).
    pub fn last_minute(&self, label: &str) -> Option<(u64, u64)> {
        let find = |s: &Sample| s.keys.iter().find(|k| k.label == label).cloned();
        let now = find(self.latest()?)?;
        let then = self
            .samples
            .iter()
            .filter(|s| s.at >= self.latest().map_or(0.0, |l| l.at) - 60.0)
            .find_map(find)?;
        Some((
            now.responses.saturating_sub(then.responses),
            now.failovers.saturating_sub(then.failovers),
        ))
    }

    /// Requests and failovers per second, in 10-second buckets, oldest first.
    pub fn rates(&self) -> Vec<Value> {
        let (Some(first), Some(latest)) = (self.since(KEEP), self.latest()) else {
            return Vec::new();
        };
        let mut points = Vec::new();
        let mut start = first;
        for sample in &self.samples {
            if sample.at - start.at >= BUCKET || std::ptr::eq(sample, latest) {
                let seconds = sample.at - start.at;
                if seconds > 0.0 {
                    let rate = |a: u64, b: u64| round(a.saturating_sub(b) as f64 / seconds);
                    points.push(json!({
                        "at": sample.at,
                        "requests": rate(sample.requests, start.requests),
                        "failovers": rate(sample.failovers, start.failovers),
                    }));
                }
                start = sample;
            }
        }
        points
    }

    /// The latest changes, newest first.
    pub fn timeline(&self, at_most: usize) -> Vec<Value> {
        self.timeline
            .iter()
            .rev()
            .take(at_most)
            .map(|c| {
                json!({
                    "at": c.at,
                    "label": c.label,
                    "hint": c.hint,
                    "state": c.state,
                    "reasons": c.reasons,
                })
            })
            .collect()
    }
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// What changed between two samples, key by key (matched by label).
fn changes(before: &Sample, after: &Sample) -> Vec<Change> {
    let mut found = Vec::new();
    for key in &after.keys {
        let change = |state: &'static str, reasons: Vec<&'static str>| Change {
            at: after.at,
            label: key.label.clone(),
            hint: key.hint.clone(),
            state,
            reasons,
        };
        match before.keys.iter().find(|k| k.label == key.label) {
            None => found.push(change(key.state.as_str(), vec!["added"])),
            Some(was) => {
                let mut reasons: Vec<&'static str> = REASONS
                    .iter()
                    .zip(key.transitions.iter().zip(&was.transitions))
                    .filter(|(_, (now, then))| now > then)
                    .map(|(reason, _)| reason.as_str())
                    .collect();
                if reasons.is_empty() && was.state != key.state {
                    reasons.push(if key.state == KeyState::Valid {
                        "cooldown over"
                    } else {
                        "elsewhere"
                    });
                }
                if !reasons.is_empty() {
                    found.push(change(key.state.as_str(), reasons));
                }
            }
        }
    }
    for was in &before.keys {
        if !after.keys.iter().any(|k| k.label == was.label) {
            found.push(Change {
                at: after.at,
                label: was.label.clone(),
                hint: was.hint.clone(),
                state: "removed",
                reasons: vec!["removed"],
            });
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(label: &str, state: KeyState, responses: u64, failovers: u64, rl: u64) -> KeySample {
        let mut transitions = vec![0; REASONS.len()];
        transitions[0] = rl;
        KeySample {
            label: label.into(),
            hint: format!("sk-...{label}"),
            state,
            responses,
            failovers,
            transitions,
        }
    }

    fn sample(at: f64, requests: u64, failovers: u64, keys: Vec<KeySample>) -> Sample {
        Sample {
            at,
            requests,
            failovers,
            keys,
        }
    }

    #[test]
    fn transitions_between_samples_make_the_timeline() {
        let mut h = History::default();
        h.push(sample(0.0, 0, 0, vec![key("a", KeyState::Valid, 0, 0, 0)]));
        h.push(sample(
            1.0,
            1,
            1,
            vec![key("a", KeyState::Temporary, 1, 1, 1)],
        ));
        // Nothing counted, but the cooldown ran out.
        h.push(sample(2.0, 1, 1, vec![key("a", KeyState::Valid, 1, 1, 1)]));
        // A reload: a out, b in.
        h.push(sample(3.0, 1, 1, vec![key("b", KeyState::Valid, 0, 0, 0)]));
        let timeline = h.timeline(10);
        let seen: Vec<(&str, &str, &str)> = timeline
            .iter()
            .map(|c| {
                (
                    c["label"].as_str().unwrap(),
                    c["state"].as_str().unwrap(),
                    c["reasons"][0].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("a", "removed", "removed"),
                ("b", "valid", "added"),
                ("a", "valid", "cooldown over"),
                ("a", "temporary", "rate_limited"),
            ]
        );
    }

    #[test]
    fn a_cooldown_and_reset_inside_one_second_still_shows() {
        let mut h = History::default();
        h.push(sample(0.0, 0, 0, vec![key("a", KeyState::Valid, 0, 0, 0)]));
        h.push(sample(1.0, 1, 1, vec![key("a", KeyState::Valid, 1, 1, 1)]));
        assert_eq!(h.timeline(10)[0]["reasons"], json!(["rate_limited"]));
    }

    #[test]
    fn last_minute_counts_and_rates() {
        let mut h = History::default();
        for s in 0..=120u64 {
            // Two answers a second, one failover every other second.
            let k = key("a", KeyState::Valid, 2 * s, s / 2, 0);
            h.push(sample(s as f64, 2 * s, s / 2, vec![k]));
        }
        assert_eq!(h.last_minute("a"), Some((120, 30)));
        assert_eq!(h.last_minute("nobody"), None);
        let rates = h.rates();
        assert_eq!(rates.len(), 12);
        assert_eq!(rates[0]["requests"], json!(2.0));
        assert_eq!(rates[0]["failovers"], json!(0.5));
    }

    #[test]
    fn old_samples_go() {
        let mut h = History::default();
        for s in 0..1000u64 {
            h.push(sample(s as f64, s, 0, vec![]));
        }
        assert!(h.samples.len() <= 601);
        assert_eq!(h.since(KEEP).unwrap().at, 399.0);
        // The clock going back starts over.
        h.push(sample(5.0, 0, 0, vec![]));
        assert_eq!(h.samples.len(), 1);
    }
}

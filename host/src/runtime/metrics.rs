//! The counters and histograms a filter defines through the contract's
//! `metrics` import, kept per filter (so one filter's names never collide
//! with another's) and bounded: a name or label that breaks the rules, or a
//! series past [`MAX_SERIES`], is dropped and counted, never an error the
//! filter must handle.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Most series (name and label values) one filter may define.
pub const MAX_SERIES: usize = 256;
/// Most labels on one series.
pub const MAX_LABELS: usize = 4;
/// Longest metric or label name.
pub const MAX_NAME: usize = 64;
/// Longest label value.
pub const MAX_LABEL_VALUE: usize = 64;

/// The upper bounds of histogram buckets (the last bucket is `+Inf`):
/// from a millisecond to a day, for latencies and greylisting delays alike.
pub const BUCKETS: [f64; 14] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 86_400.0];

/// One series' value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetricValue {
    /// A counter's total.
    Counter(u64),
    /// A histogram: how many, their sum and the count per bucket of
    /// [`BUCKETS`] (not cumulative; the last is above the last bound).
    Histogram {
        /// Observations.
        count: u64,
        /// Their sum.
        sum: f64,
        /// Observations per bucket ([`BUCKETS`], then `+Inf`).
        buckets: Vec<u64>,
    },
}

/// A series and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricSample {
    /// The metric's name.
    pub name: String,
    /// Its labels, sorted by name.
    pub labels: Vec<(String, String)>,
    /// Its value.
    pub value: MetricValue,
}

/// A metric's series: sorted label sets (each sorted by name) and values.
type Series = Vec<(Vec<(String, String)>, MetricValue)>;

/// The metrics of one filter.
#[derive(Debug, Default)]
pub struct FilterMetrics {
    /// Series by metric name. Keyed by name alone so that an update of an
    /// existing series (nearly every one) looks it up by `&str` and a
    /// binary search over a few label sets, allocating nothing.
    series: Mutex<BTreeMap<String, Series>>,
    dropped: AtomicU64,
}

fn valid_name(n: &str) -> bool {
    let b = n.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_NAME
        && b[0].is_ascii_lowercase()
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_')
}

fn valid_value(v: &str) -> bool {
    v.len() <= MAX_LABEL_VALUE && v.chars().all(|c| !c.is_control())
}

/// A label set in canonical form: sorted by name, the first of a
/// duplicated name kept; borrowed from the caller (at most [`MAX_LABELS`]).
struct Canonical<'a> {
    labels: [(&'a str, &'a str); MAX_LABELS],
    len: usize,
}

impl<'a> Canonical<'a> {
    fn as_slice(&self) -> &[(&'a str, &'a str)] {
        &self.labels[..self.len]
    }

    /// How a stored label set orders against this one (as the stored
    /// `Vec<(String, String)>`s order among themselves).
    fn cmp_stored(&self, stored: &[(String, String)]) -> std::cmp::Ordering {
        stored.iter().map(|(k, v)| (k.as_str(), v.as_str())).cmp(self.as_slice().iter().copied())
    }

    fn to_owned(&self) -> Vec<(String, String)> {
        self.as_slice().iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }
}

impl FilterMetrics {
    /// The labels in canonical form, or `None` (counted as dropped) if
    /// there are more than [`MAX_LABELS`]. The names and values are checked
    /// by [`Self::update`] only when a series is created or a label was
    /// given twice: an update of an existing series otherwise matched a
    /// checked set exactly.
    fn labels<'a>(&self, labels: &[(&'a str, &'a str)]) -> Option<Canonical<'a>> {
        if labels.len() > MAX_LABELS {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let mut c = Canonical { labels: [("", ""); MAX_LABELS], len: 0 };
        c.labels[..labels.len()].copy_from_slice(labels);
        c.labels[..labels.len()].sort_by(|a, b| a.0.cmp(b.0));
        // Stable sort: the first of a duplicated name stays first and is kept.
        for i in 0..labels.len() {
            if c.len == 0 || c.labels[c.len - 1].0 != c.labels[i].0 {
                c.labels[c.len] = c.labels[i];
                c.len += 1;
            }
        }
        Some(c)
    }

    /// Applies `f` to the series `name{labels}`, created with `new` if it
    /// is not there yet and `name` and every one of `given` (the labels as
    /// the filter gave them) keep the rules, and the series limit allows.
    fn update(
        &self,
        name: &str,
        given: &[(&str, &str)],
        labels: &Canonical<'_>,
        new: impl FnOnce() -> MetricValue,
        f: impl FnOnce(&mut MetricValue) -> bool,
    ) {
        // A map insert or update cannot be left half-done: the data is
        // whole even if another thread panicked holding the lock.
        let mut map = self.series.lock().unwrap_or_else(|p| p.into_inner());
        let valid = || valid_name(name) && given.iter().all(|(k, v)| valid_name(k) && valid_value(v));
        let ok = if let Some(series) = map.get_mut(name)
            && let Ok(i) = series.binary_search_by(|(l, _)| labels.cmp_stored(l))
            // The set matched was checked; a duplicated label dropped from
            // it was not, and must keep the rules too.
            && (given.len() == labels.len || valid())
        {
            f(&mut series[i].1)
        } else if !valid() {
            false
        } else if map.values().map(Vec::len).sum::<usize>() >= MAX_SERIES {
            // A new series (rare: counted only then) past the limit.
            false
        } else {
            let mut v = new();
            let ok = f(&mut v);
            if ok {
                let series = map.entry(name.to_string()).or_default();
                let i = series.binary_search_by(|(l, _)| labels.cmp_stored(l)).unwrap_or_else(|i| i);
                series.insert(i, (labels.to_owned(), v));
            }
            ok
        };
        if !ok {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Adds `value` to the counter `name{labels}`.
    pub fn counter_add(&self, name: &str, labels: &[(&str, &str)], value: u64) {
        let Some(canonical) = self.labels(labels) else { return };
        self.update(
            name,
            labels,
            &canonical,
            || MetricValue::Counter(0),
            |v| match v {
                MetricValue::Counter(n) => {
                    *n = n.saturating_add(value);
                    true
                }
                // The name is a histogram already.
                MetricValue::Histogram { .. } => false,
            },
        );
    }

    /// Records `value` in the histogram `name{labels}`.
    pub fn observe(&self, name: &str, labels: &[(&str, &str)], value: f64) {
        if !value.is_finite() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let Some(canonical) = self.labels(labels) else { return };
        self.update(
            name,
            labels,
            &canonical,
            || MetricValue::Histogram { count: 0, sum: 0.0, buckets: vec![0; BUCKETS.len() + 1] },
            |v| match v {
                MetricValue::Histogram { count, sum, buckets } => {
                    *count += 1;
                    *sum += value;
                    let i = BUCKETS.iter().position(|b| value <= *b).unwrap_or(BUCKETS.len());
                    buckets[i] += 1;
                    true
                }
                MetricValue::Counter(_) => false,
            },
        );
    }

    /// Every series, by name and labels.
    pub fn snapshot(&self) -> Vec<MetricSample> {
        let map = self.series.lock().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .flat_map(|(name, series)| {
                series.iter().map(|(labels, value)| MetricSample { name: name.clone(), labels: labels.clone(), value: value.clone() })
            })
            .collect()
    }

    /// Counts an update dropped before it reached [`Self::counter_add`] or
    /// [`Self::observe`] (e.g. more than [`MAX_LABELS`] labels).
    pub fn count_dropped(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// Updates dropped for breaking a rule or the series limit.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl MetricSample {
    /// `name{a="b"} value` (histograms as `count=… sum=…`), for `greyhook status`.
    pub fn render(&self) -> String {
        let labels = if self.labels.is_empty() {
            String::new()
        } else {
            format!("{{{}}}", self.labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect::<Vec<_>>().join(","))
        };
        match &self.value {
            MetricValue::Counter(n) => format!("{}{labels} {n}", self.name),
            MetricValue::Histogram { count, sum, .. } => format!("{}{labels} count={count} sum={sum}", self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_are_bounded_and_bad_names_dropped() {
        let m = FilterMetrics::default();
        m.counter_add("greylisted", &[("phase", "rcpt")], 2);
        m.counter_add("greylisted", &[("phase", "rcpt")], 3);
        m.observe("delay_seconds", &[], 300.0);
        m.counter_add("Bad-Name", &[], 1);
        m.counter_add("delay_seconds", &[], 1); // a histogram already
        m.observe("x", &[], f64::NAN);
        let s = m.snapshot();
        assert_eq!(s.len(), 2);
        assert_eq!(s[1].render(), "greylisted{phase=\"rcpt\"} 5");
        assert_eq!(s[0].render(), "delay_seconds count=1 sum=300");
        assert_eq!(m.dropped(), 3);
        // A label given twice counts the first, and both must keep the
        // rules, for an existing series too.
        m.counter_add("greylisted", &[("phase", "rcpt"), ("phase", "bad\n")], 1);
        m.counter_add("greylisted", &[("phase", "rcpt"), ("phase", "data")], 1);
        assert_eq!(m.snapshot()[1].render(), "greylisted{phase=\"rcpt\"} 6");
        assert_eq!(m.dropped(), 4);
        for i in 0..(MAX_SERIES + 10) {
            m.counter_add("many", &[("i", &i.to_string())], 1);
        }
        assert_eq!(m.snapshot().len(), MAX_SERIES);
        assert_eq!(m.dropped(), 4 + 12);
    }
}

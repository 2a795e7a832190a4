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

/// A metric's series: sorted label sets (each sorted by name), each with
/// the index of its value in [`Table::values`].
type Series = Vec<(Vec<(String, String)>, usize)>;

/// What the lock guards: the series by name, and their values by handle.
#[derive(Debug, Default)]
struct Table {
    /// Series by metric name. Keyed by name alone so that an update of an
    /// existing series (nearly every one) looks it up by `&str` and a
    /// binary search over a few label sets, allocating nothing.
    by_name: BTreeMap<String, Series>,
    /// Every series' value, in the order the series were created; the
    /// index is the series' handle ([`FilterMetrics::define`]) and never
    /// changes (series are never removed).
    values: Vec<MetricValue>,
}

/// A metric's kind, for [`FilterMetrics::define`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// A counter.
    Counter,
    /// A histogram.
    Histogram,
}

impl MetricKind {
    fn new_value(self) -> MetricValue {
        match self {
            MetricKind::Counter => MetricValue::Counter(0),
            MetricKind::Histogram => MetricValue::Histogram { count: 0, sum: 0.0, buckets: vec![0; BUCKETS.len() + 1] },
        }
    }

    fn of(v: &MetricValue) -> MetricKind {
        match v {
            MetricValue::Counter(_) => MetricKind::Counter,
            MetricValue::Histogram { .. } => MetricKind::Histogram,
        }
    }
}

/// The metrics of one filter.
#[derive(Debug, Default)]
pub struct FilterMetrics {
    table: Mutex<Table>,
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

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // An insert or update cannot be left half-done: the data is whole
        // even if another thread panicked holding the lock.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The handle of the series `name{labels}` of `kind`, created (at zero)
    /// if it is not there yet and `name` and every one of `given` (the
    /// labels as the filter gave them) keep the rules, and the series limit
    /// allows; `None` otherwise, or if `name` is of the other kind (counted
    /// as a dropped update).
    fn find_or_create(&self, t: &mut Table, name: &str, given: &[(&str, &str)], labels: &Canonical<'_>, kind: MetricKind) -> Option<usize> {
        let h = Self::series_in(t, name, given, labels, kind);
        if h.is_none() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        h
    }

    fn series_in(t: &mut Table, name: &str, given: &[(&str, &str)], labels: &Canonical<'_>, kind: MetricKind) -> Option<usize> {
        let valid = || valid_name(name) && given.iter().all(|(k, v)| valid_name(k) && valid_value(v));
        if let Some(series) = t.by_name.get(name)
            && let Ok(i) = series.binary_search_by(|(l, _)| labels.cmp_stored(l))
            // The set matched was checked; a duplicated label dropped from
            // it was not, and must keep the rules too.
            && (given.len() == labels.len || valid())
        {
            let h = series[i].1;
            return (MetricKind::of(&t.values[h]) == kind).then_some(h);
        }
        // A new series (rare: the checks run only then).
        if !valid() || t.values.len() >= MAX_SERIES {
            return None;
        }
        // One name is one kind (its first series').
        if let Some(first) = t.by_name.get(name).and_then(|s| s.first())
            && MetricKind::of(&t.values[first.1]) != kind
        {
            return None;
        }
        let h = t.values.len();
        t.values.push(kind.new_value());
        let series = t.by_name.entry(name.to_string()).or_default();
        let i = series.binary_search_by(|(l, _)| labels.cmp_stored(l)).unwrap_or_else(|i| i);
        series.insert(i, (labels.to_owned(), h));
        Some(h)
    }

    /// Applies `f` to the series `name{labels}` of `kind` (see
    /// [`Self::find_or_create`]); counts the update dropped if there is
    /// none.
    fn update(&self, name: &str, given: &[(&str, &str)], kind: MetricKind, f: impl FnOnce(&mut MetricValue)) {
        let Some(labels) = self.labels(given) else { return };
        let mut t = self.lock();
        if let Some(h) = self.find_or_create(&mut t, name, given, &labels, kind) {
            f(&mut t.values[h]);
        }
    }

    /// The handle of the series `name{labels}` of `kind`, created at zero
    /// if new: what a filter's `metrics.counter` and `metrics.histogram`
    /// answer, for [`Self::add`] and [`Self::observe_by`]. `None` (counted
    /// as dropped) where an update by name would be dropped: a name or
    /// label that breaks a rule, the series limit, a name of the other
    /// kind.
    pub fn define(&self, kind: MetricKind, name: &str, labels: &[(&str, &str)]) -> Option<u32> {
        let canonical = self.labels(labels)?;
        let mut t = self.lock();
        self.find_or_create(&mut t, name, labels, &canonical, kind).and_then(|h| u32::try_from(h).ok())
    }

    /// Applies `f` to the series with handle `h` if it is one of `kind`;
    /// counts the update dropped otherwise (a handle this filter was never
    /// given).
    fn update_by(&self, h: u32, kind: MetricKind, f: impl FnOnce(&mut MetricValue)) {
        let mut t = self.lock();
        match t.values.get_mut(h as usize) {
            Some(v) if MetricKind::of(v) == kind => f(v),
            _ => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Adds `value` to the counter with handle `h` (from [`Self::define`]).
    pub fn add(&self, h: u32, value: u64) {
        self.update_by(h, MetricKind::Counter, |v| add_to(v, value));
    }

    /// Records `value` in the histogram with handle `h` (from [`Self::define`]).
    pub fn observe_by(&self, h: u32, value: f64) {
        if !value.is_finite() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.update_by(h, MetricKind::Histogram, |v| observe_into(v, value));
    }

    /// Adds `value` to the counter `name{labels}`.
    pub fn counter_add(&self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.update(name, labels, MetricKind::Counter, |v| add_to(v, value));
    }

    /// Records `value` in the histogram `name{labels}`.
    pub fn observe(&self, name: &str, labels: &[(&str, &str)], value: f64) {
        if !value.is_finite() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.update(name, labels, MetricKind::Histogram, |v| observe_into(v, value));
    }

    /// Every series, by name and labels.
    pub fn snapshot(&self) -> Vec<MetricSample> {
        let t = self.lock();
        t.by_name
            .iter()
            .flat_map(|(name, series)| {
                series.iter().map(|(labels, h)| MetricSample { name: name.clone(), labels: labels.clone(), value: t.values[*h].clone() })
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

/// Adds to a counter (the caller checked the kind).
fn add_to(v: &mut MetricValue, value: u64) {
    if let MetricValue::Counter(n) = v {
        *n = n.saturating_add(value);
    }
}

/// Records a finite observation in a histogram (the caller checked the kind).
fn observe_into(v: &mut MetricValue, value: f64) {
    if let MetricValue::Histogram { count, sum, buckets } = v {
        *count += 1;
        *sum += value;
        let i = BUCKETS.iter().position(|b| value <= *b).unwrap_or(BUCKETS.len());
        buckets[i] += 1;
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

    #[test]
    fn handles_update_the_series_they_name_and_bad_ones_are_dropped() {
        let m = FilterMetrics::default();
        let c = m.define(MetricKind::Counter, "passed", &[("stage", "rcpt")]).unwrap();
        // The same series by name or by handle, labels in any order.
        assert_eq!(m.define(MetricKind::Counter, "passed", &[("stage", "rcpt")]), Some(c));
        let two = m.define(MetricKind::Counter, "two", &[("b", "1"), ("a", "2")]).unwrap();
        assert_eq!(m.define(MetricKind::Counter, "two", &[("a", "2"), ("b", "1")]), Some(two));
        m.add(c, 2);
        m.counter_add("passed", &[("stage", "rcpt")], 3);
        let h = m.define(MetricKind::Histogram, "delay_seconds", &[]).unwrap();
        m.observe_by(h, 300.0);
        let s = m.snapshot();
        assert_eq!(s[0].render(), "delay_seconds count=1 sum=300");
        assert_eq!(s[1].render(), "passed{stage=\"rcpt\"} 5");
        assert_eq!(s[2].render(), "two{a=\"2\",b=\"1\"} 0", "defined series show at zero");
        assert_eq!(m.dropped(), 0);
        // Wrong kind, unknown handle, bad name, bad value, other kind of a name.
        m.add(h, 1);
        m.observe_by(c, 1.0);
        m.add(999, 1);
        m.observe_by(h, f64::INFINITY);
        assert_eq!(m.define(MetricKind::Counter, "Bad", &[]), None);
        assert_eq!(m.define(MetricKind::Counter, "x", &[("k", "line\nbreak")]), None);
        assert_eq!(m.define(MetricKind::Counter, "delay_seconds", &[("other", "set")]), None);
        assert_eq!(m.define(MetricKind::Counter, "x", &[("a", ""), ("b", ""), ("c", ""), ("d", ""), ("e", "")]), None);
        assert_eq!(m.dropped(), 8);
        assert_eq!(m.snapshot().len(), 3, "nothing created by the bad ones");
        // The limit holds for handles as for names.
        for i in 0..MAX_SERIES {
            m.define(MetricKind::Counter, "many", &[("i", &i.to_string())]);
        }
        assert_eq!(m.snapshot().len(), MAX_SERIES);
        assert_eq!(m.dropped(), 8 + 3);
    }
}

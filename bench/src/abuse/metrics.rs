//! The server's own count of what it refused: `/metrics` read before and after each attack.
//!
//! Best effort (a server without the endpoint, or one too busy to answer within
//! [`SCRAPE_TIMEOUT`], gives no figures, not an error).

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::TcpStream,
    time::Duration,
};

use crate::net::Target;

/// The longest one scrape may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(3);

/// Counters whose increase over an attack is reported (without the `ringcast_` prefix),
/// summed over shards; `upgrade_rejections_total` is kept apart by `reason`.
const COUNTERS: &[&str] = &[
    "topics_refused_total",
    "subscribes_refused_total",
    "publishes_refused_total",
    "throttled_total",
    "bad_requests_total",
    "handshake_timeouts_total",
    "upgrade_rejections_total",
    "handler_panics_total",
    "topics_expired_total",
];
/// Gauges reported as they are after an attack.
const GAUGES: &[&str] = &["topics", "memory_topics_estimate_bytes"];

/// Reads `/metrics` from the target's address: the selected counters and gauges, or `None`.
pub(super) fn scrape(target: &Target) -> Option<BTreeMap<String, f64>> {
    let mut stream = TcpStream::connect_timeout(&target.addr.into(), SCRAPE_TIMEOUT).ok()?;
    stream.set_read_timeout(Some(SCRAPE_TIMEOUT)).ok()?;
    stream.set_write_timeout(Some(SCRAPE_TIMEOUT)).ok()?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        target.host
    )
    .ok()?;
    let mut body = Vec::new();
    stream.read_to_end(&mut body).ok()?;
    let text = String::from_utf8_lossy(&body);
    if !text.starts_with("HTTP/1.1 200") {
        return None;
    }
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("ringcast_")) {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (base, labels) = name.split_once('{').unwrap_or((name, ""));
        let base = base.trim_start_matches("ringcast_");
        if !COUNTERS.contains(&base) && !GAUGES.contains(&base) {
            continue;
        }
        let key = match labels.split_once("reason=\"") {
            Some((_, rest)) => format!("{base}{{{}}}", rest.split('"').next().unwrap_or("")),
            None => base.to_owned(),
        };
        *out.entry(key).or_default() += value;
    }
    Some(out)
}

/// What changed from `before` to `after`: counters by their increase (those that rose only),
/// gauges by their value after.
pub(super) fn delta(
    before: Option<&BTreeMap<String, f64>>,
    after: Option<&BTreeMap<String, f64>>,
) -> BTreeMap<String, f64> {
    let (Some(before), Some(after)) = (before, after) else {
        return BTreeMap::new();
    };
    after
        .iter()
        .filter_map(|(k, &v)| {
            if GAUGES.contains(&k.as_str()) {
                return Some((k.clone(), v));
            }
            let rose = v - before.get(k).copied().unwrap_or(0.0);
            (rose > 0.0).then(|| (format!("{k} +"), rose))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_report_their_increase_and_gauges_their_value() {
        let before: BTreeMap<String, f64> = [
            ("topics".to_owned(), 5.0),
            ("topics_refused_total".to_owned(), 2.0),
            ("bad_requests_total".to_owned(), 1.0),
        ]
        .into();
        let mut after = before.clone();
        after.insert("topics".to_owned(), 7.0);
        after.insert("topics_refused_total".to_owned(), 12.0);
        after.insert("upgrade_rejections_total{timeout}".to_owned(), 3.0);
        let d = delta(Some(&before), Some(&after));
        assert_eq!(d["topics"], 7.0);
        assert_eq!(d["topics_refused_total +"], 10.0);
        assert_eq!(d["upgrade_rejections_total{timeout} +"], 3.0);
        assert!(!d.contains_key("bad_requests_total +"), "{d:?}");
        assert!(delta(None, Some(&after)).is_empty());
    }
}

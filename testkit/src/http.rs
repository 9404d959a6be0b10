//! Plain HTTP requests on the engine's port (probes, `/metrics`) and the metrics parser.

use std::{io::Write, net::SocketAddr};

use crate::raw::{raw, read_to_close};

/// An HTTP response read to the server's close: status, head (status line and headers) and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The status line and headers, without the blank line.
    pub head: String,
    /// Everything after the blank line.
    pub body: String,
}

impl Response {
    /// The value of header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Sends `METHOD PATH HTTP/1.1` with a Host header and reads the whole response (the server
/// closes after it).
pub fn request(addr: SocketAddr, method: &str, path: &str) -> Response {
    let (status, head, body) = http_get(addr, &format!("{method} {path} HTTP/1.1"));
    Response { status, head, body }
}

/// Sends one request line (e.g. `GET /readyz HTTP/1.1`) with a Host header and reads the whole
/// response: (status, head, body).
pub fn http_get(addr: SocketAddr, request_line: &str) -> (u16, String, String) {
    let mut stream = raw(addr);
    write!(stream, "{request_line}\r\nHost: localhost\r\n\r\n").expect("send request");
    let response = String::from_utf8(read_to_close(&mut stream)).expect("UTF-8 response");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("{request_line}: not a whole response: {response:?}"));
    let status = head
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{request_line}: no status in {head:?}"));
    (status, head.to_owned(), body.to_owned())
}

/// Parses a `/metrics` body as a Prometheus scraper would; panics if it does not parse.
pub fn parse_metrics(body: &str) -> prometheus_parse::Scrape {
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .expect("/metrics parses as Prometheus text")
}

/// GETs `/metrics` (the default path) and parses it; panics unless the status is 200.
pub fn scrape(addr: SocketAddr) -> prometheus_parse::Scrape {
    let r = request(addr, "GET", "/metrics");
    assert_eq!(r.status, 200, "/metrics: {}", r.head);
    parse_metrics(&r.body)
}

/// The sum over every series of `name` whose labels include all of `labels`.
pub fn metric_sum(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("{name}: {other:?}"),
        })
        .sum()
}

/// Whether any series named `name` exists (so a sum of 0 is a real 0, not a typo).
pub fn has_metric(scrape: &prometheus_parse::Scrape, name: &str) -> bool {
    scrape.samples.iter().any(|s| s.metric == name)
}

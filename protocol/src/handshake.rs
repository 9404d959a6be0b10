//! The HTTP/1.1 upgrade (RFC 6455 §4): request bytes in, the 101 or an error response out.
//!
//! Owns finding the end of a head that arrives in pieces ([`HeadReader`]), parsing and checking
//! an upgrade request ([`UpgradeRequest`]), building the responses, and the client side of the
//! same exchange ([`ClientHandshake`]). Parsing is httparse; nothing here reads a socket.

use std::fmt::Write as _;

use base64::{engine::general_purpose::STANDARD as BASE64, Engine as _};
use bytes::Bytes;
use sha1::{Digest, Sha1};

use crate::{
    deflate::{self, DeflateConfig, DeflateParams},
    error::HandshakeError,
};

/// The most header lines an upgrade request may carry; more is answered with 431.
pub const MAX_HEADERS: usize = 64;

/// The GUID RFC 6455 §1.3 appends to the key before hashing.
const WEBSOCKET_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Finds where an HTTP head ends in bytes that arrive in pieces, looking at each byte once.
#[derive(Debug, Clone, Default)]
pub struct HeadReader {
    scanned: usize,
}

impl HeadReader {
    /// A reader at the start of a head.
    pub const fn new() -> Self {
        Self { scanned: 0 }
    }

    /// Looks for the blank line that ends the head in `buf`, which holds every byte received so
    /// far (the same prefix each call, growing). Returns the head's length once it is complete.
    /// Accepts CRLF and, as RFC 9112 §2.2 allows, bare LF line ends.
    ///
    /// # Errors
    /// [`HandshakeError::HeadTooLarge`] once more than `max_bytes` arrive without the head ending.
    pub fn poll_head(
        &mut self,
        buf: &[u8],
        max_bytes: usize,
    ) -> Result<Option<usize>, HandshakeError> {
        let mut i = self.scanned.min(buf.len());
        loop {
            let Some(off) = buf[i..].iter().position(|&c| c == b'\n') else {
                self.scanned = buf.len();
                break;
            };
            let nl = i + off;
            let end = match (buf.get(nl + 1), buf.get(nl + 2)) {
                (Some(b'\n'), _) => nl + 2,
                (Some(b'\r'), Some(b'\n')) => nl + 3,
                // The next line has not arrived yet: look at this newline again next time.
                (None, _) | (Some(b'\r'), None) => {
                    self.scanned = nl;
                    break;
                }
                _ => {
                    i = nl + 1;
                    continue;
                }
            };
            if end > max_bytes {
                return Err(HandshakeError::HeadTooLarge { max: max_bytes });
            }
            return Ok(Some(end));
        }
        if buf.len() > max_bytes {
            return Err(HandshakeError::HeadTooLarge { max: max_bytes });
        }
        Ok(None)
    }
}

/// A parsed, validated upgrade request, borrowing the head's bytes.
#[derive(Debug)]
pub struct UpgradeRequest<'a> {
    method: &'a str,
    target: &'a str,
    headers: [httparse::Header<'a>; MAX_HEADERS],
    header_count: usize,
    key: &'a str,
}

impl<'a> UpgradeRequest<'a> {
    /// Parses a complete head (as delimited by [`HeadReader`]) and checks it is a WebSocket
    /// upgrade: GET, HTTP/1.1, Host, `Upgrade: websocket`, `Connection: upgrade`,
    /// `Sec-WebSocket-Version: 13` and a key of 16 bytes (RFC 6455 §4.2.1).
    ///
    /// # Errors
    /// The first rule the request breaks; [`HandshakeError::status`] gives the HTTP answer.
    pub fn parse(head: &'a [u8]) -> Result<Self, HandshakeError> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(head) {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => {
                return Err(HandshakeError::Malformed("head ends before the blank line"))
            }
            Err(httparse::Error::TooManyHeaders) => return Err(HandshakeError::TooManyHeaders),
            Err(e) => return Err(HandshakeError::Malformed(httparse_reason(e))),
        }
        let method = req.method.unwrap_or_default();
        let target = req.path.unwrap_or_default();
        let version = req.version;
        let header_count = req.headers.len();
        let mut this = Self {
            method,
            target,
            headers,
            header_count,
            key: "",
        };
        if method != "GET" {
            return Err(HandshakeError::MethodNotAllowed(method.to_owned()));
        }
        if version != Some(1) {
            return Err(HandshakeError::HttpVersion);
        }
        if this.header("host").is_none() {
            return Err(HandshakeError::MissingHost);
        }
        if !this.header_has_token("upgrade", "websocket") {
            return Err(HandshakeError::NotWebSocket);
        }
        if !this.header_has_token("connection", "upgrade") {
            return Err(HandshakeError::MissingConnectionUpgrade);
        }
        if this.header("sec-websocket-version").map(trim) != Some(b"13") {
            return Err(HandshakeError::UnsupportedVersion);
        }
        let key = {
            let mut keys = this.headers_named("sec-websocket-key");
            match (keys.next(), keys.next()) {
                (Some(k), None) => {
                    std::str::from_utf8(trim(k)).map_err(|_| HandshakeError::InvalidKey)?
                }
                _ => return Err(HandshakeError::InvalidKey),
            }
        };
        match BASE64.decode(key) {
            Ok(raw) if raw.len() == 16 => {}
            _ => return Err(HandshakeError::InvalidKey),
        }
        this.key = key;
        Ok(this)
    }

    /// The request method (always `GET` once parsed).
    pub fn method(&self) -> &'a str {
        self.method
    }

    /// The request target: path and query, as sent.
    pub fn target(&self) -> &'a str {
        self.target
    }

    /// The path, without the query.
    pub fn path(&self) -> &'a str {
        self.target.split_once('?').map_or(self.target, |(p, _)| p)
    }

    /// The query string after `?`, if any.
    pub fn query(&self) -> Option<&'a str> {
        self.target.split_once('?').map(|(_, q)| q)
    }

    /// Every header as (name, value), in the order sent.
    pub fn headers(&self) -> impl Iterator<Item = (&'a str, &'a [u8])> + '_ {
        self.headers[..self.header_count]
            .iter()
            .map(|h| (h.name, h.value))
    }

    /// The first header with this name (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.headers_named(name).next()
    }

    /// Every header with this name (ASCII case-insensitive).
    pub fn headers_named<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'a [u8]> + 's {
        self.headers()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// The subprotocols the client offered, in its order of preference.
    pub fn protocols(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.headers_named("sec-websocket-protocol")
            .filter_map(|v| std::str::from_utf8(v).ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|p| !p.is_empty())
    }

    /// The `Origin` header, which browsers always send.
    pub fn origin(&self) -> Option<&'a [u8]> {
        self.header("origin")
    }

    /// The client's `Sec-WebSocket-Key`.
    pub fn key(&self) -> &'a str {
        self.key
    }

    /// The permessage-deflate parameters to agree to, from the client's
    /// `Sec-WebSocket-Extensions` offers and this server's `config` (see
    /// [`deflate::negotiate`]); `None` declines.
    pub fn negotiate_deflate(&self, config: &DeflateConfig) -> Option<DeflateParams> {
        deflate::negotiate(config, self.headers_named("sec-websocket-extensions"))
    }

    /// Builds the 101 response that completes the upgrade, selecting `subprotocol`.
    /// Extensions the client offered are declined by leaving them out.
    ///
    /// # Errors
    /// [`HandshakeError::SubprotocolNotOffered`] if the client did not offer `subprotocol`.
    pub fn accept(&self, subprotocol: Option<&str>) -> Result<Bytes, HandshakeError> {
        self.accept_with(subprotocol, None)
    }

    /// [`UpgradeRequest::accept`], also agreeing to permessage-deflate with `deflate` (from
    /// [`UpgradeRequest::negotiate_deflate`]).
    ///
    /// # Errors
    /// [`HandshakeError::SubprotocolNotOffered`] if the client did not offer `subprotocol`.
    pub fn accept_with(
        &self,
        subprotocol: Option<&str>,
        deflate: Option<&DeflateParams>,
    ) -> Result<Bytes, HandshakeError> {
        if let Some(p) = subprotocol {
            if !self.protocols().any(|offered| offered == p) {
                return Err(HandshakeError::SubprotocolNotOffered(p.to_owned()));
            }
        }
        let mut out = String::with_capacity(160);
        out.push_str("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n");
        out.push_str("Connection: Upgrade\r\nSec-WebSocket-Accept: ");
        out.push_str(&accept_key(self.key.as_bytes()));
        out.push_str("\r\n");
        if let Some(p) = subprotocol {
            let _ = write!(out, "Sec-WebSocket-Protocol: {p}\r\n");
        }
        if let Some(d) = deflate {
            let _ = write!(out, "Sec-WebSocket-Extensions: {}\r\n", d.answer());
        }
        out.push_str("\r\n");
        Ok(Bytes::from(out))
    }

    fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.headers_named(name)
            .filter_map(|v| std::str::from_utf8(v).ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }
}

fn trim(v: &[u8]) -> &[u8] {
    v.trim_ascii()
}

fn httparse_reason(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status => "invalid status",
        httparse::Error::Token => "invalid token",
        httparse::Error::Version => "invalid HTTP version",
        httparse::Error::TooManyHeaders => "too many headers",
    }
}

/// `Sec-WebSocket-Accept` for a client key: base64 of SHA-1 over key and GUID (RFC 6455 §4.2.2).
pub fn accept_key(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(WEBSOCKET_GUID);
    BASE64.encode(sha.finalize())
}

/// The reason phrase for the statuses an upgrade can end with.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// A complete HTTP/1.1 response that closes the connection: status line, `extra_headers`,
/// a plain-text `body` with its length.
pub fn http_response(status: u16, extra_headers: &[(&str, &str)], body: &str) -> Bytes {
    let mut out = String::with_capacity(128 + body.len());
    let _ = write!(
        out,
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n",
        reason_phrase(status),
        body.len() + 1
    );
    for (name, value) in extra_headers {
        let _ = write!(out, "{name}: {value}\r\n");
    }
    let _ = write!(out, "\r\n{body}\n");
    Bytes::from(out)
}

/// The method and path (the target without its query) of a complete request head, for a
/// server that answers some plain HTTP requests (health checks, metrics) on the WebSocket
/// port. `None` if the head does not parse.
pub fn request_path(head: &[u8]) -> Option<(&str, &str)> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return None,
    }
    let target = req.path?;
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    Some((req.method?, path))
}

/// The response a server sends for a failed upgrade, with the headers the status calls for
/// (`Allow` on 405; `Upgrade` and `Sec-WebSocket-Version: 13` on 426, RFC 6455 §4.4).
pub fn error_response(err: &HandshakeError) -> Bytes {
    let status = err.status();
    let body = err.to_string();
    match status {
        405 => http_response(status, &[("Allow", "GET")], &body),
        426 => http_response(
            status,
            &[("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13")],
            &body,
        ),
        _ => http_response(status, &[], &body),
    }
}

/// The client side of the upgrade: builds the request and checks the 101 that answers it.
#[derive(Debug, Clone)]
pub struct ClientHandshake {
    key: String,
    protocols: Vec<String>,
    deflate: Option<DeflateConfig>,
}

impl ClientHandshake {
    /// A handshake with a key made from 16 random bytes the caller supplies (RFC 6455 §4.1 asks
    /// for a nonce; this crate has no randomness of its own), offering `protocols`.
    pub fn new(nonce: [u8; 16], protocols: &[&str]) -> Self {
        Self {
            key: BASE64.encode(nonce),
            protocols: protocols.iter().map(|p| (*p).to_owned()).collect(),
            deflate: None,
        }
    }

    /// Offers permessage-deflate as `config` describes; read the outcome with
    /// [`ClientHandshake::check_response_deflate`].
    #[must_use]
    pub fn with_deflate(mut self, config: DeflateConfig) -> Self {
        self.deflate = Some(config);
        self
    }

    /// The request head to send for `host` and `target` (path and query), with
    /// `extra_headers` (for example `Authorization` or `Origin`).
    pub fn request(&self, host: &str, target: &str, extra_headers: &[(&str, &str)]) -> Vec<u8> {
        let mut out = String::with_capacity(200);
        let _ = write!(
            out,
            "GET {target} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\n",
            self.key
        );
        if !self.protocols.is_empty() {
            let _ = write!(
                out,
                "Sec-WebSocket-Protocol: {}\r\n",
                self.protocols.join(", ")
            );
        }
        if let Some(d) = &self.deflate {
            let _ = write!(out, "Sec-WebSocket-Extensions: {}\r\n", d.offer());
        }
        for (name, value) in extra_headers {
            let _ = write!(out, "{name}: {value}\r\n");
        }
        out.push_str("\r\n");
        out.into_bytes()
    }

    /// Checks the server's complete response head (delimit it with [`HeadReader`]). Returns the
    /// subprotocol the server selected, if any.
    ///
    /// # Errors
    /// A status other than 101, missing upgrade headers, a wrong accept key, or a subprotocol
    /// that was not offered.
    pub fn check_response(&self, head: &[u8]) -> Result<Option<String>, HandshakeError> {
        self.check_response_deflate(head).map(|(p, _)| p)
    }

    /// [`ClientHandshake::check_response`], also returning the permessage-deflate parameters
    /// the server agreed to (`None`: declined or not offered). Give them to
    /// [`Codec::with_deflate`](crate::Codec::with_deflate).
    ///
    /// # Errors
    /// As [`ClientHandshake::check_response`], and [`HandshakeError::InvalidExtension`] for an
    /// extension answer the offer does not allow (any extension when none was offered).
    pub fn check_response_deflate(
        &self,
        head: &[u8],
    ) -> Result<(Option<String>, Option<DeflateParams>), HandshakeError> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(head) {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => {
                return Err(HandshakeError::Malformed("head ends before the blank line"))
            }
            Err(httparse::Error::TooManyHeaders) => return Err(HandshakeError::TooManyHeaders),
            Err(e) => return Err(HandshakeError::Malformed(httparse_reason(e))),
        }
        let code = resp.code.unwrap_or_default();
        if code != 101 {
            return Err(HandshakeError::Status(code));
        }
        let headers: &[httparse::Header<'_>] = resp.headers;
        let find = |name: &'static str| {
            headers
                .iter()
                .filter(move |h| h.name.eq_ignore_ascii_case(name))
                .filter_map(|h| std::str::from_utf8(h.value).ok())
        };
        let has_token = |name: &'static str, token: &str| {
            find(name)
                .flat_map(|v| v.split(','))
                .any(|t| t.trim().eq_ignore_ascii_case(token))
        };
        if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
            return Err(HandshakeError::MissingUpgradeHeaders);
        }
        let expected = accept_key(self.key.as_bytes());
        if find("sec-websocket-accept").next().map(str::trim) != Some(expected.as_str()) {
            return Err(HandshakeError::AcceptMismatch);
        }
        let protocol = match find("sec-websocket-protocol").next().map(str::trim) {
            None => None,
            Some(p) if self.protocols.iter().any(|o| o == p) => Some(p.to_owned()),
            Some(p) => return Err(HandshakeError::UnexpectedSubprotocol(p.to_owned())),
        };
        let answers: Vec<&str> = find("sec-websocket-extensions").map(str::trim).collect();
        let answer = match answers[..] {
            [] => None,
            [one] => Some(one),
            _ => {
                return Err(HandshakeError::InvalidExtension(
                    "several Sec-WebSocket-Extensions headers".to_owned(),
                ))
            }
        };
        let deflate = match (&self.deflate, answer) {
            (Some(config), answer) => config.check_answer(answer)?,
            (None, None) => None,
            (None, Some(a)) => {
                return Err(HandshakeError::InvalidExtension(format!(
                    "no extension was offered: {a}"
                )))
            }
        };
        Ok((protocol, deflate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_path_reads_method_and_path_without_query() {
        let head = b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(request_path(head), Some(("GET", "/metrics")));
        assert_eq!(request_path(b"GET /x HTTP/1.1\r\n"), None);
    }

    const REQ: &[u8] = b"GET /chat?room=1 HTTP/1.1\r\nHost: server.example.com\r\n\
        Upgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: http://example.com\r\n\
        Sec-WebSocket-Protocol: chat, superchat\r\nSec-WebSocket-Version: 13\r\n\r\n";

    #[test]
    fn rfc_example_key_gives_rfc_example_accept() {
        // RFC 6455 §1.3.
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn head_reader_finds_the_end_in_any_split() {
        for cut in 0..REQ.len() {
            let mut reader = HeadReader::new();
            assert_eq!(reader.poll_head(&REQ[..cut], 8192), Ok(None), "cut {cut}");
            assert_eq!(
                reader.poll_head(REQ, 8192),
                Ok(Some(REQ.len())),
                "cut {cut}"
            );
        }
        let mut reader = HeadReader::new();
        assert_eq!(
            reader.poll_head(b"GET / HTTP/1.1\nHost: a\n\nrest", 100),
            Ok(Some(24))
        );
    }

    #[test]
    fn head_reader_refuses_heads_over_the_limit() {
        let mut reader = HeadReader::new();
        assert_eq!(
            reader.poll_head(&[b'a'; 100], 64),
            Err(HandshakeError::HeadTooLarge { max: 64 })
        );
        let mut reader = HeadReader::new();
        assert_eq!(
            reader.poll_head(REQ, 64),
            Err(HandshakeError::HeadTooLarge { max: 64 })
        );
    }

    #[test]
    fn valid_request_parses_and_exposes_its_parts() {
        let req = UpgradeRequest::parse(REQ).unwrap();
        assert_eq!(req.path(), "/chat");
        assert_eq!(req.query(), Some("room=1"));
        assert_eq!(req.protocols().collect::<Vec<_>>(), ["chat", "superchat"]);
        assert_eq!(req.origin(), Some(&b"http://example.com"[..]));
        let resp = req.accept(Some("chat")).unwrap();
        let text = std::str::from_utf8(&resp).unwrap();
        assert!(text.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
        assert!(text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(text.contains("Sec-WebSocket-Protocol: chat\r\n"));
        assert!(!text.contains("Extensions"));
        assert_eq!(
            req.accept(Some("other")),
            Err(HandshakeError::SubprotocolNotOffered("other".into()))
        );
    }

    fn with(replace: &str, by: &str) -> Vec<u8> {
        let text = std::str::from_utf8(REQ).unwrap();
        assert!(text.contains(replace), "{replace}");
        text.replacen(replace, by, 1).into_bytes()
    }

    #[test]
    fn each_broken_rule_gets_its_status() {
        let cases = [
            (with("GET", "POST"), 405),
            (with("HTTP/1.1\r\nHost", "HTTP/1.0\r\nHost"), 400),
            (with("Host: server.example.com\r\n", ""), 400),
            (with("Upgrade: websocket\r\n", ""), 426),
            (with("keep-alive, Upgrade", "keep-alive"), 400),
            (with("Version: 13", "Version: 8"), 426),
            (with("dGhlIHNhbXBsZSBub25jZQ==", "c2hvcnQ="), 400),
            (with("GET /chat", "GET\x01/chat"), 400),
        ];
        for (req, status) in cases {
            let err = UpgradeRequest::parse(&req).unwrap_err();
            assert_eq!(
                err.status(),
                status,
                "{err} for {}",
                String::from_utf8_lossy(&req)
            );
        }
    }

    #[test]
    fn error_responses_carry_the_headers_their_status_needs() {
        let resp = error_response(&HandshakeError::UnsupportedVersion);
        let text = std::str::from_utf8(&resp).unwrap();
        assert!(text.starts_with("HTTP/1.1 426 Upgrade Required\r\n"));
        assert!(text.contains("Sec-WebSocket-Version: 13\r\n"));
        let resp = error_response(&HandshakeError::HeadTooLarge { max: 1 });
        assert!(resp.starts_with(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"));
    }

    #[test]
    fn client_handshake_round_trips_with_the_server_side() {
        let client = ClientHandshake::new([7; 16], &["v1", "v2"]);
        let request = client.request("localhost:9000", "/ws", &[("Origin", "http://a")]);
        let mut reader = HeadReader::new();
        let len = reader.poll_head(&request, 8192).unwrap().unwrap();
        let req = UpgradeRequest::parse(&request[..len]).unwrap();
        let response = req.accept(Some("v2")).unwrap();
        assert_eq!(client.check_response(&response), Ok(Some("v2".into())));
        let wrong = ClientHandshake::new([8; 16], &[]);
        assert_eq!(
            wrong.check_response(&req.accept(None).unwrap()),
            Err(HandshakeError::AcceptMismatch)
        );
    }
}

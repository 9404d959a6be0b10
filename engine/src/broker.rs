//! The built-in broker: the pub/sub wire protocol (protocol/PROTOCOL.md) on top of the
//! engine's topics, and the raw broadcast server used by the all-to-all benchmark.
//!
//! Owns the upgrade-time choice of encoding (subprotocol) and overflow policy (`?overflow=`),
//! turning requests into subscribe/unsubscribe/publish calls, and answering each with an ack
//! or an error on the control lane. A malformed request gets an error naming its id, and is
//! charged to the connection's bad-request budget: a client that spends it is closed with
//! 1008. A refusal that is not the client's fault (rate limit, an engine or broker that
//! cannot take it now, auth, a missing subscription) is never charged; `rate_limited` and
//! `unavailable` carry a retry hint.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use ringcast_protocol::{
    envelope::{self, DataKind, Dialect, Encoding, ErrorCode, Request},
    CloseCode, UpgradeRequest,
};

// Only the crate's public API, as an embedder writing its own broker would (ARCHITECTURE.md).
use crate::{
    error_frame, Auth, ConnId, Ctx, DeliveryFormat, Frame, Grants, Handler, Message, Payload,
    RingOverflow, SubscribeError, Upgrade, UpgradeCtx,
};

/// The pub/sub broker, `ringcast serve`'s default handler.
///
/// At the upgrade it selects `ringcast.v2.bin` if the client offers it, else
/// `ringcast.v1.bin`, else `ringcast.v1.json` if offered; a client that offers none (a bare
/// browser `WebSocket`) speaks JSON. `?overflow=drop-oldest|drop-newest|conflate|disconnect` in the request target
/// picks the connection's data-ring policy (anything else: 400).
///
/// With token auth (`Broker::with_auth`, the `jwt` feature) an upgrade needs a valid token
/// (401 otherwise, with a `WWW-Authenticate` challenge); the token's `sub` names the user and its
/// `subscribe` and `publish` patterns bound what the connection may do: a request for any
/// other topic gets a `forbidden` error, not a disconnect. Once the token expires, the next
/// request closes the connection with 1008 "token expired".
#[derive(Debug, Clone, Default)]
pub struct Broker {
    auth: Option<Arc<Auth>>,
    /// The grants of the upgrade being decided, until `on_open` files them by connection.
    pending: Option<Arc<Grants>>,
    grants: HashMap<ConnId, Arc<Grants>>,
}

impl Broker {
    /// A broker without auth: anyone may connect, subscribe and publish.
    pub fn new() -> Self {
        Self::default()
    }

    /// A broker that requires a token checked by `auth` (`None`: no auth, as
    /// [`Auth::from_config`] returns when `auth.required` is false). Needs the `jwt` feature.
    #[cfg(feature = "jwt")]
    #[cfg_attr(docsrs, doc(cfg(feature = "jwt")))]
    pub fn with_auth(auth: Option<Arc<Auth>>) -> Self {
        Self {
            auth,
            ..Self::default()
        }
    }
}

impl Handler for Broker {
    fn on_upgrade(&mut self, req: &UpgradeRequest<'_>, _ctx: &UpgradeCtx) -> Upgrade {
        self.pending = None;
        let mut user = None;
        if let Some(auth) = &self.auth {
            match auth.authenticate(req) {
                Ok(grants) => {
                    user = Some(grants.user().to_owned());
                    self.pending = Some(Arc::new(grants));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "upgrade refused: token");
                    return Upgrade::reject(401, e.to_string())
                        .with_header("WWW-Authenticate", e.challenge());
                }
            }
        }
        let accept = self.choose(req);
        match user {
            Some(user) => accept.with_user(user),
            None => accept,
        }
    }

    fn on_open(&mut self, ctx: &mut Ctx<'_>) {
        if let Some(grants) = self.pending.take() {
            self.grants.insert(ctx.id(), grants);
        }
        ctx.set_delivery_format(DeliveryFormat::Envelope(dialect_of(ctx).encoding()));
        let policy = query_param(ctx.info().target(), "overflow").and_then(RingOverflow::from_name);
        if let Some(policy) = policy {
            ctx.set_ring_overflow(policy);
        }
    }

    fn on_close(&mut self, ctx: &mut Ctx<'_>, _close: &crate::CloseInfo) {
        self.grants.remove(&ctx.id());
    }

    fn on_message(&mut self, ctx: &mut Ctx<'_>, msg: Message) {
        let grants = match &self.auth {
            None => None,
            Some(_) => match self.grants.get(&ctx.id()) {
                Some(g) if !g.expired_at(SystemTime::now()) => Some(&**g),
                // Expired, or (a bug) never filed: either way no longer trusted.
                _ => {
                    ctx.close(CloseCode::POLICY, "token expired");
                    return;
                }
            },
        };
        let dialect = dialect_of(ctx);
        let encoding = dialect.encoding();
        // Parsing costs time in proportion to size, on the shard every connection shares:
        // nothing larger than the largest publish is parsed at all.
        if msg.payload().len() > ctx.pubsub_config().max_request_bytes() {
            let why = "request larger than the largest publish the broker takes";
            return refuse(ctx, dialect, None, ErrorCode::TooLarge, why);
        }
        let request = match (&msg, encoding) {
            (Message::Text(_), Encoding::Json) | (Message::Binary(_), Encoding::Binary) => {
                envelope::decode_request_with(encoding, msg.payload(), ctx.decode_options())
            }
            (Message::Binary(_), Encoding::Json) | (Message::Text(_), Encoding::Binary) => {
                Err(envelope::DecodeError {
                    id: None,
                    code: ErrorCode::BadRequest,
                    message: format!(
                        "{} takes {} messages",
                        dialect.subprotocol(),
                        match encoding {
                            Encoding::Json => "text",
                            Encoding::Binary => "binary",
                        }
                    ),
                })
            }
        };
        match request {
            Ok(request) => handle(ctx, dialect, grants, request),
            Err(e) => {
                // Decoding refuses `too_large` only for a subscribe or unsubscribe naming more
                // than `max_topics_per_request` topics: charged to the subscribe budget as
                // that many, as the most a request may cost, so that a client repeating it
                // is slowed (not read until the budget allows) like one subscribing that
                // much, instead of having its request scanned again at once.
                if e.code == ErrorCode::TooLarge {
                    let most = ctx.pubsub_config().max_topics_per_request;
                    let _ = ctx.charge_subscriptions(most);
                }
                refuse(ctx, dialect, e.id, e.code, &e.message)
            }
        }
    }
}

impl Broker {
    /// The acceptance for a request that passed auth: the encoding by subprotocol, after
    /// checking `?overflow=`.
    fn choose(&self, req: &UpgradeRequest<'_>) -> Upgrade {
        if let Some(policy) = query_param(req.target(), "overflow") {
            if RingOverflow::from_name(policy).is_none() {
                return Upgrade::reject(
                    400,
                    "overflow must be drop-oldest, drop-newest, conflate or disconnect",
                );
            }
        }
        let offered = |name: &str| req.protocols().any(|p| p == name);
        // The newer binary version first: it carries epochs, seqs and retry hints.
        [
            envelope::BINARY_V2_SUBPROTOCOL,
            envelope::BINARY_SUBPROTOCOL,
            envelope::JSON_SUBPROTOCOL,
        ]
        .into_iter()
        .find(|name| offered(name))
        .map_or_else(Upgrade::accept, Upgrade::accept_subprotocol)
    }
}

fn handle(ctx: &mut Ctx<'_>, d: Dialect, grants: Option<&Grants>, request: Request<'_>) {
    let enc = d.encoding();
    match request {
        Request::Subscribe { id, topics } => {
            // All or nothing: a denied topic subscribes none of the request's topics.
            if let Some(denied) = grants.and_then(|g| {
                topics
                    .iter()
                    .find(|t| !g.may_subscribe(&t.topic))
                    .map(|t| t.topic.to_string())
            }) {
                let why = format!("{denied}: not allowed to subscribe");
                return refuse(ctx, d, id, ErrorCode::Forbidden, &why);
            }
            if let Err(wait) = ctx.charge_subscriptions(topics.len()) {
                let why = "subscribe rate limit exceeded";
                return refuse_with(ctx, d, id, ErrorCode::RateLimited, why, Some(wait));
            }
            let mut resets = Vec::new();
            let mut positions = Vec::new();
            // A topic named twice is subscribed once, as its first entry says: repeats cost
            // a lookup, not a subscription each (PROTOCOL.md).
            let mut named = HashSet::new();
            for t in &topics {
                if !named.insert(&*t.topic) {
                    continue;
                }
                match ctx.subscribe_in(&t.topic, t.since, t.epoch) {
                    Ok(sub) => {
                        if let Some(oldest) = sub.reset {
                            resets.push(envelope::reset_frame(d, &t.topic, oldest, sub.epoch));
                        }
                        positions.push(envelope::TopicPosition {
                            topic: t.topic.clone(),
                            epoch: sub.epoch,
                            seq: sub.seq,
                        });
                    }
                    Err(e) => {
                        let code = match e {
                            SubscribeError::BadTopic(_) => ErrorCode::BadTopic,
                            SubscribeError::TooManySubscriptions => ErrorCode::TooManySubscriptions,
                            SubscribeError::TooManyTopics => ErrorCode::TooManyTopics,
                        };
                        // Topics before this one stay subscribed; the error names this one.
                        return refuse(ctx, d, id, code, &format!("{}: {e}", t.topic));
                    }
                }
            }
            control(ctx, envelope::subscribe_ack_frame(d, id, positions));
            for reset in resets {
                control(ctx, reset);
            }
        }
        Request::Unsubscribe { id, topics } => {
            if let Err(wait) = ctx.charge_subscriptions(topics.len()) {
                let why = "subscribe rate limit exceeded";
                return refuse_with(ctx, d, id, ErrorCode::RateLimited, why, Some(wait));
            }
            let mut missing = None;
            let mut named = HashSet::new();
            for topic in &topics {
                if !named.insert(&**topic) {
                    continue;
                }
                if !ctx.unsubscribe(topic) && missing.is_none() {
                    missing = Some(topic.to_string());
                }
            }
            match missing {
                None => control(ctx, envelope::ack_frame(d, id)),
                Some(topic) => {
                    let why = format!("not subscribed to {topic}");
                    refuse(ctx, d, id, ErrorCode::NotSubscribed, &why);
                }
            }
        }
        Request::Publish { id, topic, payload } => {
            if grants.is_some_and(|g| !g.may_publish(&topic)) {
                let why = format!("{topic}: not allowed to publish");
                return refuse(ctx, d, id, ErrorCode::Forbidden, &why);
            }
            let payload = match payload.kind {
                // The one copy, out of the read buffer.
                DataKind::Json => Payload::Json(Bytes::copy_from_slice(&payload.bytes)),
                DataKind::Binary => Payload::Binary(Bytes::copy_from_slice(&payload.bytes)),
            };
            match ctx.publish_request(&topic, payload, id, d) {
                Ok(Some(receipt)) => control(
                    ctx,
                    envelope::publish_ack_frame(d, id, receipt.epoch, receipt.seq),
                ),
                // The backend (Redis) acks or refuses it when it has ordered it.
                Ok(None) => {}
                Err(e) => {
                    let code = e.error_code();
                    let retry = ctx.retry_after(&e);
                    refuse_with(ctx, d, id, code, &e.to_string(), retry);
                }
            }
        }
        Request::Ping { id } => control(ctx, envelope::pong_frame(enc, id)),
    }
}

/// Answers a request with an error, and closes a connection that keeps sending malformed
/// ones.
fn refuse(ctx: &mut Ctx<'_>, d: Dialect, id: Option<u64>, code: ErrorCode, message: &str) {
    refuse_with(ctx, d, id, code, message, None);
}

/// [`refuse`] with a retry hint. Only a malformed request ([`is_malformed`]) is charged to
/// the bad-request budget.
fn refuse_with(
    ctx: &mut Ctx<'_>,
    d: Dialect,
    id: Option<u64>,
    code: ErrorCode,
    message: &str,
    retry_after: Option<Duration>,
) {
    control(ctx, error_frame(d, id, code, message, retry_after));
    if is_malformed(code) && !ctx.charge_bad_request() {
        ctx.close(CloseCode::POLICY, "too many bad requests");
    }
}

/// Whether a refusal is the client's fault: a request it should not have sent as it did
/// (these count against `pubsub.max_bad_requests`). `rate_limited`, `unavailable`,
/// `forbidden`, `not_subscribed`, `too_many_subscriptions`, `too_many_topics` and
/// `internal` refuse a well-formed request for reasons of the moment, the token or the
/// server.
fn is_malformed(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::BadRequest
            | ErrorCode::UnknownType
            | ErrorCode::BadTopic
            | ErrorCode::BadPayload
            | ErrorCode::TooLarge
    )
}

/// Queues a reply on the control lane (never dropped: a reply to the connection being handled
/// always queues).
fn control(ctx: &mut Ctx<'_>, frame: Bytes) {
    let _ = ctx.send_frame(&Frame(frame));
}

/// The connection's dialect, by the subprotocol selected at the upgrade (JSON when none).
fn dialect_of(ctx: &Ctx<'_>) -> Dialect {
    ctx.info()
        .subprotocol()
        .and_then(Dialect::from_subprotocol)
        .unwrap_or(Dialect::Json)
}

/// The value of `name` in the query of `target`, undecoded.
fn query_param<'a>(target: &'a str, name: &str) -> Option<&'a str> {
    let (_, query) = target.split_once('?')?;
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
}

/// The all-to-all broadcast server (`ringcast serve --broadcast`): every connection is
/// subscribed to one topic when it opens, and every message it sends is published there as
/// is, through the same fan-out path as the broker, and delivered raw (no envelope).
#[derive(Debug, Clone)]
pub struct Broadcast {
    topic: String,
}

impl Broadcast {
    /// Broadcasts on `topic`.
    pub fn new(topic: impl Into<String>) -> Self {
        Self {
            topic: topic.into(),
        }
    }
}

impl Default for Broadcast {
    fn default() -> Self {
        Self::new("broadcast")
    }
}

impl Handler for Broadcast {
    fn on_open(&mut self, ctx: &mut Ctx<'_>) {
        ctx.set_delivery_format(DeliveryFormat::Raw);
        if let Err(e) = ctx.subscribe(&self.topic, None) {
            tracing::warn!(error = %e, "broadcast: subscribe failed");
            ctx.close(CloseCode::INTERNAL_ERROR, "subscribe failed");
        }
    }

    fn on_message(&mut self, ctx: &mut Ctx<'_>, msg: Message) {
        let payload = match msg {
            Message::Text(t) => Payload::Text(t),
            Message::Binary(b) => Payload::Binary(b),
        };
        // Ctx::publish copies the payload out of the read buffer.
        if let Err(e) = ctx.publish(&self.topic, payload) {
            tracing::debug!(error = %e, "broadcast: publish refused");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_params_are_found_by_exact_name() {
        assert_eq!(
            query_param("/?overflow=conflate", "overflow"),
            Some("conflate")
        );
        assert_eq!(
            query_param("/p?a=1&overflow=disconnect", "overflow"),
            Some("disconnect")
        );
        assert_eq!(query_param("/p?overflowx=1", "overflow"), None);
        assert_eq!(query_param("/p", "overflow"), None);
    }
}

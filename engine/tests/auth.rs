//! Token auth in the broker, with real clients: every refusal's exact status and challenge,
//! the token read from each place it may be, HS256/RS256/ES256 keys from files, topic
//! permissions answered with `forbidden` (not a disconnect), expiry mid-connection, and the
//! per-user connection cap.

mod util;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use ringcast::{
    protocol::envelope::{self, AckPosition, Dialect, ServerMessage},
    Auth, Broker, Engine, EngineConfig,
};
use serde_json::{json, Value};
use tungstenite::Message as WsMessage;
use util::*;

fn key_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/keys")
        .join(name)
}

/// A broker requiring tokens signed with any of the three test keys.
fn auth_config() -> EngineConfig {
    let mut cfg = config(2);
    cfg.auth.required = true;
    cfg.auth.hs256_secret_file = Some(key_file("hs256.secret"));
    cfg.auth.rs256_public_key_file = Some(key_file("rs256-public.pem"));
    cfg.auth.es256_public_key_file = Some(key_file("es256-public.pem"));
    cfg.auth.leeway = std::time::Duration::ZERO;
    cfg
}

fn start(cfg: EngineConfig) -> Engine {
    let auth = Auth::from_config(&cfg.auth)
        .expect("keys load")
        .map(Arc::new);
    Engine::start(cfg, move |_| Broker::with_auth(auth.clone())).expect("start")
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn sign(alg: Algorithm, claims: &Value) -> String {
    let key = match alg {
        Algorithm::HS256 => EncodingKey::from_secret(b"test-only-hs256-secret"),
        Algorithm::RS256 => {
            EncodingKey::from_rsa_pem(&std::fs::read(key_file("rs256-private.pem")).unwrap())
                .unwrap()
        }
        Algorithm::ES256 => {
            EncodingKey::from_ec_pem(&std::fs::read(key_file("es256-private.pem")).unwrap())
                .unwrap()
        }
        other => panic!("no test key for {other:?}"),
    };
    encode(&Header::new(alg), claims, &key).unwrap()
}

/// A token for `user` valid for a minute, allowed `prices.*` and `news` to read and
/// `chat.<user>` to write.
fn token(user: &str) -> String {
    sign(
        Algorithm::HS256,
        &json!({
            "sub": user, "exp": now() + 60,
            "subscribe": ["prices.*", "news"], "publish": [format!("chat.{user}")]
        }),
    )
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// A JSON broker client presenting `token`.
fn client(addr: SocketAddr, token: &str) -> BrokerClient {
    BrokerClient::connect_to(
        addr,
        "/",
        Dialect::Json,
        &[("Authorization", &bearer(token))],
    )
}

/// Sends a JSON request; the reply must be an error with the request's id and `code`, and
/// its message is returned.
fn expect_error(c: &mut BrokerClient, id: u64, code: &str, request: Value) -> String {
    c.send_json(&request.to_string());
    match c.next_message() {
        ServerMessage::Error {
            id: got,
            code: got_code,
            message,
            retry_after_ms,
        } => {
            assert_eq!(
                (got, &*got_code, retry_after_ms),
                (Some(id), code, None),
                "{request}"
            );
            message.into_owned()
        }
        other => panic!("expected the {code} error of {request}, got {other:?}"),
    }
}

#[test]
fn missing_malformed_expired_and_forged_tokens_get_401_with_a_challenge() {
    let engine = start(auth_config());
    let addr = engine.local_addr();
    let expired = sign(Algorithm::HS256, &json!({"sub": "ann", "exp": now() - 5}));
    let forged = encode(
        &Header::default(),
        &json!({"sub": "ann", "exp": now() + 60}),
        &EncodingKey::from_secret(b"not the secret"),
    )
    .unwrap();
    let unsigned_alg = encode(
        &Header::new(Algorithm::HS512),
        &json!({"sub": "ann", "exp": now() + 60}),
        &EncodingKey::from_secret(b"test-only-hs256-secret"),
    )
    .unwrap();
    let cases: [(&str, Option<String>, &str); 5] = [
        ("missing", None, "no token"),
        ("malformed", Some(bearer("not.a.jwt")), "malformed token"),
        ("expired", Some(bearer(&expired)), "token expired"),
        ("forged", Some(bearer(&forged)), "bad signature"),
        (
            "other alg",
            Some(bearer(&unsigned_alg)),
            "HS512 is not accepted",
        ),
    ];
    for (what, header, body) in cases {
        let headers: Vec<(&str, &str)> = header
            .as_deref()
            .map(|h| vec![("Authorization", h)])
            .unwrap_or_default();
        let (status, response) = refused(connect_with(addr, "/", &headers));
        assert_eq!(status, 401, "{what}");
        let challenge = response.headers()["www-authenticate"].to_str().unwrap();
        assert!(
            challenge.starts_with("Bearer realm=\"ringcast\""),
            "{what}: {challenge}"
        );
        let text = String::from_utf8(response.body().clone().unwrap_or_default()).unwrap();
        assert!(text.contains(body), "{what}: {text}");
    }
    let total = engine.handle().metrics().total();
    assert_eq!(total.rejected(ringcast::RejectReason::Handler), 5);
    assert_eq!(total.upgrades_accepted, 0);
    engine.stop().unwrap();
}

#[test]
fn each_key_type_and_each_token_place_is_accepted() {
    let mut cfg = auth_config();
    cfg.auth.query_param = "access_token".into();
    let engine = start(cfg);
    let addr = engine.local_addr();
    for alg in [Algorithm::HS256, Algorithm::RS256, Algorithm::ES256] {
        let t = sign(alg, &json!({"sub": "ann", "exp": now() + 60}));
        connect_with(addr, "/", &[("Authorization", &bearer(&t))])
            .unwrap_or_else(|e| panic!("{alg:?}: {e}"));
    }
    let t = token("ann");
    // A browser: the token as a subprotocol entry beside the protocol it speaks. The server
    // selects the protocol, never the token.
    let offer = format!("ringcast.v1.json, ringcast.token.{t}");
    let (_, response) = connect_with(addr, "/", &[("Sec-WebSocket-Protocol", &offer)]).unwrap();
    assert_eq!(
        response.headers()["sec-websocket-protocol"],
        "ringcast.v1.json"
    );
    let cookie = format!("theme=dark; ringcast_token={t}");
    connect_with(addr, "/", &[("Cookie", &cookie)]).expect("cookie");
    connect_with(addr, &format!("/?access_token={t}"), &[]).expect("query parameter");
    assert_eq!(engine.handle().metrics().total().upgrades_accepted, 6);
    engine.stop().unwrap();
}

#[test]
fn the_query_parameter_is_not_read_unless_enabled() {
    let engine = start(auth_config());
    let t = token("ann");
    let (status, _) = refused(connect_with(
        engine.local_addr(),
        &format!("/?token={t}"),
        &[],
    ));
    assert_eq!(status, 401);
    engine.stop().unwrap();
}

#[test]
fn denied_topics_get_forbidden_and_the_connection_stays() {
    let engine = start(auth_config());
    let mut c = client(engine.local_addr(), &token("ann"));
    let message = expect_error(
        &mut c,
        1,
        "forbidden",
        json!({"type": "subscribe", "id": 1, "topics": ["prices.BTC", "secret.plans"]}),
    );
    assert!(message.contains("secret.plans"), "{message}");
    // All or nothing: prices.BTC was not subscribed either.
    expect_error(
        &mut c,
        2,
        "not_subscribed",
        json!({"type": "unsubscribe", "id": 2, "topic": "prices.BTC"}),
    );
    c.send(&subscribe_request(
        3,
        &[("prices.BTC", None), ("news", None)],
    ));
    let AckPosition::Subscribe(acked) = c.expect_ack(3) else {
        panic!("not a subscribe's ack")
    };
    let acked: Vec<&str> = acked.iter().map(|t| &*t.topic).collect();
    assert_eq!(acked, ["prices.BTC", "news"]);
    expect_error(
        &mut c,
        4,
        "forbidden",
        json!({"type": "publish", "id": 4, "topic": "chat.bob", "data": 1}),
    );
    c.send_json(&json!({"type": "publish", "id": 5, "topic": "chat.ann", "data": 1}).to_string());
    assert!(
        matches!(c.expect_ack(5), AckPosition::Publish { seq: 1, .. }),
        "the first message of chat.ann"
    );
    c.send_json(r#"{"type":"ping","id":6}"#);
    assert_eq!(c.recv(), Got::Pong(Some(6)));
    engine.stop().unwrap();
}

#[test]
fn a_token_that_expires_mid_connection_closes_it_with_1008() {
    let engine = start(auth_config());
    // Before signing: the token expires at a whole second at least one second later.
    let start = Instant::now();
    let short = sign(
        Algorithm::HS256,
        &json!({"sub": "ann", "exp": now() + 2, "subscribe": ["*"]}),
    );
    let mut c = client(engine.local_addr(), &short);
    let mut id = 0;
    // Ping until the token has expired: every answer before that is a pong, and the first
    // request after it is answered with the close (bounded by DEADLINE).
    loop {
        assert!(start.elapsed() < DEADLINE, "never closed");
        id += 1;
        c.send_json(&json!({"type": "ping", "id": id}).to_string());
        match c.ws.read().expect("a pong or the close") {
            WsMessage::Text(t) => {
                let pong = envelope::decode_server(Dialect::Json, t.as_bytes()).expect("JSON");
                assert_eq!(Got::from_server(pong), Got::Pong(Some(id)), "still valid");
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            WsMessage::Close(Some(frame)) => {
                assert_eq!(
                    (u16::from(frame.code), frame.reason.as_str()),
                    (1008, "token expired")
                );
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    // Not closed before the token expired.
    assert!(start.elapsed() >= std::time::Duration::from_secs(1));
    engine.stop().unwrap();
}

#[test]
fn connections_per_user_are_capped_over_all_shards() {
    let mut cfg = auth_config();
    cfg.admission.max_connections_per_user = 2;
    let engine = start(cfg);
    let addr = engine.local_addr();
    let ann = bearer(&token("ann"));
    let first = connect_with(addr, "/", &[("Authorization", &ann)]).unwrap();
    let _second = connect_with(addr, "/", &[("Authorization", &ann)]).unwrap();
    for _ in 0..4 {
        let (status, response) = refused(connect_with(addr, "/", &[("Authorization", &ann)]));
        assert_eq!(status, 429);
        let body = String::from_utf8(response.body().clone().unwrap()).unwrap();
        assert!(
            body.contains("too many connections for this user"),
            "{body}"
        );
    }
    // Another user is not affected.
    let _bob = connect_with(addr, "/", &[("Authorization", &bearer(&token("bob")))]).unwrap();
    // Closing one of ann's frees a place.
    let (mut ws, _) = first;
    ws.close(None).unwrap();
    // Read until the close handshake is complete.
    loop {
        match ws.read() {
            Ok(_) => continue,
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("closing: {e}"),
        }
    }
    drop(ws);
    // Refused with 429 until the server has seen the close, then accepted.
    wait_until("ann's place is free", || {
        match connect_with(addr, "/", &[("Authorization", &ann)]) {
            Ok(_) => true,
            Err(tungstenite::Error::Http(r)) if r.status() == 429 => false,
            Err(e) => panic!("neither accepted nor 429: {e}"),
        }
    });
    let total = engine.handle().metrics().total();
    assert!(total.rejected(ringcast::RejectReason::UserCap) >= 4);
    engine.stop().unwrap();
}

#[test]
fn forbidden_requests_are_not_charged_as_bad_requests() {
    let engine = start(auth_config());
    let mut c = client(engine.local_addr(), &token("ann"));
    // Well over pubsub.max_bad_requests (20): a denied topic is not a malformed request.
    for id in 0..30 {
        let body = if id % 2 == 0 {
            json!({"type": "publish", "id": id, "topic": "chat.bob", "data": 1})
        } else {
            json!({"type": "subscribe", "id": id, "topic": "secret.plans"})
        };
        expect_error(&mut c, id, "forbidden", body);
    }
    c.send_json(r#"{"type":"ping","id":99}"#);
    assert_eq!(c.recv(), Got::Pong(Some(99)));
    assert_eq!(engine.handle().metrics().total().bad_requests, 0);
    engine.stop().unwrap();
}

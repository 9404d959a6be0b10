//! Token auth in the broker, with real clients: every refusal's exact status and challenge,
//! the token read from each place it may be, HS256/RS256/ES256 keys from files, topic
//! permissions answered with `forbidden` (not a disconnect), expiry mid-connection, and the
//! per-user connection cap.

mod util;

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use ringcast::{Auth, Broker, Engine, EngineConfig};
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

/// Sends a request and returns the next message as JSON.
fn request(ws: &mut Client, body: Value) -> Value {
    ws.send(WsMessage::text(body.to_string())).unwrap();
    loop {
        match ws.read().expect("a reply") {
            WsMessage::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            WsMessage::Ping(_) | WsMessage::Pong(_) => continue,
            other => panic!("expected a reply, got {other:?}"),
        }
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
    let (mut ws, _) = connect_with(
        engine.local_addr(),
        "/",
        &[("Authorization", &bearer(&token("ann")))],
    )
    .unwrap();
    let denied = request(
        &mut ws,
        json!({"type": "subscribe", "id": 1, "topics": ["prices.BTC", "secret.plans"]}),
    );
    assert_eq!(denied["type"], "error");
    assert_eq!(denied["id"], 1);
    assert_eq!(denied["code"], "forbidden");
    assert!(denied["message"].as_str().unwrap().contains("secret.plans"));
    // All or nothing: prices.BTC was not subscribed either.
    let unsub = request(
        &mut ws,
        json!({"type": "unsubscribe", "id": 2, "topic": "prices.BTC"}),
    );
    assert_eq!(unsub["code"], "not_subscribed");
    let ok = request(
        &mut ws,
        json!({"type": "subscribe", "id": 3, "topics": ["prices.BTC", "news"]}),
    );
    assert_eq!((&ok["type"], &ok["id"]), (&json!("ack"), &json!(3)), "{ok}");
    let acked: Vec<&str> = ok["topics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["topic"].as_str().unwrap())
        .collect();
    assert_eq!(acked, ["prices.BTC", "news"]);
    let denied = request(
        &mut ws,
        json!({"type": "publish", "id": 4, "topic": "chat.bob", "data": 1}),
    );
    assert_eq!(
        (denied["code"].as_str(), denied["id"].as_i64()),
        (Some("forbidden"), Some(4))
    );
    let ok = request(
        &mut ws,
        json!({"type": "publish", "id": 5, "topic": "chat.ann", "data": 1}),
    );
    assert_eq!(
        (&ok["type"], &ok["id"], &ok["seq"]),
        (&json!("ack"), &json!(5), &json!(1)),
        "{ok}"
    );
    let pong = request(&mut ws, json!({"type": "ping", "id": 6}));
    assert_eq!(pong["type"], "pong");
    engine.stop().unwrap();
}

#[test]
fn a_token_that_expires_mid_connection_closes_it_with_1008() {
    let engine = start(auth_config());
    let short = sign(
        Algorithm::HS256,
        &json!({"sub": "ann", "exp": now() + 2, "subscribe": ["*"]}),
    );
    let (mut ws, _) = connect_with(
        engine.local_addr(),
        "/",
        &[("Authorization", &bearer(&short))],
    )
    .unwrap();
    let start = Instant::now();
    let mut id = 0;
    let close = loop {
        assert!(start.elapsed() < DEADLINE, "never closed");
        id += 1;
        ws.send(WsMessage::text(
            json!({"type": "ping", "id": id}).to_string(),
        ))
        .unwrap();
        match ws.read().unwrap() {
            WsMessage::Text(_) => {
                // Still valid: ask again a little later (bounded by DEADLINE above).
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            WsMessage::Close(Some(frame)) => break frame,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(u16::from(close.code), 1008);
    assert_eq!(close.reason.as_str(), "token expired");
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
    while ws.read().is_ok() {}
    drop(ws);
    wait_until("ann's place is free", || {
        connect_with(addr, "/", &[("Authorization", &ann)]).is_ok()
    });
    let total = engine.handle().metrics().total();
    assert!(total.rejected(ringcast::RejectReason::UserCap) >= 4);
    engine.stop().unwrap();
}

#[test]
fn forbidden_requests_are_not_charged_as_bad_requests() {
    let engine = start(auth_config());
    let (mut ws, _) = connect_with(
        engine.local_addr(),
        "/",
        &[("Authorization", &bearer(&token("ann")))],
    )
    .unwrap();
    // Well over pubsub.max_bad_requests (20): a denied topic is not a malformed request.
    for id in 0..30 {
        let body = if id % 2 == 0 {
            json!({"type": "publish", "id": id, "topic": "chat.bob", "data": 1})
        } else {
            json!({"type": "subscribe", "id": id, "topic": "secret.plans"})
        };
        let denied = request(&mut ws, body);
        assert_eq!(
            (denied["code"].as_str(), denied["id"].as_i64()),
            (Some("forbidden"), Some(id))
        );
    }
    let pong = request(&mut ws, json!({"type": "ping", "id": 99}));
    assert_eq!(pong["type"], "pong");
    assert_eq!(engine.handle().metrics().total().bad_requests, 0);
    engine.stop().unwrap();
}

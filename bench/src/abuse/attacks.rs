//! The attacks that speak the broker's protocol: each attacking connection on a thread of its
//! own sends requests in windows (send `window`, then read their answers), reconnecting when
//! the server closes it, until the attack's end.
//!
//! Bounded: every wait for an answer ends at [`ANSWER_TIMEOUT`] or the attack's end plus
//! [`GRACE`], every write at the client's write timeout, and a failed connection is retried
//! at most every [`RECONNECT_PAUSE`].

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};

use super::{
    client::{answer_kind, Got, JsonClient},
    report::Tally,
    AbuseConfig, Attack,
};

/// The longest an attacker waits for one answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long past the attack's end answers still in flight are awaited.
const GRACE: Duration = Duration::from_secs(1);
/// The pause before opening a connection again after one failed or was closed.
const RECONNECT_PAUSE: Duration = Duration::from_millis(50);
/// The replay attack's topic, which gets `replay_history` messages first.
pub(super) const REPLAY_TOPIC: &str = "abuse.replay";
/// The most entries of a replay subscribe that still fits under the request size limit
/// (33 bytes each; the default limit is about 1.4 MB).
const REPLAY_FITTING: usize = 30_000;

/// Messages of history each toggled topic gets first (64 topics: 640 publishes, within the
/// default publish burst), so each attach reads history.
const TOGGLE_HISTORY: usize = 10;

/// The toggling attack's topic `t`.
fn toggle_topic(t: usize) -> String {
    format!("abuse.toggle.{t}")
}

/// Source address of attacking connection `i`: 127.0.0.2 onwards, eight addresses in turn.
fn source(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 2 + (i % 8) as u8)
}

/// Runs `attack` (any but half-open) with `cfg.connections` connections until `end`.
pub(super) fn run(cfg: &AbuseConfig, attack: Attack, end: Instant) -> Result<Tally> {
    let mut tally = Tally::default();
    // At the topic cap (after the floods) the topics may not be made: the attack still
    // runs, and the failure shows in the report.
    let filled = match attack {
        Attack::Replay => fill_history(cfg, &[REPLAY_TOPIC.to_owned()], cfg.replay_history),
        Attack::Toggle => fill_history(
            cfg,
            &(0..cfg.toggle_topics).map(toggle_topic).collect::<Vec<_>>(),
            TOGGLE_HISTORY,
        ),
        _ => Ok(()),
    };
    if let Err(e) = filled {
        tally.fail(&e.context("giving the attack's topics history"));
    }
    let threads: Vec<_> = (0..cfg.connections)
        .map(|i| {
            let cfg = cfg.clone();
            thread::spawn(move || attacker(&cfg, attack, i, end))
        })
        .collect();
    for t in threads {
        match t.join() {
            Ok(part) => tally.merge(part),
            Err(_) => bail!("an attacker thread panicked"),
        }
    }
    Ok(tally)
}

/// The requests of attacking connection `conn`: request `k` of its run.
fn request(cfg: &AbuseConfig, attack: Attack, conn: usize, k: u64) -> String {
    match attack {
        Attack::SubFlood => {
            // Subscribe a batch of new names, then unsubscribe the same batch.
            let batch = k / 2;
            let names: Vec<String> = (0..cfg.flood_batch as u64)
                .map(|j| {
                    format!(
                        "\"abuse.flood.{conn}.{}\"",
                        batch * cfg.flood_batch as u64 + j
                    )
                })
                .collect();
            let kind = if k % 2 == 0 {
                "subscribe"
            } else {
                "unsubscribe"
            };
            format!(
                r#"{{"type":"{kind}","id":{k},"topics":[{}]}}"#,
                names.join(",")
            )
        }
        Attack::PublishNew => {
            format!(r#"{{"type":"publish","id":{k},"topic":"abuse.new.{conn}.{k}","data":{k}}}"#)
        }
        Attack::Replay => {
            // The huge one (over the size limit by default), one that fits, then leave.
            let repeats = match k % 3 {
                0 => cfg.replay_repeats,
                1 => cfg.replay_repeats.min(REPLAY_FITTING),
                _ => {
                    return format!(r#"{{"type":"unsubscribe","id":{k},"topic":"{REPLAY_TOPIC}"}}"#)
                }
            };
            let mut s = String::with_capacity(repeats * 34 + 64);
            let _ = write!(s, r#"{{"type":"subscribe","id":{k},"topics":["#);
            for r in 0..repeats {
                if r > 0 {
                    s.push(',');
                }
                let _ = write!(s, r#"{{"topic":"{REPLAY_TOPIC}","since":0}}"#);
            }
            s.push_str("]}");
            s
        }
        Attack::Toggle => {
            let kind = if k % 3 == 2 {
                "unsubscribe"
            } else {
                "subscribe"
            };
            let topics: Vec<String> = (0..cfg.toggle_topics)
                .map(|t| {
                    if kind == "subscribe" {
                        format!(r#"{{"topic":"{}","since":0}}"#, toggle_topic(t))
                    } else {
                        format!("\"{}\"", toggle_topic(t))
                    }
                })
                .collect();
            format!(
                r#"{{"type":"{kind}","id":{k},"topics":[{}]}}"#,
                topics.join(",")
            )
        }
        Attack::Nesting => {
            let depth = cfg.nest_depth;
            let mut s = String::with_capacity(2 * depth + 64);
            let _ = write!(
                s,
                r#"{{"type":"publish","id":{k},"topic":"abuse.nest","data":"#
            );
            s.push_str(&"[".repeat(depth));
            s.push_str(&"]".repeat(depth));
            s.push('}');
            s
        }
        Attack::HalfOpen => unreachable!("half-open does not speak the protocol"),
    }
}

/// Requests one connection keeps in flight for `attack`.
fn window(cfg: &AbuseConfig, attack: Attack) -> u64 {
    match attack {
        Attack::SubFlood | Attack::PublishNew => cfg.window.max(1) as u64,
        // One cycle (subscribe, subscribe, unsubscribe / huge, fitting, unsubscribe).
        Attack::Toggle | Attack::Replay => 3,
        Attack::Nesting | Attack::HalfOpen => 1,
    }
}

/// One attacking connection's loop: open, send windows of requests and count their answers,
/// reopen when closed, until `end`.
fn attacker(cfg: &AbuseConfig, attack: Attack, conn: usize, end: Instant) -> Tally {
    let mut tally = Tally::default();
    let mut k = 0u64;
    while Instant::now() < end {
        let mut client = match JsonClient::open(&cfg.target, source(conn), cfg.open_timeout) {
            Ok(c) => c,
            Err(e) => {
                tally.fail(&e);
                thread::sleep(RECONNECT_PAUSE);
                continue;
            }
        };
        if let Err(e) = windows(cfg, attack, conn, end, &mut client, &mut k, &mut tally) {
            tally.fail(&e);
        }
        if Instant::now() < end {
            thread::sleep(RECONNECT_PAUSE);
        }
    }
    tally
}

/// Sends windows of requests on `client` until `end` or until the server closes it.
fn windows(
    cfg: &AbuseConfig,
    attack: Attack,
    conn: usize,
    end: Instant,
    client: &mut JsonClient,
    k: &mut u64,
    tally: &mut Tally,
) -> Result<()> {
    let window = window(cfg, attack);
    while Instant::now() < end {
        for _ in 0..window {
            client.send(&request(cfg, attack, conn, *k))?;
            *k += 1;
            tally.sent += 1;
        }
        let mut awaiting = window;
        while awaiting > 0 {
            let deadline = (Instant::now() + ANSWER_TIMEOUT).min(end + GRACE);
            match client.recv(deadline)? {
                Some(got @ Got::Closed(..)) => {
                    if let Some(kind) = answer_kind(&got) {
                        tally.answer(&kind);
                    }
                    return Ok(());
                }
                Some(got) => {
                    if let Some(kind) = answer_kind(&got) {
                        tally.answer(&kind);
                        awaiting -= 1;
                    }
                }
                None => {
                    if Instant::now() < end {
                        // A request went unanswered for ANSWER_TIMEOUT.
                        for _ in 0..awaiting {
                            tally.answer("no answer");
                        }
                    }
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

/// Publishes `per_topic` messages to each of `topics` (within the default publish burst, for
/// the defaults), so each subscribe with `since: 0` has that much to replay.
fn fill_history(cfg: &AbuseConfig, topics: &[String], per_topic: usize) -> Result<()> {
    let mut c = JsonClient::open(&cfg.target, source(0), cfg.open_timeout)?;
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    let mut id = 0u64;
    for topic in topics {
        for chunk_start in (0..per_topic).step_by(100) {
            let n = 100.min(per_topic - chunk_start);
            for i in 0..n {
                id += 1;
                c.send(&format!(
                    r#"{{"type":"publish","id":{id},"topic":"{topic}","data":"history {}"}}"#,
                    chunk_start + i
                ))?;
            }
            let mut got = 0;
            while got < n {
                match c.recv(deadline)? {
                    Some(Got::Json(v)) if v["type"] == "ack" => got += 1,
                    Some(Got::Json(v)) if v["type"] == "error" => bail!("{topic}: {v}"),
                    Some(Got::Closed(code, reason)) => bail!("closed {code:?} {reason}"),
                    Some(Got::Json(_)) => {}
                    None => bail!("{topic}: {got} of {n} publishes acked, then none"),
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::Target;

    fn cfg() -> AbuseConfig {
        AbuseConfig::new(Target::parse("ws://127.0.0.1:9/").unwrap())
    }

    fn json(s: &str) -> serde_json::Value {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn the_replay_cycle_is_one_request_over_the_size_limit_one_under_then_leave() {
        let cfg = cfg();
        let huge = request(&cfg, Attack::Replay, 0, 0);
        assert!(huge.len() > 3_000_000, "{}", huge.len());
        assert_eq!(json(&huge)["topics"].as_array().unwrap().len(), 100_000);
        let fitting = request(&cfg, Attack::Replay, 0, 1);
        // Under the default limit on a request: 1 MiB in base64 plus 64 KiB.
        assert!(
            fitting.len() < (1 << 20) * 4 / 3 + 65_536,
            "{}",
            fitting.len()
        );
        let v = json(&fitting);
        assert_eq!(v["topics"][29_999]["topic"], REPLAY_TOPIC);
        assert_eq!(v["topics"][29_999]["since"], 0);
        assert_eq!(
            json(&request(&cfg, Attack::Replay, 0, 2))["type"],
            "unsubscribe"
        );
    }

    #[test]
    fn the_sub_flood_names_new_topics_and_unsubscribes_each_batch() {
        let cfg = cfg();
        let sub = json(&request(&cfg, Attack::SubFlood, 3, 2));
        let unsub = json(&request(&cfg, Attack::SubFlood, 3, 3));
        assert_eq!(sub["type"], "subscribe");
        assert_eq!(unsub["type"], "unsubscribe");
        assert_eq!(sub["topics"], unsub["topics"]);
        assert_eq!(sub["topics"][0], "abuse.flood.3.64");
        let next = json(&request(&cfg, Attack::SubFlood, 3, 4));
        assert_eq!(next["topics"][0], "abuse.flood.3.128");
    }

    #[test]
    fn the_toggle_cycle_subscribes_twice_with_since_then_unsubscribes() {
        let cfg = cfg();
        let kinds: Vec<_> = (0..3)
            .map(|k| json(&request(&cfg, Attack::Toggle, 0, k)))
            .collect();
        assert_eq!(kinds[0]["type"], "subscribe");
        assert_eq!(kinds[1]["type"], "subscribe");
        assert_eq!(kinds[0]["topics"][63]["since"], 0);
        assert_eq!(kinds[2]["type"], "unsubscribe");
        assert_eq!(kinds[2]["topics"][63], "abuse.toggle.63");
    }

    #[test]
    fn the_nesting_payload_nests_as_deep_as_asked() {
        let mut cfg = cfg();
        cfg.nest_depth = 5;
        let r = request(&cfg, Attack::Nesting, 0, 7);
        assert!(r.ends_with(r#""data":[[[[[]]]]]}"#), "{r}");
        assert_eq!(json(&r)["id"], 7);
    }
}

//! Running out of file descriptors: the server (a real `ringcast` process under a low
//! `ulimit -n`) backs off, counts, logs once, and serves the waiting clients once descriptors
//! free up. A child process, because the limit is per process.

mod util;

use std::{sync::mpsc, thread, time::Duration};

use tungstenite::Message as WsMessage;
use util::*;

/// `ringcast serve --echo --shards 1` with `ulimit -n` set to `nofile`, listening.
fn start(nofile: u32) -> Server {
    let serve = Server::command(&["--echo", "--shards", "1"]);
    Server::spawn(after_shell(&format!("ulimit -n {nofile}"), &serve))
}

#[test]
fn out_of_descriptors_backs_off_logs_once_and_recovers() {
    // 64 descriptors: stdio, the ring, epoll, eventfd and listener take a handful; the rest
    // are connections.
    let server = start(64);
    let addr = server.addr;
    let mut clients = Vec::new();
    // Upgrade clients until one hangs in the backlog (bounded: never more than 100).
    let (tx, rx) = mpsc::channel();
    let mut waiting = Vec::new();
    for i in 0..100 {
        let tx = tx.clone();
        let handle = thread::spawn(move || {
            let result = connect_with(addr, "/", &[]);
            let _ = tx.send(i);
            result
        });
        // A client counts as waiting only once the server has said it is out of
        // descriptors; a merely slow upgrade is waited for.
        let mut upgraded = rx.recv_timeout(Duration::from_millis(300)).is_ok();
        if !upgraded && !server.log().contains("accept paused with back-off") {
            upgraded = rx.recv_timeout(DEADLINE).is_ok();
        }
        if upgraded {
            clients.push(handle.join().unwrap().expect("upgrade").0);
        } else {
            waiting.push(handle);
            if waiting.len() == 5 {
                break;
            }
        }
    }
    assert_eq!(waiting.len(), 5, "the server never ran out of descriptors");
    assert!(
        clients.len() > 40,
        "only {} connections before EMFILE",
        clients.len()
    );
    // The clients served so far still work.
    for ws in clients.iter_mut().take(3) {
        ws.send(WsMessage::text("still here")).unwrap();
        assert_eq!(ws.read().unwrap(), WsMessage::text("still here"));
    }
    // Free ten descriptors: the five waiting clients get in.
    for mut ws in clients.drain(..10) {
        ws.close(None).unwrap();
        while ws.read().is_ok() {}
    }
    for handle in waiting {
        let (mut ws, _) = handle
            .join()
            .unwrap()
            .expect("upgrade after descriptors freed");
        ws.send(WsMessage::text("in")).unwrap();
        assert_eq!(ws.read().unwrap(), WsMessage::text("in"));
    }
    // Logged once per episode: a warning when accepts start failing, then nothing however
    // often they fail, until one succeeds ("accepting again", with the count). The ten
    // descriptors are freed one close at a time, and on a loaded machine the server may
    // take each as it comes and run out again in between: a new episode, a new warning, but
    // never two warnings in a row, and at most one episode per waiting client.
    let episodes = wait_for("every episode to end", || {
        let events: Vec<Event> = server.log_lines().iter().filter_map(|l| event(l)).collect();
        (events.last() != Some(&Event::Paused)).then_some(events)
    });
    let log = server.log();
    assert!(episodes.len() >= 2, "no episode: {log}");
    for (i, pair) in episodes.chunks(2).enumerate() {
        assert!(
            matches!(pair, [Event::Paused, Event::Again(_)]),
            "episode {i}: {pair:?} in {log}"
        );
    }
    assert!(
        episodes.len() / 2 <= 5,
        "more episodes than waiting clients: {log}"
    );
    // The first episode lasted the whole search for five waiting clients, hundreds of
    // milliseconds of back-off: many failures, one warning.
    assert!(
        matches!(episodes[1], Event::Again(failures) if failures > 1),
        "{log}"
    );
}

#[derive(Debug, PartialEq, Eq)]
enum Event {
    /// "accept paused with back-off": an episode starts.
    Paused,
    /// "accepting again", with the failures the episode counted.
    Again(u64),
}

fn event(line: &str) -> Option<Event> {
    if line.contains("accept paused with back-off") {
        return Some(Event::Paused);
    }
    if !line.contains("accepting again") {
        return None;
    }
    let failures = line
        .split("failures=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no failures=N in {line:?}"));
    Some(Event::Again(failures))
}

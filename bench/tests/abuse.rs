//! `loadgen abuse` against the real `ringcast serve` binary: every attack briefly, with the
//! server's limits set low enough that each attack meets its refusal within a second or two.
//!
//! The binary is the one cargo built next to `loadgen` (`cargo test --workspace` builds it;
//! alone, run `cargo build -p ringcast-cli` first), or `RINGCAST_BIN`.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Output},
};

use ringcast_testkit::{
    free_port,
    process::{wait_accepting, Spawned},
};
use serde_json::Value;

/// The `ringcast` binary to run.
fn ringcast_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("RINGCAST_BIN") {
        return bin.into();
    }
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_loadgen")).with_file_name("ringcast");
    assert!(
        bin.is_file(),
        "{} is missing: `cargo build -p ringcast-cli` (or set RINGCAST_BIN)",
        bin.display()
    );
    bin
}

/// `ringcast serve --shards 2` with small limits: 400 topics, 20 unfinished upgrades per
/// address, a 500 ms handshake timeout. Killed when dropped.
fn serve() -> (Spawned, SocketAddr) {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut command = Command::new(ringcast_bin());
    command
        .args(["serve", "--shards", "2", "--listen", &addr.to_string()])
        .args(["--set", "pubsub.max_topics=400"])
        .args(["--set", "admission.max_pending_handshakes_per_ip=20"])
        .args(["--set", "timeouts.handshake_timeout=\"500ms\""]);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("RINGCAST") {
            command.env_remove(name);
        }
    }
    let server = Spawned::start(command);
    wait_accepting(addr);
    (server, addr)
}

/// Runs `loadgen --quiet abuse --url ws://ADDR/ ARGS --json`; the run bounds itself.
fn loadgen_abuse(addr: SocketAddr, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args([
            "--quiet",
            "abuse",
            "--url",
            &format!("ws://{addr}/"),
            "--json",
        ])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn every_attack_meets_its_refusal_while_the_live_client_keeps_its_rounds() {
    let (server, addr) = serve();
    let pid = server.id().to_string();
    // Replay and toggle first: at the topic cap (after the floods) their topics could not be
    // made. The live client's limit is loose: this is a debug build on a shared machine; the
    // gate itself is the next test's.
    let attacks = "replay,toggle,sub-flood,publish-new,half-open,nesting";
    let out = loadgen_abuse(
        addr,
        &[
            "--attacks",
            attacks,
            "--duration",
            "1.5",
            "--connections",
            "4",
            "--halfopen-conns",
            "200",
            "--halfopen-sources",
            "2",
            "--dribble-every",
            "0.1",
            // 20 KB, still 10,000 levels past the limit of 64, lighter for a debug client.
            "--nest-depth",
            "10000",
            "--max-rtt",
            "30",
            "--server-pid",
            &pid,
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(&stdout).unwrap();
    let rows = report["attacks"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["attack"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "baseline",
            "replay",
            "toggle",
            "sub-flood",
            "publish-new",
            "half-open",
            "nesting"
        ]
    );
    for row in rows {
        let name = row["attack"].as_str().unwrap();
        let answers = &row["tally"]["answers"];
        let count = |kind: &str| answers[kind].as_u64().unwrap_or(0);
        // The server's own count of the same refusals, from /metrics over the attack.
        let server = |name: &str| row["server"][format!("{name} +")].as_f64().unwrap_or(0.0);
        // Rounds through every attack. A debug build on a loaded machine stalls for a second or
        // more in replay and nesting (RESULTS.md has the release figures), so no more here.
        assert!(row["live"]["ok"].as_u64().unwrap() >= 1, "{name}: {row}");
        assert!(
            row["server_rss_mb"].as_f64().unwrap() > 0.0,
            "{name}: {row}"
        );
        if name == "baseline" {
            assert_eq!(row["live"]["failed"], 0, "{row}");
            continue;
        }
        assert!(row["refusals"].as_u64().unwrap() > 0, "{name}: {row}");
        match name {
            "replay" => {
                assert!(count("too_large") > 0, "{row}");
                assert!(server("bad_requests_total") > 0.0, "{row}");
            }
            "sub-flood" => {
                assert!(count("rate_limited") > 0, "{row}");
                assert!(server("subscribes_refused_total") > 0.0, "{row}");
            }
            "publish-new" => {
                assert!(count("too_many_topics") > 0, "{row}");
                assert!(server("topics_refused_total") > 0.0, "{row}");
                assert_eq!(row["server"]["topics"], 400.0, "at the cap: {row}");
            }
            "half-open" => {
                // 100 per address over a cap of 20: refused at accept; the rest time out.
                assert!(count("http 429") > 0, "{row}");
                assert!(count("http 408") > 0, "{row}");
                assert!(
                    server("upgrade_rejections_total{pending_ip_cap}") > 0.0,
                    "{row}"
                );
                assert!(server("handshake_timeouts_total") > 0.0, "{row}");
            }
            "nesting" => {
                assert!(count("bad_payload") > 0, "{row}");
                assert!(server("bad_requests_total") > 0.0, "{row}");
            }
            _ => {}
        }
    }
    // About 20 rounds a second over some 15 s of attacks (198 in a debug run at load 12).
    let rounds: u64 = rows.iter().map(|r| r["live"]["ok"].as_u64().unwrap()).sum();
    assert!(rounds >= 60, "{rounds} live rounds: {stdout}");
    assert!(
        server.log().lines().all(|l| !l.contains("panicked")),
        "{}",
        server.log()
    );
}

#[test]
fn a_live_client_slower_than_max_rtt_fails_the_run() {
    let (_server, addr) = serve();
    let out = loadgen_abuse(
        addr,
        &[
            "--attacks",
            "nesting",
            "--duration",
            "0.3",
            "--connections",
            "1",
            "--max-rtt",
            "0.000001",
        ],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("worst round trip"), "{stderr}");
    // The report is printed all the same.
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["attacks"][1]["attack"], "nesting");
}

#[test]
fn an_unknown_attack_is_refused_by_name() {
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args([
            "abuse",
            "--url",
            "ws://127.0.0.1:9/",
            "--attacks",
            "sub-flood,bogus",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown attack \"bogus\""), "{stderr}");
}

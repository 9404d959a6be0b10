//! The `ringcast` binary as a user runs it.

use std::process::Command;

fn ringcast(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ringcast"))
        .args(args)
        .env_remove("RINGCAST_CONFIG")
        .output()
        .unwrap()
}

#[test]
fn config_prints_the_effective_settings_with_flags_applied() {
    let out = ringcast(&["config", "--shards", "3", "--driver", "epoll"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("shards = 3"), "{text}");
    assert!(text.contains("driver = \"epoll\""), "{text}");
    assert!(text.contains("listen = \"127.0.0.1:9000\""), "{text}");
    // What it prints is a valid config file.
    ringcast::EngineConfig::from_toml(&text).unwrap();
}

#[test]
fn a_config_file_with_an_unknown_key_is_refused_naming_it() {
    let dir = std::env::temp_dir().join(format!("ringcast-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(&file, "[limits]\nmax_frame_byte = 10\n").unwrap();
    let out = ringcast(&["config", "--config", file.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("max_frame_byte"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn serve_refuses_an_address_in_use() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = holder.local_addr().unwrap().to_string();
    let out = ringcast(&["serve", "--listen", &addr]);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("cannot listen"), "{err}");
}

fn json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn capacity_prints_hosts_per_limit_as_text_and_json() {
    let args = [
        "capacity",
        "--users",
        "2000000",
        "--shards-per-host",
        "8",
        "--ram-gib",
        "32",
        "--msgs-per-sec",
        "20000",
        "--fanout",
        "100",
    ];
    let out = ringcast(&args);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("hosts needed: 4 (binding: config)"), "{text}");

    let out = ringcast(&[&args[..], &["--json"]].concat());
    assert!(out.status.success(), "{out:?}");
    let estimate = json(&out);
    assert_eq!(estimate["hosts"], 4);
    assert_eq!(estimate["binding"], "config");
    assert_eq!(estimate["limits"][2]["hosts"], 3);

    let out = ringcast(&[
        "capacity",
        "--users",
        "1",
        "--shards-per-host",
        "0",
        "--ram-gib",
        "1",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("shards_per_host"), "{err}");
}

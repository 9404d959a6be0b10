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

/// The key lines of a `ringcast config` output (live or commented out), each with the comment
/// line above it.
fn documented_keys(text: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut keys = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let key_line = line.strip_prefix("# ").filter(|l| l.ends_with("(unset)"));
        let Some((key, _)) = key_line.unwrap_or(line).split_once(" = ") else {
            continue;
        };
        if key.starts_with('#') {
            continue; // a comment that happens to hold " = "
        }
        let comment = i
            .checked_sub(1)
            .and_then(|j| lines[j].strip_prefix("# "))
            .unwrap_or_else(|| panic!("no comment above {line:?}"));
        keys.push((key.to_owned(), comment.to_owned()));
    }
    keys
}

#[test]
fn config_prints_every_key_commented_with_shards_resolved_and_loads_back() {
    let out = ringcast(&["config", "--set", "limits.max_frame_bytes=65536"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    // The count in effect: one per CPU, never 0.
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert!(
        text.contains(&format!(
            "\nshards = {cpus}  # 0 in the config: one per CPU\n"
        )),
        "{text}"
    );
    // Every key of every section, with a comment saying what it is; optional keys without
    // a value as commented-out lines (TOML has no null).
    let keys = documented_keys(&text);
    let all = toml::Table::try_from(ringcast::EngineConfig::default()).unwrap();
    let expected: usize = all
        .values()
        .map(|v| match v {
            toml::Value::Table(t) => t.len(),
            _ => 1,
        })
        .sum::<usize>()
        + 3; // auth.*_file: unset, so absent from the serialized form
    assert_eq!(keys.len(), expected, "{keys:#?}");
    for (key, comment) in &keys {
        assert!(comment.len() > 10, "{key}: {comment:?}");
    }
    let comment = |name: &str| &keys.iter().find(|(k, _)| k == name).unwrap().1;
    assert!(
        comment("max_frame_bytes").contains("Default 16 MiB"),
        "{keys:#?}"
    );
    assert!(comment("hs256_secret_file").contains("HS256"), "{keys:#?}");
    assert!(
        text.contains("\n# hs256_secret_file = \"\"  (unset)\n"),
        "{text}"
    );
    assert!(!text.contains("](crate::"), "rustdoc links: {text}");

    // Loaded back, it is the same config (shards resolved), and prints the same again.
    let loaded = ringcast::EngineConfig::from_toml(&text).unwrap();
    let mut expected = ringcast::EngineConfig::default().with_shards(cpus);
    expected.limits.max_frame_bytes = 65536;
    assert_eq!(loaded, expected);
    let dir = std::env::temp_dir().join(format!("ringcast-cli-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("printed.toml");
    std::fs::write(&file, &text).unwrap();
    let again = ringcast(&["config", "--config", file.to_str().unwrap()]);
    assert!(again.status.success(), "{again:?}");
    let again = String::from_utf8(again.stdout).unwrap();
    assert_eq!(again, text.replace("  # 0 in the config: one per CPU", ""));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn config_never_prints_the_redis_password() {
    let out = ringcast(&["config", "--broker", "redis://app:hunter2@127.0.0.1:6379/0"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.contains("hunter2"), "{text}");
    assert!(
        text.contains("url = \"redis://app:REDACTED@127.0.0.1:6379/0\"  # password redacted"),
        "{text}"
    );
}

#[test]
fn any_key_is_set_by_environment_or_flag_and_flags_win() {
    let out = Command::new(env!("CARGO_BIN_EXE_ringcast"))
        .args([
            "config",
            "--set",
            "timeouts.drain_window=3s",
            "--set",
            "admission.allowed_origins=[\"https://a.example\"]",
        ])
        .env_remove("RINGCAST_CONFIG")
        .env("RINGCAST__TIMEOUTS__DRAIN_WINDOW", "1s")
        .env("RINGCAST__ADMISSION__MAX_CONNECTIONS_PER_IP", "7")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config =
        ringcast::EngineConfig::from_toml(&String::from_utf8(out.stdout).unwrap()).unwrap();
    assert_eq!(
        config.timeouts.drain_window,
        std::time::Duration::from_secs(3)
    );
    assert_eq!(config.admission.max_connections_per_ip, 7);
    assert_eq!(config.admission.allowed_origins, ["https://a.example"]);
    let out = Command::new(env!("CARGO_BIN_EXE_ringcast"))
        .args(["config"])
        .env_remove("RINGCAST_CONFIG")
        .env("RINGCAST__LIMITS__MAX_FRAME_BYTE", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("max_frame_byte"), "{err}");
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

/// A fixture host of the doctor's tests (`tuning/tests/fixtures`, shared with them).
fn fixture(name: &str) -> String {
    format!(
        "{}/../tuning/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

fn json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn doctor_exit_status_says_whether_the_target_fits() {
    let tight = fixture("tight");
    let out = ringcast(&["doctor", "--root", &tight, "--json", "--target", "100000"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let report = json(&out);
    assert_eq!(report["fits"], false);
    assert_eq!(report["binding"], "file-descriptors");

    let out = ringcast(&["doctor", "--root", &tight, "--json", "--target", "900"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(json(&out)["fits"], true);

    // Text for people, same verdict.
    let out = ringcast(&["doctor", "--root", &tight, "--target", "100000"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("does NOT fit 100,000"), "{text}");
}

#[test]
fn doctor_latency_says_whether_latency_mode_has_what_it_needs() {
    let out = ringcast(&[
        "doctor",
        "--latency",
        "--root",
        &fixture("latency-tuned"),
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let report = json(&out);
    assert_eq!(report["ready"], true);
    assert_eq!(report["spin_cores"], serde_json::json!([2, 3, 4, 5, 6, 7]));

    let out = ringcast(&["doctor", "--latency", "--root", &fixture("latency-untuned")]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("not ready for latency mode"), "{text}");
    assert!(text.contains("[FIX] irq-affinity"), "{text}");

    // A target is a question for the capacity doctor, not this one.
    let out = ringcast(&["doctor", "--latency", "--target", "10"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn doctor_uses_the_effective_config_and_defaults_the_target_to_its_cap() {
    // Without --target: 16 cores x 65,536 connections per shard.
    let out = ringcast(&["doctor", "--root", &fixture("tuned"), "--json"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let report = json(&out);
    assert_eq!(report["target"]["connections"], 1_048_576);
    assert_eq!(report["binding"], "config");

    let no_uring = fixture("no-io-uring");
    let out = ringcast(&["doctor", "--root", &no_uring, "--target", "10000"]);
    assert_eq!(out.status.code(), Some(1));
    let out = ringcast(&[
        "doctor", "--root", &no_uring, "--target", "10000", "--driver", "epoll", "--shards", "2",
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("driver epoll, 2 shards (from config)"),
        "{text}"
    );

    let out = ringcast(&[
        "doctor",
        "--root",
        &fixture("tuned"),
        "--outbound",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(json(&out)["binding"], "ports");
}

#[test]
fn doctor_on_a_missing_root_fails_saying_why() {
    let out = ringcast(&["doctor", "--root", "/nonexistent/ringcast-host"]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("/nonexistent/ringcast-host"), "{err}");
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
    // CPU: 1 delivery per connection per second, one send each (3,790 ns, not the batched
    // 196 ns): 20,000 x 3,840 ns + 2,000,000 x 3,790 ns = 7.66 cores of 4 per host.
    assert_eq!(estimate["limits"][2]["constraint"], "cpu");
    assert_eq!(estimate["limits"][2]["hosts"], 2);
    assert_eq!(estimate["cpu_nanos_per_delivery"], 3_790.0);
    assert!(text.contains("196 to 3790 ns per delivery"), "{text}");

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

//! `loadgen compare` with servers given on its command line (`--peer`): the real binary, with
//! the in-repo tokio-tungstenite peers standing in for an external server, on loopback, one
//! short round each; then `loadgen plot-latency` on the report it saved.

use std::{fs, process::Command};

use serde_json::Value;

fn loadgen() -> Command {
    Command::new(env!("CARGO_BIN_EXE_loadgen"))
}

/// The servers of each scenario in a compare report, by name.
fn server<'a>(report: &'a Value, scenario: &str, name: &str) -> &'a Value {
    report["scenarios"]
        .as_array()
        .expect("scenarios")
        .iter()
        .find(|s| s["scenario"] == scenario)
        .unwrap_or_else(|| panic!("no {scenario} in {report:#}"))["servers"]
        .as_array()
        .expect("servers")
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {scenario}: {report:#}"))
}

#[test]
fn peers_from_the_command_line_run_beside_the_built_in_servers() {
    let echo = env!("CARGO_BIN_EXE_peer-tokio-tungstenite");
    let broadcast = env!("CARGO_BIN_EXE_peer-tokio-tungstenite-broadcast");
    let out = loadgen()
        .args([
            "compare",
            "--servers",
            "tokio-tungstenite",
            "--peer",
            &format!("mine@echo={echo} --listen 127.0.0.1:{{port}}"),
            "--peer",
            &format!("mine@broadcast={broadcast} --listen 127.0.0.1:{{port}}"),
            "--peer",
            &format!("echo-only@echo={echo} --listen 127.0.0.1:{{port}}"),
            "--scenario",
            "echo,fanout",
            "--echo-loads",
            "4x20",
            "--fanout-loads",
            "5x64@500",
            "--fanout-procs",
            "2",
            "--duration",
            "0.5",
            "--warmup",
            "0.2",
            "--rounds",
            "1",
            "--retries",
            "0",
            "--max-other-cpu",
            "2",
            "--base-port",
            "19400",
            "--json",
        ])
        .output()
        .expect("loadgen runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON report");

    for name in ["tokio-tungstenite", "mine", "echo-only"] {
        let echo = server(&report, "echo", name);
        assert!(echo["skipped"].is_null(), "{echo:#}");
        assert!(echo["rate"]["median"].as_f64().unwrap() > 0.0, "{echo:#}");
        assert!(echo["cpu_us"]["median"].as_f64().unwrap() > 0.0, "{echo:#}");
    }
    // The fan-out runs against the broadcast command, with percentiles to the maximum.
    let fanout = server(&report, "fanout", "mine");
    assert_eq!(fanout["rounds"].as_array().unwrap().len(), 1, "{fanout:#}");
    assert!(fanout["rounds"][0]["spin"].as_bool().unwrap(), "{fanout:#}");
    assert_eq!(fanout["rounds"][0]["procs"], 2, "{fanout:#}");
    assert!(
        fanout["rate"]["median"].as_f64().unwrap() > 0.0,
        "{fanout:#}"
    );
    let p99 = fanout["p99_us"]["median"].as_f64().unwrap();
    let max = fanout["max_us"]["median"].as_f64().unwrap();
    assert!(p99 > 0.0 && max >= p99, "{fanout:#}");
    plots_are_drawn_from_the_saved_report(&out.stdout);
    // A peer whose command serves echo only is skipped elsewhere, saying why.
    let skipped = server(&report, "fanout", "echo-only");
    assert!(
        skipped["skipped"]
            .as_str()
            .is_some_and(|s| s.contains("no fanout server for echo-only")),
        "{skipped:#}"
    );
}

/// `loadgen plot-latency` on the report saved twice under two labels: one latency and one
/// throughput SVG per echo and fan-out load, each naming every server of both.
fn plots_are_drawn_from_the_saved_report(json: &[u8]) {
    let dir = std::env::temp_dir().join(format!("ringcast-plot-latency-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let report = dir.join("compare.json");
    fs::write(&report, json).unwrap();
    let out = loadgen()
        .arg("plot-latency")
        .arg(format!("spin={}", report.display()))
        .arg(format!("again={}", report.display()))
        .arg("--out")
        .arg(dir.join("plots"))
        .output()
        .expect("loadgen runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut names: Vec<String> = fs::read_dir(dir.join("plots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "echo-4x20-latency.svg",
            "echo-4x20-throughput.svg",
            "fanout-5x64@500-latency.svg",
            "fanout-5x64@500-throughput.svg"
        ]
    );
    for name in &names {
        let svg = fs::read_to_string(dir.join("plots").join(name)).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
            "{name}"
        );
        assert_eq!(svg.matches("<svg").count(), 1, "{name}");
        assert!(svg.contains("<polyline"), "{name}: no line drawn");
        let servers: &[&str] = if name.starts_with("echo") {
            &["tokio-tungstenite", "mine", "echo-only"]
        } else {
            &["mine"]
        };
        for server in servers {
            for label in ["spin", "again"] {
                assert!(
                    svg.contains(&format!("{label}: {server}")),
                    "{name}: {label}: {server}"
                );
            }
        }
    }
    // A file that is not a compare report is refused.
    let out = loadgen()
        .arg("plot-latency")
        .arg(dir.join("plots/echo-4x20-latency.svg"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn bad_peers_are_refused_with_the_reason() {
    for (peer, why) in [
        ("nameless", "expected NAME=CMD"),
        ("x@storm=srv {port}", "unknown scenario"),
        ("ringcast=srv {port}", "built-in server"),
        ("x=srv --listen 127.0.0.1:9000", "{port}"),
    ] {
        let out = loadgen()
            .args(["compare", "--peer", peer, "--rounds", "1"])
            .output()
            .expect("loadgen runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{peer}: {stderr}");
        assert!(stderr.contains(why), "{peer}: {stderr}");
    }
}

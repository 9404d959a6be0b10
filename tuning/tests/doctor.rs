//! `ringcast doctor` against fixture hosts: `tests/fixtures/{tight,tuned,no-io-uring}` hold the
//! `/proc` and `/sys` files it reads. Every expected number is worked out by hand in a comment
//! from the fixture's values and the measured costs.

use std::path::{Path, PathBuf};

use ringcast::{Driver, EngineConfig};
use ringcast_tuning::doctor::{self, Host, IoUring, KernelVersion, Target};
use serde_json::{json, Value};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn report_json(host: &str, config: &EngineConfig, target: Target) -> Value {
    let report = doctor::run(&fixture(host), config, target).unwrap();
    serde_json::to_value(&report).unwrap()
}

/// Per-shard fixed memory with the default io_uring config: 1024 receive buffers x (4096 B +
/// a 16 B ring entry) + 2 rings x 1024 entries x 100 B.
const FIXED_BYTES_PER_SHARD: u64 = 1024 * (4096 + 16) + 2 * 1024 * 100;

#[test]
fn tight_host_is_bound_by_open_files_with_fixes_for_each_shortfall() {
    let r = report_json("tight", &EngineConfig::default(), Target::inbound(100_000));

    assert_eq!(
        r["target"],
        json!({"connections": 100_000, "outbound": false})
    );
    assert_eq!(r["fits"], false);
    assert_eq!(r["binding"], "file-descriptors");
    // Soft limit 1024 - (16 for the process + 2 shards x 6).
    assert_eq!(r["max_connections"], 996);
    assert_eq!(r["io_uring"], "available");

    let h = &r["host"];
    assert_eq!(h["root"], fixture("tight").to_str().unwrap());
    assert_eq!(h["kernel"], "6.1.0-18-amd64");
    assert_eq!(h["kernel_version"], json!({"major": 6, "minor": 1}));
    assert_eq!(h["io_uring_disabled"], 0);
    assert_eq!(h["nofile"], json!({"soft": 1024, "hard": 4096}));
    assert_eq!(h["memlock"], json!({"soft": 65536, "hard": 65536}));
    assert_eq!(h["nr_open"], 1_048_576);
    assert_eq!(h["file_max"], 9_223_372_036_854_775_807_u64);
    assert_eq!(h["files_open"], 1248);
    assert_eq!(
        h["ip_local_port_range"],
        json!({"low": 32768, "high": 60999})
    );
    assert_eq!(h["somaxconn"], 128);
    assert_eq!(h["conntrack_max"], 65536);
    assert_eq!(h["conntrack_count"], 1000);
    assert_eq!(h["mem_total_bytes"], 2_u64 << 30);
    assert_eq!(h["mem_available_bytes"], 1_u64 << 30);
    assert_eq!(h["cores"], 2);
    // No proc/self/status in this fixture: shards follow the online cores.
    assert_eq!(h["cpus_allowed"], Value::Null);
    assert_eq!(h["transparent_hugepage"], "always");
    assert_eq!(h["unreadable"], json!([]));

    let e = &r["engine"];
    assert_eq!(e["driver"], "io_uring");
    assert_eq!(e["shards"], 2);
    assert_eq!(e["shards_from"], "cores");
    assert_eq!(e["max_connections_per_shard"], 65536);
    assert_eq!(e["listen_port"], 9000);
    assert_eq!(e["listen_backlog"], 4096);
    // The default since the run of 2026-11-23: only the request target is kept.
    assert_eq!(e["keep_request_head"], false);
    assert_eq!(e["fixed_fds"], 28);
    assert_eq!(e["fixed_bytes"], 2 * FIXED_BYTES_PER_SHARD);
    assert_eq!(
        e["costs"],
        json!({
            "user_bytes_per_connection": 270,
            "kernel_bytes_per_connection": 4697,
            "fixed_bytes_per_shard": FIXED_BYTES_PER_SHARD,
            "fds_per_shard": 6,
            "fds_per_process": 16,
            "cpu_nanos_per_message": 3840,
            "cpu_nanos_per_delivery_batched": 196,
            "cpu_nanos_per_delivery_unbatched": 3790,
        })
    );

    let limits = r["limits"].as_array().unwrap();
    let names: Vec<_> = limits.iter().map(|l| l["constraint"].clone()).collect();
    assert_eq!(
        names,
        ["file-descriptors", "memory", "config", "conntrack", "ports"]
    );

    let fd = &limits[0];
    assert_eq!(fd["max_connections"], 996);
    assert_eq!(fd["counted"], true);
    assert_eq!(fd["short_by"], 100_000 - 996);
    // 100,000 + 28 rounded up to a multiple of 1024. fs.nr_open (1,048,576) and fs.file-max
    // already allow it: no sysctl fix.
    assert_eq!(
        fd["fixes"],
        json!([
            "echo 'ringcast hard nofile 100352' >> /etc/security/limits.d/90-ringcast.conf",
            "echo 'ringcast soft nofile 100352' >> /etc/security/limits.d/90-ringcast.conf",
            "ulimit -n 100352   # in the shell that starts ringcast, after the hard limit allows it",
            "LimitNOFILE=100352   # [Service] of the systemd unit (tuning/profiles/ringcast.service)",
            "tuning/profiles/apply.sh --apply   # sysctl profile, limits and unit for 4,194,304 files",
        ])
    );

    // (1 GiB available - 2 x fixed) / (270 + 4697) = 1,064,910,848 / 4,967 = 214,397.
    let memory = &limits[1];
    assert_eq!(
        memory["max_connections"],
        ((1_u64 << 30) - 2 * FIXED_BYTES_PER_SHARD) / 4967
    );
    assert_eq!(memory["max_connections"], 214_397);
    assert_eq!(memory["short_by"], 0);
    assert_eq!(memory["fixes"], json!([]));

    assert_eq!(limits[2]["max_connections"], 131_072);
    assert_eq!(limits[2]["short_by"], 0);

    // 65,536 - 1,000 in use; 101,000 rounded up to a multiple of 1024.
    let conntrack = &limits[3];
    assert_eq!(conntrack["max_connections"], 64_536);
    assert_eq!(conntrack["short_by"], 100_000 - 64_536);
    assert_eq!(
        conntrack["fixes"],
        json!([
            "sysctl -w net.netfilter.nf_conntrack_max=101376",
            "iptables -t raw -A PREROUTING -p tcp --dport 9000 -j NOTRACK",
            "iptables -t raw -A OUTPUT -p tcp --sport 9000 -j NOTRACK",
        ])
    );

    // Inbound: ports are reported, not counted.
    let ports = &limits[4];
    assert_eq!(ports["max_connections"], 28_232);
    assert_eq!(ports["counted"], false);
    assert_eq!(ports["short_by"], 0);

    let findings = r["findings"].as_array().unwrap();
    let topics: Vec<_> = findings.iter().map(|f| f["topic"].clone()).collect();
    assert_eq!(topics, ["somaxconn", "transparent-hugepage"]);
    assert_eq!(findings[0]["severity"], "warning");
    assert_eq!(
        findings[0]["fixes"],
        json!(["sysctl -w net.core.somaxconn=4096"])
    );
    assert_eq!(
        findings[1]["fixes"],
        json!(["echo madvise > /sys/kernel/mm/transparent_hugepage/enabled"])
    );
}

#[test]
fn system_wide_limits_get_their_sysctl_first() {
    // 2,000,000 + 28 rounded up to a multiple of 1024 is above fs.nr_open (1,048,576).
    let r = report_json(
        "tight",
        &EngineConfig::default(),
        Target::inbound(2_000_000),
    );
    let fixes = r["limits"][0]["fixes"].as_array().unwrap();
    assert_eq!(fixes[0], "sysctl -w fs.nr_open=2000896");
    assert_eq!(
        fixes[1],
        "echo 'ringcast hard nofile 2000896' >> /etc/security/limits.d/90-ringcast.conf"
    );

    // fs.file-max below the soft limit: only the sysctl (and the profile) are offered.
    let mut host = Host::read(&fixture("tuned")).unwrap();
    host.file_max = Some(500_000);
    let report = doctor::diagnose(&host, &EngineConfig::default(), Target::inbound(1_000_000));
    let fd = &report.limits[0];
    // min(4,194,304, 500,000 - 2,000 open) - 112.
    assert_eq!(fd.max_connections, Some(497_888));
    assert!(
        fd.how.contains("fs.file-max leaves only 498,000 free"),
        "{}",
        fd.how
    );
    // Need 1,000,112 -> 1,000,448; plus the 2,000 open -> 1,002,496.
    assert_eq!(
        fd.fixes,
        [
            "sysctl -w fs.file-max=1002496",
            "tuning/profiles/apply.sh --apply   # sysctl profile, limits and unit for 4,194,304 files",
        ]
    );
}

#[test]
fn tight_host_text_names_the_binding_limit_and_the_commands() {
    let report = doctor::run(
        &fixture("tight"),
        &EngineConfig::default(),
        Target::inbound(100_000),
    )
    .unwrap();
    let text = report.to_string();
    for want in [
        "target 100,000 inbound connections",
        "open files    soft 1,024, hard 4,096",
        "file-descriptors             996  short by 99,004  <- binding",
        "verdict: does NOT fit 100,000 connections: at most 996 (binding: file-descriptors)",
        "ulimit -n 100352",
        "warning (somaxconn)",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
}

#[test]
fn tuned_host_fits_a_million_and_names_the_config_cap() {
    let r = report_json(
        "tuned",
        &EngineConfig::default(),
        Target::inbound(1_000_000),
    );
    assert_eq!(r["fits"], true);
    // 16 cores, so 16 shards x 65,536.
    assert_eq!(r["binding"], "config");
    assert_eq!(r["max_connections"], 1_048_576);
    assert_eq!(r["host"]["cores"], 16);
    assert_eq!(r["host"]["cpus_allowed"], 16);
    assert_eq!(r["engine"]["shards"], 16);
    assert_eq!(r["engine"]["fixed_fds"], 16 + 16 * 6);
    assert_eq!(
        r["host"]["nofile"],
        json!({"soft": 4194304, "hard": 4194304})
    );
    assert_eq!(r["host"]["conntrack_max"], Value::Null);
    assert_eq!(r["host"]["transparent_hugepage"], "never");

    let limits = r["limits"].as_array().unwrap();
    // No conntrack module: no conntrack limit.
    let names: Vec<_> = limits.iter().map(|l| l["constraint"].clone()).collect();
    assert_eq!(names, ["file-descriptors", "memory", "config", "ports"]);
    // min(4,194,304 soft, 4,194,304 file-max - 2,000 open) - 112.
    assert_eq!(limits[0]["max_connections"], 4_194_304 - 2_000 - 112);
    // (62 GiB - 16 x fixed) / (270 + 4697) = 66,501,345,280 / 4,967 = 13,388,634.
    assert_eq!(
        limits[1]["max_connections"],
        ((62_u64 << 30) - 16 * FIXED_BYTES_PER_SHARD) / 4967
    );
    assert_eq!(limits[1]["max_connections"], 13_388_634);
    assert_eq!(limits[2]["max_connections"], 1_048_576);
    assert_eq!(limits[3]["max_connections"], 55_296);
    for l in limits {
        assert_eq!(l["short_by"], 0, "{l}");
        assert_eq!(l["fixes"], json!([]), "{l}");
    }
    assert_eq!(r["findings"], json!([]));
}

#[test]
fn outbound_targets_count_ephemeral_ports() {
    let r = report_json(
        "tuned",
        &EngineConfig::default(),
        Target::outbound(1_000_000),
    );
    assert_eq!(r["fits"], false);
    assert_eq!(r["binding"], "ports");
    assert_eq!(r["max_connections"], 55_296);
    let ports = &r["limits"][3];
    assert_eq!(ports["counted"], true);
    assert_eq!(ports["short_by"], 1_000_000 - 55_296);
    // The range is already the profile's: only more source addresses help.
    assert_eq!(
        ports["fixes"],
        json!([
            "# and open them from 19 source addresses (nginx proxy_bind, HAProxy source): 55,296 ports each"
        ])
    );

    // The tight host's narrower range gets the sysctl first.
    let r = report_json("tight", &EngineConfig::default(), Target::outbound(50_000));
    assert_eq!(
        r["limits"][4]["fixes"],
        json!(["sysctl -w net.ipv4.ip_local_port_range=\"10240 65535\""])
    );
}

#[test]
fn a_target_beyond_the_config_cap_gets_the_config_line() {
    let r = report_json(
        "tuned",
        &EngineConfig::default(),
        Target::inbound(2_000_000),
    );
    assert_eq!(r["fits"], false);
    assert_eq!(r["binding"], "config");
    assert_eq!(
        r["limits"][2]["fixes"],
        json!(["[limits] max_connections_per_shard = 125000   # ringcast.toml"])
    );
}

#[test]
fn io_uring_disabled_fails_the_io_uring_driver_but_not_epoll() {
    let r = report_json(
        "no-io-uring",
        &EngineConfig::default(),
        Target::inbound(10_000),
    );
    assert_eq!(r["io_uring"], "disabled");
    assert_eq!(r["host"]["io_uring_disabled"], 2);
    assert_eq!(r["host"]["kernel_version"], json!({"major": 6, "minor": 6}));
    // No cpu/online in this fixture: cores come from /proc/cpuinfo.
    assert_eq!(r["host"]["cores"], 4);
    assert_eq!(r["host"]["unreadable"], json!([]));
    assert_eq!(r["fits"], false);
    // Every limit has room; the driver is what fails.
    assert_eq!(r["binding"], "file-descriptors");
    assert_eq!(r["max_connections"], 65_536 - (16 + 4 * 6));
    let finding = &r["findings"][0];
    assert_eq!(finding["severity"], "error");
    assert_eq!(finding["topic"], "io-uring");
    assert_eq!(
        finding["fixes"],
        json!([
            "sysctl -w kernel.io_uring_disabled=0",
            "driver = \"epoll\"   # ringcast.toml",
            "ringcast serve --driver epoll",
        ])
    );

    let text = doctor::run(
        &fixture("no-io-uring"),
        &EngineConfig::default(),
        Target::inbound(10_000),
    )
    .unwrap()
    .to_string();
    assert!(
        text.contains("does NOT fit 10,000 connections: io-uring error (see findings)"),
        "{text}"
    );

    let epoll = EngineConfig::default().with_driver(Driver::Epoll);
    let r = report_json("no-io-uring", &epoll, Target::inbound(10_000));
    assert_eq!(r["fits"], true);
    assert_eq!(r["findings"], json!([]));
    assert_eq!(r["engine"]["driver"], "epoll");
    // epoll: 3 descriptors and one 64 KiB read buffer per shard.
    assert_eq!(r["engine"]["fixed_fds"], 16 + 4 * 3);
    assert_eq!(r["engine"]["fixed_bytes"], 4 * 65_536);
}

#[test]
fn old_kernels_and_restricted_io_uring_are_judged_from_the_facts() {
    let mut host = Host::read(&fixture("tight")).unwrap();
    host.kernel_version = Some(KernelVersion {
        major: 5,
        minor: 15,
    });
    let report = doctor::diagnose(&host, &EngineConfig::default(), Target::inbound(10));
    assert_eq!(report.io_uring, IoUring::KernelTooOld);
    assert!(!report.fits);

    let mut host = Host::read(&fixture("tight")).unwrap();
    host.io_uring_disabled = Some(1);
    let report = doctor::diagnose(&host, &EngineConfig::default(), Target::inbound(10));
    assert_eq!(report.io_uring, IoUring::Restricted);
    // A warning only: ringcast run as root or in the group still starts.
    assert!(report.fits, "{report}");
}

#[test]
fn shards_follow_the_cpus_the_process_may_use_and_too_many_are_flagged() {
    let mut host = Host::read(&fixture("tuned")).unwrap();
    // As under CPUAffinity=2-15: 14 shards, so 917,504 connections by config.
    host.cpus_allowed = Some(14);
    let report = doctor::diagnose(&host, &EngineConfig::default(), Target::inbound(1_000_000));
    assert_eq!(report.engine.shards, 14);
    assert_eq!(report.max_connections, Some(14 * 65_536));
    assert!(!report.fits);

    let report = doctor::diagnose(
        &host,
        &EngineConfig::default().with_shards(20),
        Target::inbound(1),
    );
    assert_eq!(report.findings.len(), 1, "{report}");
    assert_eq!(report.findings[0].topic, "shards");
    assert_eq!(
        report.findings[0].fixes,
        ["shards = 0   # ringcast.toml: one per core"]
    );
}

#[test]
fn unreadable_facts_are_listed_and_never_count_as_fitting() {
    let root = std::env::temp_dir().join(format!("ringcast-doctor-bare-{}", std::process::id()));
    std::fs::create_dir_all(root.join("proc/sys/kernel")).unwrap();
    std::fs::write(root.join("proc/sys/kernel/osrelease"), "6.9.1\n").unwrap();
    let report = doctor::run(&root, &EngineConfig::default(), Target::inbound(1)).unwrap();
    let r = serde_json::to_value(&report).unwrap();
    std::fs::remove_dir_all(&root).unwrap();
    assert_eq!(r["fits"], false);
    assert_eq!(r["limits"][0]["max_connections"], Value::Null);
    assert_eq!(r["limits"][1]["max_connections"], Value::Null);
    for path in [
        "proc/self/limits",
        "proc/meminfo",
        "proc/sys/fs/nr_open",
        "proc/sys/net/core/somaxconn",
    ] {
        assert!(
            r["host"]["unreadable"]
                .as_array()
                .unwrap()
                .contains(&json!(path)),
            "{path} not listed: {}",
            r["host"]["unreadable"]
        );
    }
}

#[test]
fn a_directory_without_proc_is_not_a_host() {
    let err = Host::read(&fixture("no-such-host")).unwrap_err();
    assert!(err.to_string().contains("not a directory"), "{err}");
    let err = Host::read(Path::new(env!("CARGO_MANIFEST_DIR"))).unwrap_err();
    assert!(err.to_string().contains("Linux root"), "{err}");
}

//! `ringcast capacity` against cases worked out by hand. Costs per connection (default config,
//! `io.keep_request_head = false`): 270 B user + 4,697 B kernel = 4,967 B (415 B user, 5,112 B
//! in all, with the head kept); per shard (default io_uring config): 4,415,488 B and 6
//! descriptors, plus 16 per process; 3,840 ns of CPU per message and 196 ns per delivery.

use ringcast::{
    capacity::{Constraint, Inputs, Unit},
    ConfigError, EngineConfig,
};
use serde_json::json;

const GIB: u64 = 1 << 30;
const FIXED_BYTES_PER_SHARD: u64 = 4_415_488;

fn hosts(estimate: &ringcast::capacity::Estimate) -> Vec<(Constraint, u64)> {
    estimate
        .limits
        .iter()
        .map(|l| (l.constraint, l.hosts))
        .collect()
}

#[test]
fn a_small_load_fits_one_host_and_the_limit_it_uses_most_is_named() {
    let e = Inputs::new(100_000, 4, 8 * GIB)
        .with_messages_per_sec(1_000.0)
        .with_fanout(10.0)
        .estimate(&EngineConfig::default())
        .unwrap();
    assert_eq!(e.connections, 100_000);
    assert_eq!(e.deliveries_per_sec, 10_000.0);
    // 1,000 x 3,840 ns + 10,000 x 196 ns = 3,840,000 + 1,960,000 ns = 0.0058 cores.
    assert!((e.cpu_cores_needed - 0.0058).abs() < 1e-9);
    // fd: 4,194,304 - (16 + 4 x 6).
    assert_eq!(e.limits[0].per_host, 4_194_264.0);
    // memory: (8 GiB x 0.75 - 4 x fixed) / 4,967 = 6,424,788,992 / 4,967 = 1,293,494.
    assert_eq!(
        e.limits[1].per_host,
        ((6 * GIB - 4 * FIXED_BYTES_PER_SHARD) / 4_967) as f64
    );
    assert_eq!(e.limits[1].per_host, 1_293_494.0);
    // cpu: 4 shards x 0.5.
    assert_eq!(e.limits[2].per_host, 2.0);
    assert_eq!(e.limits[2].unit, Unit::Cores);
    assert_eq!(e.limits[3].per_host, 262_144.0);
    assert_eq!(
        hosts(&e),
        [
            (Constraint::FileDescriptors, 1),
            (Constraint::Memory, 1),
            (Constraint::Cpu, 1),
            (Constraint::Config, 1),
        ]
    );
    // 100,000 of the config's 262,144 (0.38) is the largest share of a host; memory 0.077,
    // descriptors 0.024, CPU 0.0029.
    assert!((e.limits[3].hosts_exact - 100_000.0 / 262_144.0).abs() < 1e-12);
    assert!((e.limits[1].hosts_exact - 100_000.0 / 1_293_494.0).abs() < 1e-12);
    assert!((e.limits[2].hosts_exact - 0.0058 / 2.0).abs() < 1e-12);
    assert_eq!(e.binding, Constraint::Config);
    assert_eq!(e.hosts, 1);
}

#[test]
fn heavy_fan_out_is_bound_by_cpu() {
    // 50,000 msgs/s x 1,000 = 50,000,000 deliveries/s: 50,000 x 3,840 ns + 50,000,000 x 196 ns
    // = 0.192 + 9.8 = 9.992 cores; 8 shards x 0.5 = 4 per host: 2.498, so 3 hosts. Config:
    // 1,000,000 / (8 x 65,536) = 1.91 -> 2. Memory: (48 GiB - 8 x fixed) / 4,967 = 10,369,294
    // per host -> 1.
    let e = Inputs::new(1_000_000, 8, 64 * GIB)
        .with_messages_per_sec(50_000.0)
        .with_fanout(1_000.0)
        .estimate(&EngineConfig::default())
        .unwrap();
    assert!((e.cpu_cores_needed - 9.992).abs() < 1e-9);
    assert_eq!(
        hosts(&e),
        [
            (Constraint::FileDescriptors, 1),
            (Constraint::Memory, 1),
            (Constraint::Cpu, 3),
            (Constraint::Config, 2),
        ]
    );
    assert_eq!(e.binding, Constraint::Cpu);
    assert_eq!(e.hosts, 3);
    assert_eq!(e.config_fix(), None);

    let v = serde_json::to_value(&e).unwrap();
    assert_eq!(v["binding"], "cpu");
    assert_eq!(v["hosts"], 3);
    assert_eq!(v["connections"], 1_000_000);
    assert_eq!(v["deliveries_per_sec"], 50_000_000.0);
    assert_eq!(
        v["limits"][2],
        json!({
            "constraint": "cpu",
            "per_host": 4.0,
            "unit": "cores",
            "hosts_exact": 9.992 / 4.0,
            "hosts": 3,
            "how": "50,000 msgs/s x 3840 ns + 50,000,000 deliveries/s x 196 ns = 9.99 cores; \
                    8 shards x 0.50 busy per host",
        })
    );
    assert_eq!(v["inputs"]["users"], 1_000_000);
    assert_eq!(v["inputs"]["shards_per_host"], 8);
    assert_eq!(v["inputs"]["ram_per_host_bytes"], 64 * GIB);
    assert_eq!(v["inputs"]["cpu_utilisation"], 0.5);
    assert_eq!(v["inputs"]["memory_headroom"], 0.25);
}

#[test]
fn small_hosts_are_bound_by_memory() {
    // 300,000 users x 2 = 600,000 connections. Memory per host: (2 GiB x 0.5 - 2 x fixed) /
    // 4,967 = 1,064,910,848 / 4,967 = 214,397, so 2.80 -> 3 hosts. The config cap is lifted so
    // that it does not bind.
    let mut config = EngineConfig::default();
    config.limits.max_connections_per_shard = 1_000_000;
    let e = Inputs::new(300_000, 2, 2 * GIB)
        .with_connections_per_user(2.0)
        .with_memory_headroom(0.5)
        .estimate(&config)
        .unwrap();
    assert_eq!(e.connections, 600_000);
    assert_eq!(e.limits[1].per_host, 214_397.0);
    assert_eq!(e.binding, Constraint::Memory);
    assert_eq!(e.hosts, 3);

    // With the request head kept: 415 + 4,697 = 5,112 B per connection, 1,064,910,848 / 5,112
    // = 208,315 per host: 2.88, still 3 hosts.
    config.io.keep_request_head = true;
    let e = Inputs::new(300_000, 2, 2 * GIB)
        .with_connections_per_user(2.0)
        .with_memory_headroom(0.5)
        .estimate(&config)
        .unwrap();
    assert_eq!(e.costs.user_bytes_per_connection, 415);
    assert_eq!(
        e.limits[1].per_host,
        ((GIB - 2 * FIXED_BYTES_PER_SHARD) / 5_112) as f64
    );
    assert_eq!(e.limits[1].per_host, 208_315.0);
    assert_eq!(e.binding, Constraint::Memory);
    assert_eq!(e.hosts, 3);
}

#[test]
fn a_low_open_files_limit_is_bound_by_descriptors() {
    // 10,000 - 28 = 9,972 per host: 50,000 connections need 6 hosts.
    let e = Inputs::new(50_000, 2, 64 * GIB)
        .with_nofile_per_host(10_000)
        .estimate(&EngineConfig::default())
        .unwrap();
    assert_eq!(e.limits[0].per_host, 9_972.0);
    assert_eq!(e.binding, Constraint::FileDescriptors);
    assert_eq!(e.hosts, 6);
}

#[test]
fn when_the_config_binds_the_fix_names_the_setting_and_the_hosts_it_saves() {
    // 2,000,000 connections on 8 shards: the default cap, 524,288 per host, needs 3.81 -> 4
    // hosts. Every other limit needs 1: descriptors 2,000,000 / 4,194,240 = 0.48; memory
    // (24 GiB - 8 x fixed) / 4,967 = 5,181,091 per host, 0.39; CPU 20,000 x 3,840 ns +
    // 2,000,000 x 196 ns = 0.4688 cores of 4 per host, 0.12. 2,000,000 / (1 x 8) = 250,000 per
    // shard.
    let e = Inputs::new(2_000_000, 8, 32 * GIB)
        .with_messages_per_sec(20_000.0)
        .with_fanout(100.0)
        .estimate(&EngineConfig::default())
        .unwrap();
    assert!((e.cpu_cores_needed - 0.4688).abs() < 1e-9);
    assert_eq!(e.limits[1].per_host, 5_181_091.0);
    assert_eq!(
        hosts(&e),
        [
            (Constraint::FileDescriptors, 1),
            (Constraint::Memory, 1),
            (Constraint::Cpu, 1),
            (Constraint::Config, 4),
        ]
    );
    assert_eq!(e.binding, Constraint::Config);
    assert_eq!(e.hosts, 4);
    assert_eq!(e.config_fix(), Some((250_000, 1)));
    let text = e.to_string();
    assert!(text.contains("hosts needed: 4 (binding: config)"), "{text}");
    assert!(
        text.contains("with [limits] max_connections_per_shard = 250000 in ringcast.toml: 1 host"),
        "{text}"
    );
}

#[test]
fn out_of_range_inputs_are_refused_by_name() {
    let config = EngineConfig::default();
    let key = |inputs: Inputs| match inputs.estimate(&config) {
        Err(ConfigError::Invalid { key, .. }) => key,
        other => panic!("expected an error, got {other:?}"),
    };
    assert_eq!(key(Inputs::new(1, 0, GIB)), "shards_per_host");
    assert_eq!(key(Inputs::new(1, 1025, GIB)), "shards_per_host");
    assert_eq!(
        key(Inputs::new(1, 1, GIB).with_cpu_utilisation(0.0)),
        "cpu_utilisation"
    );
    assert_eq!(
        key(Inputs::new(1, 1, GIB).with_memory_headroom(1.0)),
        "memory_headroom"
    );
    assert_eq!(key(Inputs::new(1, 1, GIB).with_fanout(-1.0)), "fanout");
    // 1 MiB cannot hold four shards' receive pools.
    assert_eq!(key(Inputs::new(1, 4, 1 << 20)), "ram_per_host");
    assert_eq!(
        key(Inputs::new(1, 4, GIB).with_nofile_per_host(20)),
        "nofile_per_host"
    );
}

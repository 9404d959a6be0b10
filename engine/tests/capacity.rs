//! `ringcast capacity` against cases worked out by hand. Costs per connection: 693 B user +
//! 4,377 B kernel = 5,070 B; per shard (default io_uring config): 4,415,488 B and 6
//! descriptors, plus 16 per process; 4,410 ns of CPU per message and per delivery.

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
    // 1,000 x 4,410 ns + 10,000 x 4,410 ns.
    assert!((e.cpu_cores_needed - 0.04851).abs() < 1e-9);
    // fd: 4,194,304 - (16 + 4 x 6).
    assert_eq!(e.limits[0].per_host, 4_194_264.0);
    // memory: (8 GiB x 0.75 - 4 x fixed) / 5,070.
    assert_eq!(
        e.limits[1].per_host,
        ((6 * GIB - 4 * FIXED_BYTES_PER_SHARD) / 5_070) as f64
    );
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
    // 100,000 of the config's 262,144 is the largest share of a host.
    assert!((e.limits[3].hosts_exact - 100_000.0 / 262_144.0).abs() < 1e-12);
    assert!((e.limits[2].hosts_exact - 0.04851 / 2.0).abs() < 1e-12);
    assert_eq!(e.binding, Constraint::Config);
    assert_eq!(e.hosts, 1);
}

#[test]
fn heavy_fan_out_is_bound_by_cpu() {
    // 20,000 msgs/s x 100 = 2,000,000 deliveries/s: (20,000 + 2,000,000) x 4,410 ns = 8.9082
    // cores; 8 shards x 0.5 = 4 per host, so 3 hosts. Config: 1,000,000 / (8 x 65,536) -> 2.
    let e = Inputs::new(1_000_000, 8, 64 * GIB)
        .with_messages_per_sec(20_000.0)
        .with_fanout(100.0)
        .estimate(&EngineConfig::default())
        .unwrap();
    assert!((e.cpu_cores_needed - 8.9082).abs() < 1e-9);
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
    assert_eq!(v["deliveries_per_sec"], 2_000_000.0);
    assert_eq!(
        v["limits"][2],
        json!({
            "constraint": "cpu",
            "per_host": 4.0,
            "unit": "cores",
            "hosts_exact": 8.9082 / 4.0,
            "hosts": 3,
            "how": "20,000 msgs/s x 4410 ns + 2,000,000 deliveries/s x 4410 ns = 8.91 cores; \
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
    // 5,070 = 210,041, so 3 hosts. The config cap is lifted so that it does not bind.
    let mut config = EngineConfig::default();
    config.limits.max_connections_per_shard = 1_000_000;
    let e = Inputs::new(300_000, 2, 2 * GIB)
        .with_connections_per_user(2.0)
        .with_memory_headroom(0.5)
        .estimate(&config)
        .unwrap();
    assert_eq!(e.connections, 600_000);
    assert_eq!(e.limits[1].per_host, 210_041.0);
    assert_eq!(e.binding, Constraint::Memory);
    assert_eq!(e.hosts, 3);

    // Without the request head: 535 + 4,377 = 4,912 B per connection, 216,797 per host.
    config.io.keep_request_head = false;
    let e = Inputs::new(300_000, 2, 2 * GIB)
        .with_connections_per_user(2.0)
        .with_memory_headroom(0.5)
        .estimate(&config)
        .unwrap();
    assert_eq!(e.costs.user_bytes_per_connection, 535);
    assert_eq!(
        e.limits[1].per_host,
        ((GIB - 2 * FIXED_BYTES_PER_SHARD) / 4_912) as f64
    );
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
    // 2,000,000 connections on 8 shards: the default cap, 524,288 per host, needs 4 hosts;
    // CPU (20,000 x 100 deliveries, 8.91 cores at 4 per host) needs 3. 2,000,000 / (3 x 8)
    // rounds up to 83,334 per shard.
    let e = Inputs::new(2_000_000, 8, 32 * GIB)
        .with_messages_per_sec(20_000.0)
        .with_fanout(100.0)
        .estimate(&EngineConfig::default())
        .unwrap();
    assert_eq!(e.binding, Constraint::Config);
    assert_eq!(e.hosts, 4);
    assert_eq!(e.config_fix(), Some((83_334, 3)));
    let text = e.to_string();
    assert!(text.contains("hosts needed: 4 (binding: config)"), "{text}");
    assert!(
        text.contains("with [limits] max_connections_per_shard = 83334 in ringcast.toml: 3 hosts"),
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

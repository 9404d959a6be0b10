//! `ringcast capacity` against cases worked out by hand. Costs per connection (default config,
//! `io.keep_request_head = false`): 270 B user + 4,697 B kernel = 4,967 B (415 B user, 5,112 B
//! in all, with the head kept); per shard (default io_uring config): 4,415,488 B and 6
//! descriptors, plus 16 per process; 3,840 ns of CPU per message; per delivery 3,790 ns while
//! each connection receives 50 or fewer per second (one send each), falling to 196 ns at 50,049
//! (batched sends).

use ringcast::{ConfigError, EngineConfig};
use ringcast_tuning::capacity::{Constraint, Inputs, Unit};
use serde_json::json;

const GIB: u64 = 1 << 30;
const FIXED_BYTES_PER_SHARD: u64 = 4_415_488;

fn hosts(estimate: &ringcast_tuning::capacity::Estimate) -> Vec<(Constraint, u64)> {
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
    // 0.1 deliveries per connection per second: one send each, 3,790 ns.
    // 1,000 x 3,840 ns + 10,000 x 3,790 ns = 3,840,000 + 37,900,000 ns = 0.04174 cores.
    assert!((e.deliveries_per_connection_per_sec - 0.1).abs() < 1e-12);
    assert_eq!(e.cpu_nanos_per_delivery, 3_790.0);
    assert!((e.cpu_cores_needed - 0.04174).abs() < 1e-9);
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
    // descriptors 0.024, CPU 0.021.
    assert!((e.limits[3].hosts_exact - 100_000.0 / 262_144.0).abs() < 1e-12);
    assert!((e.limits[1].hosts_exact - 100_000.0 / 1_293_494.0).abs() < 1e-12);
    assert!((e.limits[2].hosts_exact - 0.04174 / 2.0).abs() < 1e-12);
    assert_eq!(e.binding, Constraint::Config);
    assert_eq!(e.hosts, 1);
}

#[test]
fn heavy_fan_out_is_bound_by_cpu() {
    // 50,000 msgs/s x 1,000 = 50,000,000 deliveries/s, 50 per connection per second: one send
    // each, 3,790 ns. 50,000 x 3,840 ns + 50,000,000 x 3,790 ns = 0.192 + 189.5 = 189.692
    // cores; 8 shards x 0.5 = 4 per host: 47.42, so 48 hosts. Config: 1,000,000 / (8 x
    // 65,536) = 1.91 -> 2. Memory: (48 GiB - 8 x fixed) / 4,967 = 10,369,294 per host -> 1.
    let e = Inputs::new(1_000_000, 8, 64 * GIB)
        .with_messages_per_sec(50_000.0)
        .with_fanout(1_000.0)
        .estimate(&EngineConfig::default())
        .unwrap();
    assert!((e.cpu_cores_needed - 189.692).abs() < 1e-9);
    assert_eq!(
        hosts(&e),
        [
            (Constraint::FileDescriptors, 1),
            (Constraint::Memory, 1),
            (Constraint::Cpu, 48),
            (Constraint::Config, 2),
        ]
    );
    assert_eq!(e.binding, Constraint::Cpu);
    assert_eq!(e.hosts, 48);
    assert_eq!(e.config_fix(), None);

    let v = serde_json::to_value(&e).unwrap();
    assert_eq!(v["binding"], "cpu");
    assert_eq!(v["hosts"], 48);
    assert_eq!(v["cpu_nanos_per_delivery"], 3_790.0);
    assert_eq!(v["costs"]["cpu_nanos_per_delivery_batched"], 196);
    assert_eq!(v["costs"]["cpu_nanos_per_delivery_unbatched"], 3_790);
    assert_eq!(v["connections"], 1_000_000);
    assert_eq!(v["deliveries_per_sec"], 50_000_000.0);
    assert_eq!(
        v["limits"][2],
        json!({
            "constraint": "cpu",
            "per_host": 4.0,
            "unit": "cores",
            "hosts_exact": e.cpu_cores_needed / 4.0,
            "hosts": 48,
            "how": "50,000 msgs/s x 3840 ns + 50,000,000 deliveries/s x 3790 ns = 189.69 cores; \
                    8 shards x 0.50 busy per host. Per delivery at 50.0 per connection per s: \
                    196 ns batched (50,049/s) to 3790 ns unbatched (50/s or fewer)",
        })
    );
    assert_eq!(v["inputs"]["users"], 1_000_000);
    assert_eq!(v["inputs"]["shards_per_host"], 8);
    assert_eq!(v["inputs"]["ram_per_host_bytes"], 64 * GIB);
    assert_eq!(v["inputs"]["cpu_utilisation"], 0.5);
    assert_eq!(v["inputs"]["memory_headroom"], 0.25);
}

#[test]
fn many_deliveries_per_connection_cost_the_batched_figure() {
    // 1,000 connections each receiving 50,049 deliveries per second (50,049 msgs/s x fan-out
    // 1,000): sends carry many frames, 196 ns each. 50,049 x 3,840 + 50,049,000 x 196 =
    // 192,188,160 + 9,809,604,000 ns = 10.00179216 cores; 4 per host: 2.50, so 3 hosts.
    let e = Inputs::new(1_000, 8, 64 * GIB)
        .with_messages_per_sec(50_049.0)
        .with_fanout(1_000.0)
        .estimate(&EngineConfig::default())
        .unwrap();
    assert_eq!(e.deliveries_per_connection_per_sec, 50_049.0);
    assert_eq!(e.cpu_nanos_per_delivery, 196.0);
    assert!((e.cpu_cores_needed - 10.00179216).abs() < 1e-9);
    assert_eq!(e.binding, Constraint::Cpu);
    assert_eq!(e.hosts, 3);
    // The same deliveries spread over 1,000 times the connections (50 each per second): one
    // send each, 3,790 ns: 19 times the CPU.
    let spread = Inputs::new(1_000_000, 8, 64 * GIB)
        .with_messages_per_sec(50_049.0)
        .with_fanout(1_000.0)
        .estimate(&EngineConfig::default())
        .unwrap();
    assert!((spread.deliveries_per_connection_per_sec - 50.049).abs() < 1e-9);
    assert!(spread.cpu_nanos_per_delivery < 3_790.0 && spread.cpu_nanos_per_delivery > 3_700.0);
    assert!(spread.hosts > 40, "{}", spread.hosts);
    let text = spread.to_string();
    assert!(text.contains("196 to 3790 ns per delivery"), "{text}");
    assert!(
        text.contains("at 50.0 deliveries per connection per s"),
        "{text}"
    );
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
    // (24 GiB - 8 x fixed) / 4,967 = 5,181,091 per host, 0.39; CPU (1 delivery per connection
    // per second: 3,790 ns each) 20,000 x 3,840 ns + 2,000,000 x 3,790 ns = 7.6568 cores of 4
    // per host, 1.91 -> 2. Lifting the cap leaves CPU binding at 2 hosts: 2,000,000 / (2 x 8)
    // = 125,000 per shard.
    let e = Inputs::new(2_000_000, 8, 32 * GIB)
        .with_messages_per_sec(20_000.0)
        .with_fanout(100.0)
        .estimate(&EngineConfig::default())
        .unwrap();
    assert!((e.cpu_cores_needed - 7.6568).abs() < 1e-9);
    assert_eq!(e.limits[1].per_host, 5_181_091.0);
    assert_eq!(
        hosts(&e),
        [
            (Constraint::FileDescriptors, 1),
            (Constraint::Memory, 1),
            (Constraint::Cpu, 2),
            (Constraint::Config, 4),
        ]
    );
    assert_eq!(e.binding, Constraint::Config);
    assert_eq!(e.hosts, 4);
    assert_eq!(e.config_fix(), Some((125_000, 2)));
    let text = e.to_string();
    assert!(text.contains("hosts needed: 4 (binding: config)"), "{text}");
    assert!(
        text.contains("with [limits] max_connections_per_shard = 125000 in ringcast.toml: 2 hosts"),
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

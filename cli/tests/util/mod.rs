//! The binary's tests use the workspace's shared test client and helpers (`ringcast-testkit`);
//! this re-exports them under the names the tests use.
#![allow(dead_code, unused_imports, unreachable_pub, missing_docs)]

pub use ringcast_testkit::{
    broker::{self, BrokerClient, Got, Honesty},
    free_port,
    http::{self, http_get, metric_sum, parse_metrics},
    process::{self, Spawned},
    raw::{self, raw, read_to_close},
    redis, require, wait_for, wait_until,
    ws::{self, connect, connect_with, expect_close, refused, Client},
    DEADLINE,
};

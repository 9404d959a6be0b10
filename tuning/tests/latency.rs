//! `ringcast doctor --latency` and `tuning/profiles/latency/apply.sh` against fixture hosts:
//! `tests/fixtures/latency-tuned` (cores 2-7 isolated and tickless, interrupts on 0-1,
//! performance governor, huge pages on madvise) and `latency-untuned` (isolcpus=4-7 but only
//! 6-7 tickless, interrupts anywhere, powersave, huge pages always), and `tight`, which has
//! none of the files.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use ringcast_tuning::doctor::{run_latency, CheckStatus, LatencyReport};
use serde_json::{json, Value};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn status(report: &LatencyReport, topic: &str) -> CheckStatus {
    report
        .checks
        .iter()
        .find(|c| c.topic == topic)
        .unwrap_or_else(|| panic!("no {topic} check"))
        .status
}

#[test]
fn a_tuned_host_is_ready_and_names_its_spin_cores() {
    let report = run_latency(&fixture("latency-tuned")).unwrap();
    assert!(report.ready, "{report}");
    let r = serde_json::to_value(&report).unwrap();
    assert_eq!(r["spin_cores"], json!([2, 3, 4, 5, 6, 7]));
    let topics: Vec<&str> = report.checks.iter().map(|c| c.topic).collect();
    assert_eq!(
        topics,
        [
            "isolated-cores",
            "nohz-full",
            "irq-affinity",
            "cpu-governor",
            "transparent-hugepage"
        ]
    );
    assert!(report.checks.iter().all(|c| c.fixes.is_empty()), "{report}");
    let text = report.to_string();
    assert!(text.contains("ready for latency mode"), "{text}");
    assert!(text.contains("CPUAffinity=2-7"), "{text}");
    assert!(report.host.unreadable.is_empty(), "{report:?}");
}

#[test]
fn an_untuned_host_gets_a_fix_for_each_shortfall() {
    let report = run_latency(&fixture("latency-untuned")).unwrap();
    assert!(!report.ready);
    // isolcpus=4-7 from the command line (the `isolcpus=1` after `--` is init's), nohz_full
    // only 6-7: those two are the spin cores.
    assert_eq!(status(&report, "isolated-cores"), CheckStatus::Ok);
    assert_eq!(status(&report, "nohz-full"), CheckStatus::Fix);
    assert_eq!(status(&report, "irq-affinity"), CheckStatus::Fix);
    assert_eq!(status(&report, "cpu-governor"), CheckStatus::Fix);
    assert_eq!(status(&report, "transparent-hugepage"), CheckStatus::Fix);
    let r: Value = serde_json::to_value(&report).unwrap();
    assert_eq!(r["spin_cores"], json!([6, 7]));
    let text = report.to_string();
    for expected in [
        "isolated cores 4-5 still take the timer tick",
        "nohz_full=4-7 rcu_nocbs=4-7",
        // IRQ 1 (0-7), 24 (0-7) and 25 (5) reach 4-7; 0 (0) and 26 (0-3) do not.
        "3 of 5 IRQs may land on isolated cores 4-7 (IRQ 1, 24, 25); new IRQs default to them too",
        "echo 0-3 > $f",
        "echo f > /proc/irq/default_smp_affinity",
        "8 of 8 cores run powersave, schedutil",
        "cpupower frequency-set -g performance",
        "enabled always, defrag always",
        "echo madvise > /sys/kernel/mm/transparent_hugepage/enabled",
    ] {
        assert!(text.contains(expected), "{expected:?} not in:\n{text}");
    }
}

#[test]
fn a_host_without_isolation_is_told_how_to_isolate() {
    let report = run_latency(&fixture("tight")).unwrap();
    assert!(!report.ready);
    assert_eq!(status(&report, "isolated-cores"), CheckStatus::Fix);
    // Two online cores: core 1 for the shard, core 0 for the OS.
    let text = report.to_string();
    assert!(
        text.contains("isolcpus=managed_irq,domain,1 nohz_full=1 rcu_nocbs=1"),
        "{text}"
    );
    assert_eq!(status(&report, "cpu-governor"), CheckStatus::Unknown);
    assert!(text.contains("keep `[latency]` off"), "{text}");
    assert!(report.host.unreadable.contains(&"proc/cmdline".to_owned()));
}

fn apply_sh(args: &[&str], root: &Path) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("profiles/latency/apply.sh");
    Command::new("bash")
        .arg(script)
        .args(args)
        .arg("--root")
        .arg(root)
        .env_remove("RINGCAST_ROOT")
        .output()
        .unwrap()
}

fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &dest);
        } else {
            fs::copy(entry.path(), dest).unwrap();
        }
    }
}

/// A scratch copy of a fixture, removed when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[test]
fn the_latency_profile_dry_runs_then_applies_once() {
    let host = Scratch(
        std::env::temp_dir().join(format!("ringcast-latency-{}-untuned", std::process::id())),
    );
    let _ = fs::remove_dir_all(&host.0);
    copy_tree(&fixture("latency-untuned"), &host.0);
    // The untuned host's command line isolates 4-7 but sysfs says nothing: name the cores.
    let out = apply_sh(&["--cores", "4-7"], &host.0);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    for expected in [
        "dry run",
        "shard cores 4-7; interrupts go to 0-3",
        "IRQ 1                                    0-7 -> 0-3",
        "IRQ 25                                   5 -> 0-3",
        "default_smp_affinity                     ff -> f",
        "cpu0                                     powersave -> performance",
        "enabled                                  always -> madvise",
        "defrag                                   always -> defer+madvise",
        // 3 IRQs, the default, 8 governors, 2 huge page files.
        "14 changes proposed",
    ] {
        assert!(text.contains(expected), "{expected:?} not in:\n{text}");
    }
    assert!(!text.contains("IRQ 26 "), "{text}");
    let irq1 = host.0.join("proc/irq/1/smp_affinity_list");
    assert_eq!(
        fs::read_to_string(&irq1).unwrap(),
        "0-7\n",
        "a dry run wrote"
    );

    if !ringcast_testkit::require_root("the latency profile's --apply half") {
        return;
    }
    let out = apply_sh(&["--cores", "4-7", "--apply"], &host.0);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("14 changes applied, 0 refused"));
    assert_eq!(fs::read_to_string(&irq1).unwrap(), "0-3\n");
    let again = apply_sh(&["--cores", "4-7"], &host.0);
    let again = String::from_utf8(again.stdout).unwrap();
    assert!(
        again.contains("nothing to change: the host matches the latency profile"),
        "{again}"
    );
    // What is left for the doctor is the boot-time part: the ticking isolated cores.
    let report = run_latency(&host.0).unwrap();
    for topic in ["irq-affinity", "cpu-governor", "transparent-hugepage"] {
        assert_eq!(status(&report, topic), CheckStatus::Ok, "{report}");
    }
    assert_eq!(status(&report, "nohz-full"), CheckStatus::Fix, "{report}");
}

#[test]
fn the_latency_profile_refuses_cores_that_leave_nothing_to_the_os() {
    let out = apply_sh(&["--cores", "0-7"], &fixture("latency-tuned"));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("leave at least one to the OS"), "{err}");
}

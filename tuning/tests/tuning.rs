//! `tuning/profiles/apply.sh` on copies of the fixture hosts: the dry run shows the expected
//! changes and touches nothing; `--apply` is refused to anyone but root, and as root writes
//! the values and leaves nothing more to change.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .into()
}

/// A scratch copy of fixture `name`, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn of(name: &str, tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!(
            "ringcast-tuning-{}-{name}-{tag}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        copy_tree(
            &Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures")
                .join(name),
            &dir,
        );
        Scratch(dir)
    }

    fn read(&self, rel: &str) -> String {
        fs::read_to_string(self.0.join(rel)).unwrap()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
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

fn apply_sh(script: &Path, args: &[&str], root: &Path) -> Output {
    Command::new("bash")
        .arg(script)
        .args(args)
        .arg("--root")
        .arg(root)
        .env_remove("RINGCAST_ROOT")
        .output()
        .unwrap()
}

fn stdout(out: &Output, root: &Path) -> String {
    String::from_utf8(out.stdout.clone())
        .unwrap()
        .replace(root.to_str().unwrap(), "ROOT")
}

fn script() -> PathBuf {
    repo().join("tuning/profiles/apply.sh")
}

/// tcp_mem apply.sh works out for the tight fixture's 2 GiB: 1/8, 1/6, 1/4 of its pages
/// ("65536 87381 131072" with 4 KiB pages).
fn tight_tcp_mem() -> String {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    let pages = (2_u64 << 30) / page;
    format!("{} {} {}", pages / 8, pages / 6, pages / 4)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn dry_run_on_a_tight_host_shows_every_change_and_changes_nothing() {
    let host = Scratch::of("tight", "dry");
    let before = host.read("proc/sys/fs/nr_open");
    let out = apply_sh(&script(), &[], &host.0);
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out, &host.0);

    // MemTotal 2 GiB = 524,288 pages of 4 KiB: tcp_mem 1/8, 1/6, 1/4 of them.
    let expected_sysctl = "\
ringcast host profile: dry run under root ROOT (nothing is changed; --apply to apply)

sysctl (now in /proc/sys; at boot from /etc/sysctl.d/90-ringcast.conf)
  fs.file-max                      9223372036854775807 (kept: at or above the profile's 4194304)
  fs.nr_open                       1048576 -> 4194304
  net.core.somaxconn               128 -> 65535
  net.ipv4.tcp_max_syn_backlog     512 -> 65535
  net.core.netdev_max_backlog      1000 -> 16384
  net.ipv4.ip_local_port_range     32768 60999 -> 10240 65535
  net.ipv4.tcp_rmem                4096 131072 6291456 (kept: at or above the profile's 4096 16384 4194304)
  net.ipv4.tcp_wmem                4096 16384 4194304 (unchanged)
  net.ipv4.tcp_mem                 21507 28677 43014 -> TCP_MEM
  net.ipv4.tcp_keepalive_time      7200 (kept: at or above the profile's 300)
  net.ipv4.tcp_keepalive_intvl     75 (kept: at or above the profile's 30)
  net.ipv4.tcp_keepalive_probes    9 (kept: at or above the profile's 5)
  net.netfilter.nf_conntrack_max   65536 -> 4194304

sysctl at boot (/etc/sysctl.d/90-ringcast.conf)
  --- /etc/sysctl.d/90-ringcast.conf (current)
  +++ /etc/sysctl.d/90-ringcast.conf (proposed)
  @@ -0,0 +1,15 @@
  +# Installed by ringcast tuning/profiles/apply.sh from tuning/profiles/sysctl.conf,
  +# with the values settled for this host. A leading '-' ignores keys the kernel lacks.
  +fs.file-max = 9223372036854775807
  +fs.nr_open = 4194304
  +net.core.somaxconn = 65535
  +net.ipv4.tcp_max_syn_backlog = 65535
  +net.core.netdev_max_backlog = 16384
  +net.ipv4.ip_local_port_range = 10240 65535
  +net.ipv4.tcp_rmem = 4096 131072 6291456
  +net.ipv4.tcp_wmem = 4096 16384 4194304
  +net.ipv4.tcp_mem = TCP_MEM
  +net.ipv4.tcp_keepalive_time = 7200
  +net.ipv4.tcp_keepalive_intvl = 75
  +net.ipv4.tcp_keepalive_probes = 9
  +net.netfilter.nf_conntrack_max = 4194304

open-files limits for login sessions (/etc/security/limits.d/90-ringcast.conf)
  --- /etc/security/limits.d/90-ringcast.conf (current)
  +++ /etc/security/limits.d/90-ringcast.conf (proposed)
"
    .replace("TCP_MEM", &tight_tcp_mem());
    assert!(
        text.starts_with(&expected_sysctl),
        "expected:\n{expected_sysctl}\ngot:\n{text}"
    );
    for line in [
        "  +ringcast soft nofile 4194304\n",
        "  +ringcast hard nofile 4194304\n",
        "systemd unit (/etc/systemd/system/ringcast.service)\n",
        "  +ExecStart=/usr/local/bin/ringcast serve -c /etc/ringcast/ringcast.toml\n",
        "  +LimitNOFILE=4194304\n",
        "  +Restart=on-failure\n",
        // Two CPUs: both run shards, none is set aside.
        "  +# CPUAffinity= not set: 4 CPUs or fewer, every one runs a shard\n",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    assert!(
        text.ends_with(
            "\n4 sysctls kept where the host is above the profile (--allow-lower sets the \
             profile's values)\n10 changes proposed; run again with --apply, as root, to apply \
             them\n"
        ),
        "{text}"
    );
    assert_eq!(host.read("proc/sys/fs/nr_open"), before);
    assert!(!host.0.join("etc").exists(), "a dry run wrote files");
}

#[test]
fn dry_run_on_a_tuned_host_proposes_only_the_missing_files() {
    let host = Scratch::of("tuned", "dry");
    let out = apply_sh(&script(), &[], &host.0);
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out, &host.0);
    let sysctl: Vec<_> = text
        .lines()
        .skip_while(|l| !l.starts_with("sysctl (now"))
        .skip(1)
        .take_while(|l| !l.is_empty())
        .collect();
    assert_eq!(sysctl.len(), 13, "{text}");
    for line in &sysctl {
        assert!(
            line.ends_with("(unchanged)") || line.ends_with("skipped now, kept for boot"),
            "{line}"
        );
    }
    // 16 CPUs: 0 and 1 are left to interrupts.
    assert!(text.contains("  +CPUAffinity=2-15\n"), "{text}");
    assert!(
        text.contains("  +-net.netfilter.nf_conntrack_max = 4194304\n"),
        "{text}"
    );
    assert!(
        text.ends_with("\n3 changes proposed; run again with --apply, as root, to apply them\n")
    );
}

/// Both halves need a given privilege: the refusal is checked as this user when not root, and
/// as root through setpriv (util-linux) becoming nobody; the apply half needs root. CI runs as
/// root, so there both run (or the test fails); elsewhere a missing half is skipped loudly.
#[test]
fn apply_is_refused_without_root_and_as_root_writes_the_profile() {
    let host = Scratch::of("tight", "apply");
    if !is_root() {
        let out = apply_sh(&script(), &["--apply"], &host.0);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.contains("refusing to apply"), "{err}");
        assert!(err.contains("root"), "{err}");
        assert_eq!(host.read("proc/sys/fs/nr_open"), "1048576\n");
        assert!(!host.0.join("etc").exists());
    }
    if !ringcast_testkit::require_root("the profile's --apply half") {
        return;
    }

    // As root: the refusal still holds for an unprivileged user, whom setpriv becomes. The
    // script and fixture are copied where they can read.
    if ringcast_testkit::require("setpriv", "apt-get install util-linux") {
        let copy = host.0.join("script");
        fs::create_dir_all(&copy).unwrap();
        for file in ["apply.sh", "sysctl.conf", "limits.conf", "ringcast.service"] {
            fs::copy(repo().join("tuning/profiles").join(file), copy.join(file)).unwrap();
        }
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "bash"])
            .arg(copy.join("apply.sh"))
            .args(["--apply", "--root"])
            .arg(&host.0)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.contains("refusing to apply"), "{err}");
        assert_eq!(host.read("proc/sys/fs/nr_open"), "1048576\n");
    }

    let out = apply_sh(&script(), &["--apply"], &host.0);
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out, &host.0);
    assert!(text.contains("10 changes applied"), "{text}");
    assert_eq!(
        host.read("proc/sys/net/ipv4/tcp_rmem"),
        "4096\t131072\t6291456\n",
        "never lowered"
    );
    assert_eq!(host.read("proc/sys/fs/nr_open"), "4194304\n");
    assert_eq!(host.read("proc/sys/fs/file-max"), "9223372036854775807\n");
    assert_eq!(
        host.read("proc/sys/net/ipv4/ip_local_port_range"),
        "10240 65535\n"
    );
    assert_eq!(
        host.read("proc/sys/net/ipv4/tcp_mem"),
        format!("{}\n", tight_tcp_mem())
    );
    assert!(host
        .read("etc/sysctl.d/90-ringcast.conf")
        .contains("\nfs.nr_open = 4194304\n"));
    assert_eq!(
        host.read("etc/security/limits.d/90-ringcast.conf"),
        fs::read_to_string(repo().join("tuning/profiles/limits.conf")).unwrap()
    );
    assert!(host
        .read("etc/systemd/system/ringcast.service")
        .contains("\nLimitNOFILE=4194304\n"));

    // Idempotent: a second run finds nothing to do.
    let out = apply_sh(&script(), &[], &host.0);
    let text = stdout(&out, &host.0);
    assert!(
        text.ends_with("\nnothing to change: the host matches the profile\n"),
        "{text}"
    );
}

/// The sysctl lines of a dry run: key -> what it prints after the key.
fn sysctl_lines(text: &str) -> Vec<(String, String)> {
    text.lines()
        .skip_while(|l| !l.starts_with("sysctl (now"))
        .skip(1)
        .take_while(|l| !l.is_empty())
        .map(|l| {
            let (key, rest) = l.trim().split_once(' ').unwrap();
            (key.to_owned(), rest.trim().to_owned())
        })
        .collect()
}

#[test]
fn values_above_the_profile_are_never_lowered_field_by_field_unless_asked() {
    let host = Scratch::of("tight", "lower");
    // Above the profile's 4 MiB max; below its 16 KiB default (tcp_wmem); a wide port range.
    let ipv4 = host.0.join("proc/sys/net/ipv4");
    fs::write(ipv4.join("tcp_rmem"), "4096\t16384\t33554432\n").unwrap();
    fs::write(ipv4.join("tcp_wmem"), "4096\t8192\t33554432\n").unwrap();
    fs::write(ipv4.join("ip_local_port_range"), "1024\t60999\n").unwrap();
    let out = apply_sh(&script(), &[], &host.0);
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out, &host.0);
    let lines = sysctl_lines(&text);
    let line = |key: &str| &lines.iter().find(|(k, _)| k == key).unwrap().1;
    assert_eq!(
        line("net.ipv4.tcp_rmem"),
        "4096 16384 33554432 (kept: at or above the profile's 4096 16384 4194304)"
    );
    assert_eq!(
        line("net.ipv4.tcp_wmem"),
        "4096 8192 33554432 -> 4096 16384 33554432 (higher fields kept; the profile's 4096 16384 \
         4194304)"
    );
    // A range only widens: the host's lower start stays, the profile's higher end is taken.
    assert_eq!(
        line("net.ipv4.ip_local_port_range"),
        "1024 60999 -> 1024 65535 (higher fields kept; the profile's 10240 65535)"
    );
    assert_eq!(
        line("net.ipv4.tcp_keepalive_time"),
        "7200 (kept: at or above the profile's 300)"
    );
    for kept in [
        "  +net.ipv4.tcp_rmem = 4096 16384 33554432\n",
        "  +net.ipv4.tcp_wmem = 4096 16384 33554432\n",
        "  +net.ipv4.tcp_keepalive_time = 7200\n",
    ] {
        assert!(text.contains(kept), "missing {kept:?} in:\n{text}");
    }
    assert_eq!(
        host.read("proc/sys/net/ipv4/tcp_rmem"),
        "4096\t16384\t33554432\n"
    );

    // Asked to: the profile's values as written, but capacity limits still only rise.
    let out = apply_sh(&script(), &["--allow-lower"], &host.0);
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out, &host.0);
    let lines = sysctl_lines(&text);
    let line = |key: &str| &lines.iter().find(|(k, _)| k == key).unwrap().1;
    assert_eq!(
        line("net.ipv4.tcp_rmem"),
        "4096 16384 33554432 -> 4096 16384 4194304"
    );
    assert_eq!(line("net.ipv4.tcp_keepalive_time"), "7200 -> 300");
    assert_eq!(
        line("fs.file-max"),
        "9223372036854775807 (kept: at or above the profile's 4194304)"
    );
    assert!(!text.contains("kept where the host is above"), "{text}");
    assert!(!host.0.join("etc").exists(), "a dry run wrote files");
}

#[test]
fn unknown_arguments_are_refused_with_usage() {
    let out = Command::new("bash")
        .arg(script())
        .arg("--aply")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("unknown argument: --aply"), "{err}");
    assert!(err.contains("usage: apply.sh"), "{err}");
}

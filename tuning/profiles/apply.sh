#!/usr/bin/env bash
# Applies the ringcast host profile: the sysctl values of sysctl.conf, the open-files limits of
# limits.conf and the systemd unit ringcast.service.
#
# Dry run by default: prints every sysctl as "current -> proposed" and a diff of each file it
# would install, and changes nothing. With --apply (as root only) it writes the values to
# /proc/sys and installs the files; running it again then proposes nothing (idempotent).
#
# It never lowers a value: a sysctl the host has above the profile keeps its value, field by
# field for those with several (tcp_rmem "4096 16384 33554432" keeps its 32 MiB max against the
# profile's 4 MiB but gets the profile's min and default where they are higher), and the port
# range is only ever widened. --allow-lower sets the profile's values as written, but for the
# capacity limits (fs.file-max, fs.nr_open, backlogs, tcp_mem, nf_conntrack_max), which it
# only ever raises.
#
# usage: apply.sh [--apply] [--allow-lower] [--root DIR]
#   --apply        write the changes (refused unless run as root)
#   --allow-lower  set the profile's values even where the host's are higher
#   --root DIR     read and write /proc/sys, /proc/meminfo, /sys and /etc under DIR instead
#                  of / (a copy of a host, for tests); also RINGCAST_ROOT=DIR
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=${RINGCAST_ROOT:-/}
apply=0
allow_lower=0

usage() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; }

while [ $# -gt 0 ]; do
    case $1 in
        --apply) apply=1 ;;
        --allow-lower) allow_lower=1 ;;
        --root) [ $# -ge 2 ] || { echo "apply.sh: --root needs a directory" >&2; exit 2; }
            root=$2; shift ;;
        --root=*) root=${1#--root=} ;;
        -h | --help) usage; exit 0 ;;
        *) echo "apply.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

if [ "${apply}" = 1 ] && [ "$(id -u)" != 0 ]; then
    echo "apply.sh: refusing to apply: writing sysctls, /etc/security/limits.d and" \
        "/etc/systemd/system needs root. Run it with sudo, or without --apply for a dry run." >&2
    exit 1
fi
[ -d "${root}" ] || { echo "apply.sh: root ${root} is not a directory" >&2; exit 2; }
root=${root%/}   # "" for /, so "${root}/proc" is "/proc"

# a >= b for non-negative integers of any length.
ge() {
    local a=$1 b=$2
    if [ "${#a}" != "${#b}" ]; then [ "${#a}" -gt "${#b}" ]; else [[ ! "${a}" < "${b}" ]]; fi
}

# Element-wise maximum of two whitespace-separated lists of the same length.
floor_max() {
    local -a cur want
    read -r -a cur <<<"$1"
    read -r -a want <<<"$2"
    if [ "${#cur[@]}" != "${#want[@]}" ]; then echo "$2"; return; fi
    local out=() i
    for i in "${!want[@]}"; do
        if [[ "${cur[i]}" =~ ^[0-9]+$ ]] && ge "${cur[i]}" "${want[i]}"; then
            out+=("${cur[i]}")
        else
            out+=("${want[i]}")
        fi
    done
    echo "${out[*]}"
}

# Capacity limits that are never lowered, not even with --allow-lower: a host above them
# (fs.file-max is often 2^63 - 1) has room the profile does not take away.
floor_keys=" fs.file-max fs.nr_open net.core.somaxconn net.ipv4.tcp_max_syn_backlog \
net.core.netdev_max_backlog net.ipv4.tcp_mem net.netfilter.nf_conntrack_max "

# The value to write for a key: the profile's, except that no field goes below the host's
# (unless --allow-lower, for keys not in floor_keys), and the port range (low high) only ever
# widens.
settle() {
    local key=$1 cur=$2 want=$3
    case "${floor_keys}" in
        *" ${key} "*) ;;
        *) if [ "${allow_lower}" = 1 ]; then echo "${want}"; return; fi ;;
    esac
    if [ "${key}" = net.ipv4.ip_local_port_range ]; then
        local -a c w
        read -r -a c <<<"${cur}"
        read -r -a w <<<"${want}"
        if [ "${#c[@]}" = 2 ] && [ "${#w[@]}" = 2 ] && [[ "${c[0]}${c[1]}" =~ ^[0-9]+$ ]]; then
            local low=${w[0]} high=${w[1]}
            ge "${c[0]}" "${low}" || low=${c[0]}
            ge "${high}" "${c[1]}" || high=${c[1]}
            echo "${low} ${high}"
            return
        fi
    fi
    floor_max "${cur}" "${want}"
}

# net.ipv4.tcp_mem from MemTotal: 1/8, 1/6 and 1/4 of RAM, in pages.
tcp_mem_for_host() {
    local kb page pages
    kb=$(awk '$1 == "MemTotal:" { print $2 }' "${root}/proc/meminfo" 2>/dev/null || true)
    [ -n "${kb}" ] || return 1
    page=$(getconf PAGESIZE 2>/dev/null || echo 4096)
    pages=$((kb * 1024 / page))
    echo "$((pages / 8)) $((pages / 6)) $((pages / 4))"
}

# CPUAffinity= for the unit: every online CPU but 0 and 1, as ranges; empty for <= 4 CPUs.
cpu_affinity_for_host() {
    local online part a b cpu
    local -a cpus=()
    online=$(cat "${root}/sys/devices/system/cpu/online" 2>/dev/null || true)
    for part in ${online//,/ }; do
        a=${part%-*} b=${part#*-}
        for ((cpu = a; cpu <= b; cpu++)); do cpus+=("${cpu}"); done
    done
    [ "${#cpus[@]}" -gt 4 ] || return 0
    local out="" start="" prev=""
    for cpu in "${cpus[@]}"; do
        [ "${cpu}" -ge 2 ] || continue
        if [ -n "${prev}" ] && [ "${cpu}" = $((prev + 1)) ]; then prev=${cpu}; continue; fi
        [ -z "${start}" ] || out+="${start}$([ "${prev}" = "${start}" ] || echo "-${prev}"),"
        start=${cpu} prev=${cpu}
    done
    [ -z "${start}" ] || out+="${start}$([ "${prev}" = "${start}" ] || echo "-${prev}")"
    echo "${out%,}"
}

work=$(mktemp -d)
trap 'rm -rf "${work}"' EXIT
changes=0
kept_above=0

if [ "${apply}" = 1 ]; then
    echo "ringcast host profile: applying under root ${root:-/}"
else
    echo "ringcast host profile: dry run under root ${root:-/} (nothing is changed; --apply to apply)"
fi

# --- sysctl ---------------------------------------------------------------------------------
echo
echo "sysctl (now in /proc/sys; at boot from /etc/sysctl.d/90-ringcast.conf)"
sysctl_file="${work}/sysctl.conf"
{
    echo "# Installed by ringcast tuning/profiles/apply.sh from tuning/profiles/sysctl.conf,"
    echo "# with the values settled for this host. A leading '-' ignores keys the kernel lacks."
} >"${sysctl_file}"
declare -a to_write=()
while IFS= read -r line; do
    line=${line%%#*}
    [[ "${line}" =~ ^[[:space:]]*([a-z0-9_.-]+)[[:space:]]*=[[:space:]]*(.*[^[:space:]])[[:space:]]*$ ]] || continue
    key=${BASH_REMATCH[1]}
    want=$(echo "${BASH_REMATCH[2]}" | tr -s ' \t' ' ')
    if [ "${key}" = net.ipv4.tcp_mem ]; then
        want=$(tcp_mem_for_host) || want=$(echo "${BASH_REMATCH[2]}" | tr -s ' \t' ' ')
    fi
    path="${root}/proc/sys/${key//.//}"
    if [ ! -e "${path}" ]; then
        printf '  %-32s absent on this host: skipped now, kept for boot\n' "${key}"
        echo "-${key} = ${want}" >>"${sysctl_file}"
        continue
    fi
    cur=$(tr -s ' \t' ' ' <"${path}" | sed 's/^ //; s/ $//')
    proposed=$(settle "${key}" "${cur}" "${want}")
    echo "${key} = ${proposed}" >>"${sysctl_file}"
    # Counted where --allow-lower would change it.
    case "${floor_keys}" in
        *" ${key} "*) ;;
        *) [ "${proposed}" = "${want}" ] || kept_above=$((kept_above + 1)) ;;
    esac
    if [ "${cur}" = "${proposed}" ]; then
        if [ "${proposed}" = "${want}" ]; then
            printf '  %-32s %s (unchanged)\n' "${key}" "${cur}"
        else
            printf '  %-32s %s (kept: at or above the profile'"'"'s %s)\n' "${key}" "${cur}" "${want}"
        fi
    else
        if [ "${proposed}" = "${want}" ]; then
            printf '  %-32s %s -> %s\n' "${key}" "${cur}" "${proposed}"
        else
            printf '  %-32s %s -> %s (higher fields kept; the profile'"'"'s %s)\n' \
                "${key}" "${cur}" "${proposed}" "${want}"
        fi
        to_write+=("${path}=${proposed}")
        changes=$((changes + 1))
    fi
done <"${here}/sysctl.conf"

# --- files ----------------------------------------------------------------------------------
# Shows how /etc/... would change; with --apply installs it.
install_file() {
    local proposed=$1 dest=$2 label=$3
    local current="${root}${dest}"
    echo
    echo "${label} (${dest})"
    if [ -f "${current}" ] && cmp -s "${current}" "${proposed}"; then
        echo "  unchanged"
        return
    fi
    changes=$((changes + 1))
    diff -u --label "${dest} (current)" --label "${dest} (proposed)" \
        "$([ -f "${current}" ] && echo "${current}" || echo /dev/null)" "${proposed}" |
        sed 's/^/  /' || true
    if [ "${apply}" = 1 ]; then
        mkdir -p "$(dirname "${current}")"
        install -m 0644 "${proposed}" "${current}"
        echo "  installed"
    fi
}

if [ "${apply}" = 1 ]; then
    for entry in "${to_write[@]}"; do
        echo "${entry#*=}" >"${entry%%=*}"
    done
    [ "${#to_write[@]}" = 0 ] || echo "  written to /proc/sys"
fi
install_file "${sysctl_file}" /etc/sysctl.d/90-ringcast.conf "sysctl at boot"
install_file "${here}/limits.conf" /etc/security/limits.d/90-ringcast.conf "open-files limits for login sessions"

unit_file="${work}/ringcast.service"
affinity=$(cpu_affinity_for_host)
if [ -n "${affinity}" ]; then
    sed "s/^CPUAffinity=.*/CPUAffinity=${affinity}/" "${here}/ringcast.service" >"${unit_file}"
else
    sed "s/^CPUAffinity=.*/# CPUAffinity= not set: 4 CPUs or fewer, every one runs a shard/" \
        "${here}/ringcast.service" >"${unit_file}"
fi
install_file "${unit_file}" /etc/systemd/system/ringcast.service "systemd unit"

echo
if [ "${kept_above}" != 0 ]; then
    echo "${kept_above} sysctls kept where the host is above the profile (--allow-lower sets the profile's values)"
fi
if [ "${changes}" = 0 ]; then
    echo "nothing to change: the host matches the profile"
elif [ "${apply}" = 1 ]; then
    echo "${changes} changes applied"
    if [ -z "${root}" ]; then
        echo "next: systemctl daemon-reload && systemctl restart ringcast"
    fi
else
    echo "${changes} changes proposed; run again with --apply, as root, to apply them"
fi

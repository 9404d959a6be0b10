#!/usr/bin/env bash
# Applies the ringcast latency host profile: what `ringcast doctor --latency` checks and can be
# changed at run time. Interrupts are moved off the shard cores (each /proc/irq/N and the
# default for new ones), every core gets the performance frequency governor, and transparent
# huge pages stop compacting behind the shards' back (enabled and defrag leave `always`).
#
# The shard cores are the isolated ones (/sys/devices/system/cpu/isolated), or --cores LIST.
# Isolation itself needs the kernel command line and a reboot: this prints the line, and never
# edits the boot loader.
#
# Dry run by default: prints every value as "current -> proposed" and changes nothing. With
# --apply (as root only) it writes them; running it again then proposes nothing (idempotent).
# An IRQ the kernel will not move (per-CPU interrupts) is reported and left alone. The values
# last until reboot; run it from a boot-time unit to keep them.
#
# usage: latency/apply.sh [--apply] [--cores LIST] [--root DIR]
#   --apply        write the changes (refused unless run as root)
#   --cores LIST   the shard cores (e.g. 2-7) when none are isolated yet
#   --root DIR     read and write /proc, /sys under DIR instead of / (a copy of a host, for
#                  tests); also RINGCAST_ROOT=DIR
set -euo pipefail

root=${RINGCAST_ROOT:-/}
apply=0
cores=""

usage() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; }

while [ $# -gt 0 ]; do
    case $1 in
        --apply) apply=1 ;;
        --cores) [ $# -ge 2 ] || { echo "latency/apply.sh: --cores needs a CPU list" >&2; exit 2; }
            cores=$2; shift ;;
        --cores=*) cores=${1#--cores=} ;;
        --root) [ $# -ge 2 ] || { echo "latency/apply.sh: --root needs a directory" >&2; exit 2; }
            root=$2; shift ;;
        --root=*) root=${1#--root=} ;;
        -h | --help) usage; exit 0 ;;
        *) echo "latency/apply.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

if [ "${apply}" = 1 ] && [ "$(id -u)" != 0 ]; then
    echo "latency/apply.sh: refusing to apply: writing /proc/irq and /sys needs root. Run it" \
        "with sudo, or without --apply for a dry run." >&2
    exit 1
fi
[ -d "${root}" ] || { echo "latency/apply.sh: root ${root} is not a directory" >&2; exit 2; }
root=${root%/}

# A CPU list (0-3,8) as one CPU number a line.
expand() {
    local part a b cpu
    for part in ${1//,/ }; do
        [[ "${part}" =~ ^[0-9]+(-[0-9]+)?$ ]] || { echo "bad CPU list: $1" >&2; return 1; }
        a=${part%-*} b=${part#*-}
        for ((cpu = a; cpu <= b; cpu++)); do echo "${cpu}"; done
    done
}

# CPU numbers on stdin as a list with ranges.
compress() {
    local out="" start="" prev="" cpu
    while read -r cpu; do
        if [ -n "${prev}" ] && [ "${cpu}" = $((prev + 1)) ]; then prev=${cpu}; continue; fi
        [ -z "${start}" ] || out+="${start}$([ "${prev}" = "${start}" ] || echo "-${prev}"),"
        start=${cpu} prev=${cpu}
    done
    [ -z "${start}" ] || out+="${start}$([ "${prev}" = "${start}" ] || echo "-${prev}")"
    echo "${out%,}"
}

# CPU numbers on stdin as a hex mask.
mask() {
    local -a nib=() cpu i out=""
    while read -r cpu; do
        i=$((cpu / 4))
        nib[i]=$(((${nib[i]:-0}) | (1 << (cpu % 4))))
    done
    for ((i = ${#nib[@]} - 1; i >= 0; i--)); do out+=$(printf '%x' "${nib[i]:-0}"); done
    echo "${out:-1}"
}

# The selected word of "always [madvise] never", or the whole text without brackets.
selected() {
    local text
    text=$(cat "$1")
    if [[ "${text}" =~ \[([a-z+]+)\] ]]; then echo "${BASH_REMATCH[1]}"; else echo "${text}"; fi
}

changes=0
refused=0
if [ "${apply}" = 1 ]; then
    echo "ringcast latency profile: applying under root ${root:-/}"
else
    echo "ringcast latency profile: dry run under root ${root:-/} (nothing is changed; --apply to apply)"
fi

# Writes VALUE to PATH (with --apply) and counts it; a write the kernel refuses is reported.
set_value() {
    local path=$1 value=$2 label=$3 cur=$4
    printf '  %-40s %s -> %s\n' "${label}" "${cur}" "${value}"
    changes=$((changes + 1))
    if [ "${apply}" = 1 ]; then
        if ! (echo "${value}" >"${path}") 2>/dev/null; then
            echo "    refused by the kernel (left as it is)"
            refused=$((refused + 1))
        fi
    fi
}

online=$(cat "${root}/sys/devices/system/cpu/online" 2>/dev/null || true)
isolated=$(tr -d ' \n' <"${root}/sys/devices/system/cpu/isolated" 2>/dev/null || true)
shard=${cores:-${isolated}}

# --- isolation (boot time) ------------------------------------------------------------------
echo
echo "isolated cores (kernel command line; needs a reboot)"
if [ -n "${isolated}" ]; then
    echo "  isolated: ${isolated} (unchanged)"
else
    proposal=${cores:-$(expand "${online:-0}" | tail -n +2 | compress)}
    if [ -n "${proposal}" ]; then
        echo "  none; add to GRUB_CMDLINE_LINUX in /etc/default/grub, then update-grub and reboot:"
        echo "    isolcpus=managed_irq,domain,${proposal} nohz_full=${proposal} rcu_nocbs=${proposal}"
    else
        echo "  none, and one core only: nothing to isolate"
    fi
fi

# --- interrupts -----------------------------------------------------------------------------
echo
echo "interrupts (/proc/irq)"
if [ -z "${shard}" ]; then
    echo "  skipped: no shard cores (none isolated; pass --cores LIST to choose them)"
else
    housekeeping=$(comm -23 <(expand "${online}" | sort) <(expand "${shard}" | sort) | sort -n | compress)
    if [ -z "${housekeeping}" ]; then
        echo "latency/apply.sh: the shard cores ${shard} are every online core (${online});" \
            "leave at least one to the OS" >&2
        exit 2
    fi
    echo "  shard cores ${shard}; interrupts go to ${housekeeping}"
    for f in "${root}"/proc/irq/*/smp_affinity_list; do
        [ -e "${f}" ] || continue
        cur=$(tr -d ' \n' <"${f}")
        if comm -12 <(expand "${cur}" | sort) <(expand "${shard}" | sort) | grep -q .; then
            irq=${f%/smp_affinity_list}
            set_value "${f}" "${housekeeping}" "IRQ ${irq##*/}" "${cur}"
        fi
    done
    f="${root}/proc/irq/default_smp_affinity"
    if [ -e "${f}" ]; then
        want=$(expand "${housekeeping}" | mask)
        cur=$(tr -d ' \n,' <"${f}" | sed 's/^0*//')
        [ "${cur}" = "${want}" ] || set_value "${f}" "${want}" "default_smp_affinity" "${cur:-0}"
    fi
    if [ -e "${root}/etc/default/irqbalance" ] &&
        ! grep -q '^IRQBALANCE_BANNED_CPULIST=' "${root}/etc/default/irqbalance"; then
        echo "  note: irqbalance will move them back: set IRQBALANCE_BANNED_CPULIST=${shard} in" \
            "/etc/default/irqbalance, or systemctl disable --now irqbalance"
    fi
fi

# --- frequency ------------------------------------------------------------------------------
echo
echo "frequency governor (/sys/devices/system/cpu/cpu*/cpufreq)"
found=0
for f in "${root}"/sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_governor; do
    [ -e "${f}" ] || continue
    found=1
    cur=$(tr -d ' \n' <"${f}")
    cpu=${f%/cpufreq/scaling_governor}
    [ "${cur}" = performance ] || set_value "${f}" performance "${cpu##*/}" "${cur}"
done
[ "${found}" = 1 ] || echo "  no cpufreq (a VM, or no driver): nothing to set"

# --- transparent huge pages -----------------------------------------------------------------
echo
echo "transparent huge pages (/sys/kernel/mm/transparent_hugepage)"
for pair in enabled:madvise defrag:defer+madvise; do
    name=${pair%%:*} want=${pair#*:}
    f="${root}/sys/kernel/mm/transparent_hugepage/${name}"
    [ -e "${f}" ] || { echo "  ${name}: absent"; continue; }
    cur=$(selected "${f}")
    if [ "${cur}" = always ]; then
        set_value "${f}" "${want}" "${name}" "${cur}"
    else
        printf '  %-40s %s (unchanged)\n' "${name}" "${cur}"
    fi
done

echo
if [ "${changes}" = 0 ]; then
    echo "nothing to change: the host matches the latency profile"
elif [ "${apply}" = 1 ]; then
    echo "$((changes - refused)) changes applied, ${refused} refused by the kernel"
else
    echo "${changes} changes proposed; run again with --apply, as root, to apply them"
fi

# Shared by the scripts in scripts/nspawn/. Sourced, never run.
#
# Environment understood by every script:
#   STASIS_SETUP_CACHE   cache directory of scripts/setup            (default /var/cache/stasis-setup)
#   STASIS_ROOTFS        the cached, pristine root filesystem         (default $STASIS_SETUP_CACHE/rootfs-bookworm)
#   STASIS_NSPAWN_DIR    where per-container directories live         (default /var/tmp/stasis-nspawn)
#
# Per-container directory $STASIS_NSPAWN_DIR/NAME:
#   upper/ work/   the overlayfs upper and work dirs: everything the container ever wrote
#   root/          the overlay mount (lower = $STASIS_ROOTFS, upper = upper/): the container's /
#   console.log    the container's console, all boots appended, each after a "=== boot N" line
#   nspawn.pid     PID of systemd-nspawn (host PID namespace) of the current or last boot
#   leader.pid     PID of the container's PID 1 (systemd), host PID namespace
#   leader.start   start time (clock ticks since host boot) of that PID, to detect PID reuse
#   exit-status    written when systemd-nspawn exits: its exit status (0 poweroff, 133 reboot)
#   boots          how many times the container was booted
#   lower          path of the lower dir used at the first boot (all boots must use the same one)
# shellcheck shell=bash

set -euo pipefail
export LC_ALL=C

NSPAWN_PROG="$(basename "$0")"
NSPAWN_LIB="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NSPAWN_BIN="$(cd "$NSPAWN_LIB/.." && pwd)"
SETUP_CACHE="${STASIS_SETUP_CACHE:-/var/cache/stasis-setup}"
ROOTFS="${STASIS_ROOTFS:-$SETUP_CACHE/rootfs-bookworm}"
ROOTFS="${ROOTFS%/}"
NSPAWN_DIR="${STASIS_NSPAWN_DIR:-/var/tmp/stasis-nspawn}"
NSPAWN_DIR="${NSPAWN_DIR%/}"
# Exit status for "the harness itself failed" (as opposed to the command run inside).
EX_HARNESS=125

log() { printf '%s: %s\n' "$NSPAWN_PROG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$NSPAWN_PROG" "$*" >&2; exit "$EX_HARNESS"; }

require_root() { [[ $(id -u) -eq 0 ]] || die "must run as root"; }

# Monotonic-ish wall clock in milliseconds, for the timings the scripts print.
now_ms() { local t; t="$(date +%s%N)"; printf '%s\n' "$((t / 1000000))"; }

missing_pkgs() {
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || printf '%s\n' "$p"
  done
}

# Installs host packages only when missing (so it never touches apt on a prepared machine).
ensure_host_pkgs() {
  local missing
  mapfile -t missing < <(missing_pkgs "$@")
  ((${#missing[@]})) || return 0
  log "installing on the host: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
    apt-get update -qq || apt-get update
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  }
}

# The Debian mirror this host already uses, from its own apt configuration (deb822 or one-line
# format). Nothing here names a registry host: whatever the machine is configured with is used.
system_mirror() {
  local uri=""
  if compgen -G '/etc/apt/sources.list.d/*.sources' >/dev/null; then
    uri="$(awk '
      /^[[:space:]]*$/ { if (u != "" && t ~ /(^| )deb( |$)/ && u !~ /security/ && s !~ /security/) { print u; exit } u=""; s=""; t=""; next }
      /^URIs:/ { u=$2 } /^Suites:/ { $1=""; s=$0 } /^Types:/ { $1=""; t=$0 }
      END { if (u != "" && t ~ /(^| )deb( |$)/ && u !~ /security/ && s !~ /security/) print u }' \
      /etc/apt/sources.list.d/*.sources | head -n1)"
  fi
  if [[ -z $uri && -r /etc/apt/sources.list ]]; then
    uri="$(awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z+]+:\/\//) { print $i; exit } }' /etc/apt/sources.list)"
  fi
  if [[ -z $uri ]] && compgen -G '/etc/apt/sources.list.d/*.list' >/dev/null; then
    uri="$(cat /etc/apt/sources.list.d/*.list | awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z+]+:\/\//) { print $i; exit } }')"
  fi
  [[ -n $uri ]] || die "could not find a Debian mirror in the host's apt sources (/etc/apt/sources.list{,.d})"
  printf '%s\n' "${uri%/}"
}

# The rootfs is complete only when build-rootfs stamped it.
rootfs_ready() { [[ -f "$ROOTFS/.stasis-rootfs-stamp" ]]; }

valid_name() {
  [[ $1 =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ ]] || die "bad container name '$1' (letters, digits, _ . -; at most 64)"
}

cdir() { printf '%s/%s\n' "$NSPAWN_DIR" "$1"; }

proc_start_time() { # field 22 of /proc/PID/stat (after the parenthesised comm, which may hold spaces)
  local s
  s="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  s="${s##*) }"
  awk '{ print $20 }' <<<"$s"
}

# Prints the leader PID of container NAME if it is running now (and the PID was not reused).
running_leader() {
  local d pid start
  d="$(cdir "$1")"
  [[ -f $d/leader.pid && ! -f $d/exit-status ]] || return 1
  pid="$(cat "$d/leader.pid")"
  start="$(proc_start_time "$pid")" || return 1
  [[ $start == "$(cat "$d/leader.start" 2>/dev/null)" ]] || return 1
  printf '%s\n' "$pid"
}

nspawn_alive() {
  local d pid
  d="$(cdir "$1")"
  [[ -f $d/nspawn.pid && ! -f $d/exit-status ]] || return 1
  pid="$(cat "$d/nspawn.pid")"
  [[ -d /proc/$pid ]] && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == systemd-nspawn ]]
}

# NAME or leader PID -> leader PID of a running container (dies otherwise).
resolve_leader() {
  local arg="$1" pid
  if [[ $arg =~ ^[0-9]+$ ]]; then
    [[ -d /proc/$arg ]] || die "no process $arg"
    pid="$arg"
  else
    valid_name "$arg"
    pid="$(running_leader "$arg")" || die "container '$arg' is not running (see $(cdir "$arg")/console.log)"
  fi
  printf '%s\n' "$pid"
}

# Runs a command inside the container whose PID 1 is $1, with a clean environment.
# stdin/stdout/stderr are passed through; no other descriptor is (bash does not leak its own).
in_container() {
  local pid="$1"; shift
  nsenter -t "$pid" -a -- /usr/bin/env -i \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root USER=root LOGNAME=root LANG=C.UTF-8 TERM=dumb SYSTEMD_PAGER= SYSTEMD_COLORS=0 \
    "$@"
}

is_overlay_mounted() { findmnt -rn -M "$1" -t overlay >/dev/null 2>&1; }

# Creates $STASIS_NSPAWN_DIR/NAME and mounts its overlay (lower: the cached rootfs) if not mounted.
prepare_container() {
  local name="$1" d lower
  d="$(cdir "$name")"
  rootfs_ready || die "no complete rootfs at $ROOTFS: run scripts/nspawn/build-rootfs (and install-host-criu)"
  mkdir -p "$d/upper" "$d/work" "$d/root"
  if [[ -f $d/lower ]]; then
    lower="$(cat "$d/lower")"
    [[ $lower == "$ROOTFS" ]] || die "container '$name' was created on $lower, not $ROOTFS (destroy it first)"
  else
    printf '%s\n' "$ROOTFS" >"$d/lower"
  fi
  if ! is_overlay_mounted "$d/root"; then
    mount -t overlay "stasis-nspawn-$name" \
      -o "lowerdir=$ROOTFS,upperdir=$d/upper,workdir=$d/work" "$d/root" ||
      die "could not mount the overlay for '$name' on $d/root"
  fi
}

# Takes the per-container lock (fd 8) so boot/shutdown/destroy of one container do not interleave.
lock_container() {
  local d
  d="$(cdir "$1")"
  mkdir -p "$d"
  exec 8>>"$d/lock"
  flock 8
}

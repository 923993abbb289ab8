# Shared by scripts/vm/build and scripts/vm/run. Sourced, never run.
#
# Reuses scripts/nspawn/lib/common.sh (log/die, the host's mirror, host packages, now_ms).
#
# Environment:
#   STASIS_SETUP_CACHE   cache directory of scripts/setup           (default /var/cache/stasis-setup)
#   STASIS_VM_DIR        everything of the VM                        (default $STASIS_SETUP_CACHE/vm)
#
# $STASIS_VM_DIR:
#   image/        the built VM: vmlinuz, initrd.img, rootfs.img (ext4, raw), .stasis-vm-stamp,
#                 packages (what is installed in it); replaced as a whole by a rebuild
#   debs/         apt's archive cache for the guest's packages (kept across rebuilds)
#   build.lock    serialises builds; a run holds it shared so a build never swaps a booting image
#   run.lock      at most one VM at a time on this host
#   runs/         one directory per run (control share, console log, qemu's pidfile); the last
#                 few are kept for a post-mortem
# shellcheck shell=bash

source "$(cd "$(dirname "${BASH_SOURCE[0]}")/../nspawn/lib" && pwd)/common.sh"
NSPAWN_PROG="vm/$(basename "$0")"
# A command that fails under set -e says so (no silent exits).
trap 'printf "%s: error: unexpected failure (status %s) at line %s: %s\n" "$NSPAWN_PROG" "$?" "$LINENO" "$BASH_COMMAND" >&2' ERR

VM_DIR="${STASIS_VM_DIR:-$SETUP_CACHE/vm}"
VM_DIR="${VM_DIR%/}"
VM_IMAGE="$VM_DIR/image"
VM_STAMP="$VM_IMAGE/.stasis-vm-stamp"
VM_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

# The host packages the VM needs (scripts/setup installs them too): the emulator, mkfs.ext4 -d
# for the image, xz and readelf to unpack the kernel.
VM_HOST_PKGS=(qemu-system-x86 e2fsprogs xz-utils binutils)

#!/usr/bin/env bash
# An emulated Debian bookworm arm64 root file system (what Raspberry Pi OS bookworm is built on:
# same libc, CPython 3.11) for checking that the device runtime installs and runs there offline.
# Runs aarch64 binaries on an x86-64 host through qemu user-mode emulation and binfmt_misc.
# Needs root (mounts, chroot, binfmt_misc registration).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SUITE=bookworm
MIRROR="${ARM64_MIRROR:-http://deb.debian.org/debian}"
# Outside the checkout, so clean clones (CI) on this machine reuse it.
CACHE="${EDGEPACK_ARM64_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgepack/arm64-rootfs}"
DIR="$CACHE/$SUITE"
STAMP="$CACHE/$SUITE.done"          # written last: a folder without it is half-finished
TARBALL="$CACHE/$SUITE.tar.zst"     # re-extracting (~10 s) beats a new debootstrap (minutes)
BIND="${ARM64_BIND:-$REPO}"         # host folder visible inside at the same path
CPU="${ARM64_CPU:-cortex-a72}"      # Raspberry Pi 4; cortex-a76: Pi 5, cortex-a53: Pi 3
INCLUDE=python3,python3-venv,python3-pip,ca-certificates
BINFMT=/proc/sys/fs/binfmt_misc
# The kernel's binfmt_misc line for aarch64 ELF. Flag F opens the interpreter now, at
# registration, so it works inside a chroot that has no qemu of its own.
REGISTER=':qemu-aarch64:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:/usr/bin/qemu-aarch64-static:F'

usage() {
    cat <<EOF
Usage: scripts/arm64-rootfs.sh [create | run -- CMD... | path | clean | --help]

  create     (default) install host tools, register qemu-aarch64 with binfmt_misc and
             create the cached $SUITE arm64 root file system (no-op when it exists)
  run -- CMD run CMD inside it with no network; /proc, /dev, /sys and $BIND
             (ARM64_BIND) are bind-mounted, the working directory is $BIND,
             /tmp and /run are fresh tmpfs, /proc/cpuinfo is a Raspberry Pi's
  path       print the root file system's path
  clean      remove the folder (keeps the tarball; 'clean all' removes both)

Environment: ARM64_MIRROR (default $MIRROR), ARM64_BIND (default the repository root),
ARM64_CPU (qemu CPU, default $CPU = Raspberry Pi 4; cortex-a76 = Pi 5; cortex-a53 = Pi 3).
Example: scripts/arm64-rootfs.sh run -- python3 -c 'import platform; print(platform.machine())'
EOF
}

die() { echo "arm64-rootfs: error: $*" >&2; exit 1; }
log() { echo "==> $*" >&2; }

need_root() { [ "$(id -u)" = 0 ] || die "needs root (mount, chroot, binfmt_misc)"; }

ensure_host_tools() {
    local missing=() pkg cmd
    for pkg in debootstrap:debootstrap qemu-user-static:qemu-aarch64-static \
               binfmt-support:update-binfmts zstd:zstd; do
        cmd="${pkg#*:}"
        command -v "$cmd" >/dev/null || missing+=("${pkg%%:*}")
    done
    [ "${#missing[@]}" = 0 ] && return
    log "installing ${missing[*]} from Debian"
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
    nice -n 10 apt-get update -qq
    DEBIAN_FRONTEND=noninteractive nice -n 10 apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
}

binfmt_ok() { grep -q '^enabled' "$BINFMT/qemu-aarch64" 2>/dev/null \
              && grep -q '^flags: .*F' "$BINFMT/qemu-aarch64"; }

ensure_binfmt() {
    binfmt_ok && return
    # Containers without privileges cannot mount binfmt_misc or write its register file;
    # there is no way around that from inside (the host must register qemu-aarch64 with F).
    if [ ! -w "$BINFMT/register" ]; then
        mount -t binfmt_misc binfmt_misc "$BINFMT" 2>/dev/null \
            || die "cannot mount binfmt_misc at $BINFMT (unprivileged container, or kernel without CONFIG_BINFMT_MISC); ask the host to register qemu-aarch64 with flag F"
    fi
    # An entry switched off with 'echo 0': update-binfmts calls it "already enabled".
    if grep -q '^flags: .*F' "$BINFMT/qemu-aarch64" 2>/dev/null; then
        echo 1 > "$BINFMT/qemu-aarch64"
    fi
    # Debian's own entry (flags PF, interpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P,
    # which keeps argv[0]); our F-only line below is the fallback.
    binfmt_ok || update-binfmts --enable qemu-aarch64 2>/dev/null || true
    if ! binfmt_ok; then
        log "registering qemu-aarch64 with binfmt_misc by hand"
        [ -e "$BINFMT/qemu-aarch64" ] && echo -1 > "$BINFMT/qemu-aarch64"   # drop a non-F entry
        printf '%s' "$REGISTER" > "$BINFMT/register" \
            || die "cannot write $BINFMT/register (read-only or not permitted here)"
    fi
    binfmt_ok || die "qemu-aarch64 is not registered with flag F in $BINFMT"
}

# Mounts made under the root file system on the host would make 'rm -rf' reach into /proc,
# /dev or the repository. debootstrap and 'run' use a private mount namespace so this should
# never happen; refuse rather than guess.
no_mounts_under() {
    if awk -v d="$DIR" '$2 == d || index($2, d "/") == 1 { found = 1 } END { exit !found }' /proc/mounts; then
        die "something is mounted under $DIR (see /proc/mounts); unmount it first"
    fi
}

create() {
    need_root
    ensure_host_tools
    ensure_binfmt
    [ -f "$STAMP" ] && [ -d "$DIR" ] && return
    no_mounts_under
    rm -rf "$DIR" "$STAMP"
    mkdir -p "$CACHE"
    local start=$SECONDS
    if [ -f "$TARBALL" ]; then
        log "extracting $TARBALL"
        mkdir "$DIR"
        nice -n 10 tar -C "$DIR" --numeric-owner -I zstd -xpf "$TARBALL"
    else
        log "debootstrap $SUITE arm64 into $DIR (under emulation: several minutes)"
        # With the F flag the one-step form works: debootstrap's second stage runs arm64
        # binaries in the chroot through the host's qemu. A private mount namespace means the
        # /proc and /sys it mounts there disappear even if it is killed half-way.
        nice -n 10 unshare --mount --propagation private \
            debootstrap --arch=arm64 --variant=minbase --include="$INCLUDE" \
            "$SUITE" "$DIR" "$MIRROR" \
            || die "debootstrap failed (log: $DIR/debootstrap/debootstrap.log)"
        # The downloaded .deb files are not needed offline; they double the size.
        rm -rf "$DIR"/var/cache/apt/archives/*.deb "$DIR"/var/lib/apt/lists/*_Packages
        log "writing $TARBALL"
        nice -n 10 tar -C "$DIR" --numeric-owner -I 'zstd -T0 -3' -cpf "$TARBALL.partial" .
        mv "$TARBALL.partial" "$TARBALL"
    fi
    date -u +"%FT%TZ $SUITE $INCLUDE" > "$STAMP"
    log "root file system ready in $((SECONDS - start)) s: $DIR"
}

# run: re-enter this script in new mount and network namespaces. The namespace holds the bind
# mounts, so they vanish with it however the command ends (no trap, no stale mounts on the
# host); the network namespace has only a downed loopback, so nothing inside can connect out.
run() {
    [ "${1:-}" = -- ] && shift
    [ "$#" -gt 0 ] || die "usage: scripts/arm64-rootfs.sh run -- CMD..."
    create
    [ -d "$BIND" ] || die "ARM64_BIND=$BIND is not a folder"
    exec unshare --mount --propagation private --net -- "${BASH_SOURCE[0]}" _inside "$@"
}

# qemu-user 7.2 shows the host's x86 /proc/cpuinfo to arm64 programs, and 'import onnxruntime'
# (its cpuinfo library reads that file) segfaults on it; a real Pi shows its own. So: a
# Raspberry Pi's /proc/cpuinfo for the emulated CPU, one entry per host core.
fake_cpuinfo() {
    local part=0xd08 variant=0x0 rev=3 model="Raspberry Pi 4 Model B Rev 1.4"
    local features="fp asimd evtstrm crc32 cpuid" i n
    case "$CPU" in
        cortex-a53) part=0xd03 rev=4 model="Raspberry Pi 3 Model B Rev 1.2" ;;
        cortex-a76) part=0xd0b variant=0x4 rev=1 model="Raspberry Pi 5 Model B Rev 1.0"
                    features="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp" ;;
    esac
    n="$(grep -c '^processor' /proc/cpuinfo)"
    for ((i = 0; i < n; i++)); do
        printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: %s\nCPU implementer\t: 0x41\n' "$i" "$features"
        printf 'CPU architecture: 8\nCPU variant\t: %s\nCPU part\t: %s\nCPU revision\t: %s\n\n' "$variant" "$part" "$rev"
    done
    printf 'Model\t\t: %s\n' "$model"
}

inside() {   # runs in the new namespaces, still on the host's file system
    local m
    for m in proc dev sys; do
        mount --rbind "/$m" "$DIR/$m"
    done
    # Fresh /tmp and /run per run, as on a booted system: scratch work (venvs) stays out of
    # the cached tree.
    mount -t tmpfs tmpfs "$DIR/tmp"
    mount -t tmpfs tmpfs "$DIR/run"
    mkdir "$DIR/run/lock"
    fake_cpuinfo > "$DIR/run/cpuinfo"
    mount --bind "$DIR/run/cpuinfo" "$DIR/proc/cpuinfo"
    mkdir -p "$DIR$BIND"
    mount --rbind "$BIND" "$DIR$BIND"
    # A clean environment: the host's PATH (pyenv, .venv) means nothing inside. QEMU_CPU
    # (read by qemu at every exec) limits the instruction set to the Pi's.
    QEMU_CPU="$CPU" exec chroot "$DIR" /usr/bin/env -i -C "$BIND" HOME=/root LANG=C.UTF-8 \
        QEMU_CPU="$CPU" PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"
}

clean() {
    need_root
    no_mounts_under
    rm -rf "$DIR" "$STAMP"
    [ "${1:-}" = all ] && rm -f "$TARBALL"
    log "removed $DIR${1:+ and $TARBALL}"
}

cmd="${1:-create}"
[ "$#" -gt 0 ] && shift
case "$cmd" in
    create)          create ;;
    run)             run "$@" ;;
    _inside)         inside "$@" ;;
    path)            echo "$DIR" ;;
    clean)           clean "$@" ;;
    -h|--help|help)  usage ;;
    *)               usage >&2; exit 2 ;;
esac

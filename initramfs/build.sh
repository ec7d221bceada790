#!/usr/bin/env bash
# Build the TauOS initramfs: target/tauos-initramfs.cpio.gz (newc, gzip).
#
# Contents: tau-init as /init and /sbin/init, /usr/bin/taucli, the service stand-in
# /usr/libexec/tau/tau-standin, a static busybox with applet links in /bin and /sbin,
# /etc/tau/tau.toml (from initramfs/tau.toml, with [system] modules filled in),
# /etc/tau/units/*.toml (from units/), /etc/passwd and /etc/group, and the kernel
# modules for the persistent disk (virtio_pci, virtio_blk, ext4 and dependencies) in
# /lib/modules/tau, taken from Debian's kernel package (the one qemu/run.sh boots).
#
# Usage: initramfs/build.sh [--units DIR]... [--out FILE] [--init FILE] [--no-modules]
#   --units DIR   also install DIR/*.toml into /etc/tau/units and DIR/bin/* into
#                 /usr/local/bin, DIR/etc/* into /etc/tau (repeatable; a unit with the same
#                 name replaces ours)
#   --out FILE    output image (default: target/tauos-initramfs.cpio.gz)
#   --init FILE   use FILE as /init and /sbin/init instead of tau-init, and do not build
#                 the root package (for booting a placeholder while tau-init is unfinished;
#                 taucli is still included if a release build of it exists)
#   --no-modules  leave the kernel modules out (modules = [])
# The staging tree is kept next to the image (FILE minus .cpio.gz, plus .root). As root,
# `tau-init --validate` is run in it (chroot) and problems are printed as warnings.
set -euo pipefail

export TAU_LOG_TAG=build
# shellcheck source-path=SCRIPTDIR source=../qemu/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/../qemu/common.sh"

RUST_TARGET=x86_64-unknown-linux-gnu
OUT="$TAU_TARGET_DIR/tauos-initramfs.cpio.gz"
EXTRA_UNITS=()
INIT_OVERRIDE=""
WITH_MODULES=1

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        --units) [ $# -ge 2 ] || tau_die "--units needs a DIR"; EXTRA_UNITS+=("$(cd "$2" && pwd)") || tau_die "no dir $2"; shift 2 ;;
        --out) [ $# -ge 2 ] || tau_die "--out needs a FILE"; OUT="$2"; shift 2 ;;
        --init) [ $# -ge 2 ] || tau_die "--init needs a FILE"; INIT_OVERRIDE="$(realpath "$2")"; shift 2 ;;
        --no-modules) WITH_MODULES=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) tau_die "unknown option $1 (see --help)" ;;
    esac
done
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac

tau_ensure_pkgs cpio gzip file kmod xz-utils zstd

# ---- 1. static binaries ---------------------------------------------------------------
# --target keeps RUSTFLAGS away from build scripts and proc macros.
cargo_build() {
    tau_log "cargo build --release --target $RUST_TARGET $*"
    (cd "$TAU_REPO_ROOT" && RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --release --target "$RUST_TARGET" "$@" >&2)
}
BIN_DIR="$TAU_TARGET_DIR/$RUST_TARGET/release"
if [ -z "$INIT_OVERRIDE" ]; then
    cargo_build -p tau-init --bin tau-init --bin taucli -p tau-standin --bin tau-standin
else
    cargo_build -p tau-standin --bin tau-standin
fi

check_static() {
    local desc
    desc="$(file -bL "$1")"
    case "$desc" in
        *"statically linked"*|*"static-pie linked"*) ;;
        *) tau_die "$1 is not static: $desc" ;;
    esac
}

# ---- 2. busybox-static (apt-get download, not install: it conflicts with busybox) ------
BUSYBOX="$(tau_fetch_deb busybox-static "$TAU_TARGET_DIR/busybox-static")/bin/busybox"
[ -x "$BUSYBOX" ] || tau_die "no busybox in busybox-static"
check_static "$BUSYBOX"

# ---- 3. the root tree --------------------------------------------------------------------
# Staging tree next to the image (kept for inspection: chroot it, diff it).
ROOT="${OUT%.cpio.gz}.root"
rm -rf "$ROOT"
mkdir -p "$ROOT"
cd "$ROOT"
mkdir -p bin sbin usr/bin usr/sbin usr/local/bin usr/libexec/tau etc/tau/units \
    lib/modules/tau proc sys dev run tmp var mnt root
chmod 1777 tmp
chmod 0700 root

install_bin() {   # install_bin SRC DEST (DEST relative to the root)
    [ -f "$1" ] || tau_die "missing binary $1"
    check_static "$1"
    install -m 0755 "$1" "$ROOT/$2"
}
if [ -z "$INIT_OVERRIDE" ]; then
    install_bin "$BIN_DIR/tau-init" init
    install_bin "$BIN_DIR/taucli" usr/bin/taucli
else
    install -m 0755 "$INIT_OVERRIDE" init
    if [ -f "$BIN_DIR/taucli" ]; then install_bin "$BIN_DIR/taucli" usr/bin/taucli; fi
fi
ln -s /init sbin/init
install_bin "$BIN_DIR/tau-standin" usr/libexec/tau/tau-standin
install_bin "$BUSYBOX" bin/busybox

# Applet links: sbin applets into /sbin, everything else into /bin; never replace a file.
while IFS= read -r applet; do
    case "$applet" in
        sbin/*|usr/sbin/*) link="sbin/${applet##*/}" ;;
        *) link="bin/${applet##*/}" ;;
    esac
    [ -e "$link" ] || [ -L "$link" ] || ln -s /bin/busybox "$link"
done < <("$BUSYBOX" --list-full)

cat > etc/passwd <<'PASSWD'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
PASSWD
cat > etc/group <<'GROUP'
root:x:0:
nobody:x:65534:
nogroup:x:65534:
GROUP
echo tauos > etc/hostname

# Units: ours, then each --units DIR (same file name replaces).
install -m 0644 "$TAU_REPO_ROOT"/units/*.toml etc/tau/units/
for dir in "${EXTRA_UNITS[@]}"; do
    found=0
    for f in "$dir"/*.toml; do [ -f "$f" ] || continue; install -m 0644 "$f" etc/tau/units/; found=1; done
    if [ -d "$dir/bin" ]; then
        for f in "$dir"/bin/*; do [ -f "$f" ] || continue; install -m 0755 "$f" usr/local/bin/; found=1; done
    fi
    if [ -d "$dir/etc" ]; then
        for f in "$dir"/etc/*; do [ -f "$f" ] || continue; install -m 0644 "$f" etc/tau/; found=1; done
    fi
    [ "$found" = 1 ] || tau_log "warning: nothing to install from $dir"
done

# ---- 4. kernel modules for the persistent disk -------------------------------------------
MODULES=()
if [ "$WITH_MODULES" = 1 ]; then
    tau_kernel
    declare -A KO_PATH=() SEEN=()
    while IFS= read -r f; do
        name="${f##*/}"; name="${name%%.ko*}"; name="${name//-/_}"
        KO_PATH[$name]="$f"
    done < <(find "$TAU_KMODDIR/kernel" -name '*.ko*')
    BUILTIN=" $(sed 's|.*/||; s|\.ko.*||; s|-|_|g' "$TAU_KMODDIR/modules.builtin" | tr '\n' ' ') "

    # Soft dependencies name aliases such as crypto-crc32c; map them to a module.
    resolve() {
        local n="${1//-/_}" c
        for c in "$n" "${n#crypto_}" "${n#crypto_}_generic"; do
            if [ -n "${KO_PATH[$c]:-}" ] || [[ "$BUILTIN" == *" $c "* ]]; then echo "$c"; return; fi
        done
        tau_die "cannot resolve module $1"
    }
    add_module() {   # depth-first: dependencies (and softdep pre:) before the module
        local m dep soft
        m="$(resolve "$1")"
        [ -z "${SEEN[$m]:-}" ] || return 0
        SEEN[$m]=1
        if [[ "$BUILTIN" == *" $m "* ]]; then tau_log "module $m is builtin: skipped"; return; fi
        soft="$(modinfo -F softdep "${KO_PATH[$m]}" | sed -n 's/.*pre:\(.*\)/\1/p; ' | sed 's/post:.*//')"
        for dep in $(modinfo -F depends "${KO_PATH[$m]}" | tr ',' ' ') $soft; do
            add_module "$dep"
        done
        MODULES+=("$m.ko")
        case "${KO_PATH[$m]}" in
            *.ko) cp "${KO_PATH[$m]}" "lib/modules/tau/$m.ko" ;;
            *.ko.xz) xz -dc "${KO_PATH[$m]}" > "lib/modules/tau/$m.ko" ;;
            *.ko.zst) zstd -qdc "${KO_PATH[$m]}" > "lib/modules/tau/$m.ko" ;;
            *.ko.gz) gzip -dc "${KO_PATH[$m]}" > "lib/modules/tau/$m.ko" ;;
            *) tau_die "unknown module format ${KO_PATH[$m]}" ;;
        esac
    }
    # virtio_pci is the transport virtio_blk sits on (not a declared dependency).
    for m in virtio_pci virtio_blk ext4; do add_module "$m"; done
    tau_log "modules (kernel $TAU_KVER): ${MODULES[*]}"
fi

# ---- 5. tau.toml with [system] modules -------------------------------------------------
mod_list=""
for m in "${MODULES[@]}"; do mod_list+="${mod_list:+, }\"$m\""; done
grep -q '^modules = ' "$TAU_REPO_ROOT/initramfs/tau.toml" || tau_die "initramfs/tau.toml has no 'modules = ' line"
sed "s|^modules = .*|modules = [$mod_list]|" "$TAU_REPO_ROOT/initramfs/tau.toml" > etc/tau/tau.toml

# ---- 6. let tau-init check config and units as they are laid out (warning only) ---------
if [ -z "$INIT_OVERRIDE" ] && [ "$(id -u)" = 0 ]; then
    if ! problems="$(chroot "$ROOT" /init --validate 2>&1)"; then
        tau_log "warning: tau-init --validate in the image root found problems:"
        printf '%s\n' "$problems" >&2
    fi
fi

# ---- 7. the cpio archive -----------------------------------------------------------------
if [ "$(id -u)" = 0 ]; then
    mknod -m 0600 dev/console c 5 1
    mknod -m 0666 dev/null c 1 3
else
    tau_log "warning: not root: no /dev/console node in the image"
fi
mkdir -p "$(dirname "$OUT")"
find . -mindepth 1 -print0 | LC_ALL=C sort -z \
    | cpio --null --create --format=newc --owner=0:0 --quiet \
    | gzip -9 > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
tau_log "image: $OUT ($(du -h --apparent-size "$OUT" | cut -f1), $(stat -c %s "$OUT") bytes)"

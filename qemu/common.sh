# shellcheck shell=bash
# Shared helpers for initramfs/build.sh and qemu/run.sh. Source it; do not run it.
#
# Everything fetched comes from Debian's apt repositories and is cached under
# $TAU_TARGET_DIR (default: <repo>/target, or $CARGO_TARGET_DIR when set).

TAU_REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TAU_TARGET_DIR="${CARGO_TARGET_DIR:-$TAU_REPO_ROOT/target}"
case "$TAU_TARGET_DIR" in /*) ;; *) TAU_TARGET_DIR="$TAU_REPO_ROOT/$TAU_TARGET_DIR" ;; esac
_TAU_APT_UPDATED=0

tau_log() { printf '[%s] %s\n' "${TAU_LOG_TAG:-tau}" "$*" >&2; }
tau_die() { tau_log "error: $*"; exit 1; }

tau_apt_update_once() {
    if [ "$_TAU_APT_UPDATED" = 0 ]; then
        tau_log "apt-get update"
        apt-get update -qq >&2 || tau_die "apt-get update failed"
        _TAU_APT_UPDATED=1
    fi
}

# tau_ensure_pkgs PKG...: apt-get install the Debian packages that are not installed yet.
tau_ensure_pkgs() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    [ "$(id -u)" = 0 ] || tau_die "need root to install: ${missing[*]}"
    tau_apt_update_once
    tau_log "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2 \
        || tau_die "apt-get install ${missing[*]} failed"
}

# tau_apt_candidate PKG: print the candidate version of PKG (updating the lists if unknown).
tau_apt_candidate() {
    local v
    v="$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2}')"
    if [ -z "$v" ] || [ "$v" = "(none)" ]; then
        tau_apt_update_once
        v="$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2}')"
    fi
    [ -n "$v" ] && [ "$v" != "(none)" ] || return 1
    printf '%s\n' "$v"
}

# tau_fetch_deb PKG CACHE: apt-get download PKG (candidate version) and unpack it with
# dpkg-deb -x into CACHE/PKG_VERSION; print that directory. Cached.
tau_fetch_deb() {
    local pkg="$1" cache="$2" ver dir tmp deb
    ver="$(tau_apt_candidate "$pkg")" || tau_die "no apt candidate for $pkg"
    dir="$cache/${pkg}_${ver//:/%}"
    if [ ! -e "$dir/.complete" ]; then
        tau_log "fetching $pkg $ver (apt-get download)"
        mkdir -p "$cache"
        tmp="$(mktemp -d "$cache/.tmp.XXXXXX")"
        # _apt cannot write into root-owned 0700 temp dirs; that warning is harmless.
        (cd "$tmp" && apt-get download -qq "$pkg=$ver" >&2 2>/dev/null) \
            || (cd "$tmp" && tau_apt_update_once && apt-get download -qq "$pkg=$ver" >&2) \
            || { rm -rf "$tmp"; tau_die "apt-get download $pkg=$ver failed"; }
        deb="$(find "$tmp" -maxdepth 1 -name '*.deb' | head -n1)"
        mkdir -p "$tmp/root"
        dpkg-deb -x "$deb" "$tmp/root"
        rm -f "$deb"
        touch "$tmp/root/.complete"
        rm -rf "$dir"
        mv "$tmp/root" "$dir" || [ -e "$dir/.complete" ]   # lost a race: fine
        rm -rf "$tmp"
    fi
    printf '%s\n' "$dir"
}

# tau_kernel: fetch Debian's kernel (the versioned package linux-image-amd64 depends on)
# and set TAU_KERNEL_ROOT (unpacked package), TAU_VMLINUZ, TAU_KVER, TAU_KMODDIR.
# $TAU_KERNEL_PKG overrides the package name.
tau_kernel() {
    local pkg="${TAU_KERNEL_PKG:-}"
    if [ -z "$pkg" ]; then
        pkg="$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')"
        if [ -z "$pkg" ]; then
            tau_apt_update_once
            pkg="$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')"
        fi
        [ -n "$pkg" ] || tau_die "cannot resolve the package linux-image-amd64 depends on"
    fi
    TAU_KERNEL_ROOT="$(tau_fetch_deb "$pkg" "$TAU_TARGET_DIR/qemu-kernel")"
    TAU_VMLINUZ="$(find "$TAU_KERNEL_ROOT/boot" -maxdepth 1 -name 'vmlinuz-*' | sort | tail -n1)"
    [ -n "$TAU_VMLINUZ" ] || tau_die "no vmlinuz in $pkg"
    TAU_KVER="${TAU_VMLINUZ##*/vmlinuz-}"
    TAU_KMODDIR="$TAU_KERNEL_ROOT/lib/modules/$TAU_KVER"
    [ -d "$TAU_KMODDIR" ] || tau_die "no modules dir $TAU_KMODDIR"
    export TAU_KERNEL_ROOT TAU_VMLINUZ TAU_KVER TAU_KMODDIR
}

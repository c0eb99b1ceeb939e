# Shared by the pxe-assets build scripts (sourced, not run): Debian packages through apt only.
# The caller defines `say` and `die` (apt_missing needs neither); the .deb functions use $cache
# (where .deb files are kept), the kernel ones $meta (a linux-image meta-package), and set $pkg,
# $ver and $deb.
. "$(dirname "${BASH_SOURCE[0]}")/cache-lib.sh"

# The packages among "$@" that dpkg does not list as installed, one per line (the one copy of
# this check: vm-tests/install-deps.sh and pxe-assets/install-loaders.sh use it too).
apt_missing() {
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || printf '%s\n' "$p"
  done
}

# Installs the packages that are missing; refreshes stale package lists and retries once.
apt_ensure() {
  local need=()
  mapfile -t need < <(apt_missing "$@")
  [ ${#need[@]} -gt 0 ] || return 0
  say "installing ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >&2 \
    || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive \
         apt-get install -y -q --no-install-recommends "${need[@]}" >&2; }
}

# The real kernel package behind the meta-package $meta, e.g. linux-image-6.1.0-56-amd64.
resolve_kernel_pkg() {
  apt-cache depends --no-recommends --no-suggests "$meta" 2>/dev/null \
    | sed -n 's/^ *Depends: \(linux-image-[^ ]*\)$/\1/p' | head -n1
}

# Sets ver (apt's candidate) and deb (the path the .deb will have in $cache) for $pkg.
_resolve_ver() {
  ver=$( [ -n "$pkg" ] && apt-cache show --no-all-versions "$pkg" 2>/dev/null | sed -n 's/^Version: //p' | head -n1 || true)
  deb="$cache/${pkg}_${ver//:/%3a}_$(dpkg --print-architecture).deb"
}

# Sets pkg, ver and deb (the path the .deb will have in $cache) for $meta; refreshes the package
# lists once when apt does not know it yet.
resolve_kernel_deb() {
  _resolve() {
    pkg=$(resolve_kernel_pkg)
    _resolve_ver
  }
  _resolve
  if [ -z "$pkg" ] || [ -z "$ver" ]; then
    say "apt knows no $meta yet: apt-get update"
    apt-get update -q >&2
    _resolve
  fi
  [ -n "$pkg" ] && [ -n "$ver" ] || die "cannot resolve the package behind $meta"
}

# Sets pkg, ver and deb for the plain package PKG (of this machine's architecture), its candidate
# version; refreshes the package lists once when apt does not know it yet.
resolve_deb() {
  pkg=$1
  _resolve_ver
  if [ -z "$ver" ]; then
    say "apt knows no $pkg yet: apt-get update"
    apt-get update -q >&2
    _resolve_ver
  fi
  [ -n "$ver" ] || die "apt knows no package $pkg"
}

# Downloads $deb unless a good copy is there (its SHA256 checked against apt's lists). One
# download at a time per cache directory ($cache/.lock, on file descriptor 8, released at the
# end); each download goes to a private directory and is renamed into place when it is whole.
# Stale package lists name a version the mirror no longer has: then the lists are refreshed once
# and the download retried.
download_deb() {
  _download() {
    local t
    t=$(mktemp -d "$cache/.download.XXXXXX")
    say "downloading $pkg $ver into $cache"
    (cd "$t" && apt-get download "$pkg=$ver" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2) || true
    local got=("$t"/*.deb)
    [ -s "${got[0]}" ] && mv "${got[0]}" "$deb"
    rm -rf "$t"
  }
  mkdir -p "$cache"
  exec 8>"$cache/.lock"
  flock -w 900 8 || die "timed out waiting for $cache/.lock"
  if ! deb_valid "$deb" "$pkg" "$ver"; then
    # Holding the lock, a private download directory that is still there belongs to a dead run.
    rm -rf "$cache"/.download.*
    _download
    if ! deb_valid "$deb" "$pkg" "$ver"; then
      say "download failed: apt-get update and retry"
      apt-get update -q >&2
      if [ -n "${meta:-}" ]; then resolve_kernel_deb; else resolve_deb "$pkg"; fi
      deb_valid "$deb" "$pkg" "$ver" || _download
    fi
    deb_valid "$deb" "$pkg" "$ver" || die "apt-get download $pkg=$ver produced no valid $deb"
  fi
  exec 8>&-
}

# Shared by the pxe-assets build scripts (sourced, not run): Debian packages through apt only.
# The caller defines `say`.

# Installs the packages that are missing; refreshes stale package lists and retries once.
apt_ensure() {
  local need=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
  done
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

# Shared by every script that builds a cached artefact (sourced, not run): the cache roots, one
# lock per artefact, mounts that never outlive a builder, and content checks before reuse.
#
# Cache roots (both may be pointed elsewhere; `SI_COLD=1 vm-tests/run.sh` points them at an empty
# temporary directory):
#   SI_CACHE       /var/cache/si-appliance       cargo target, downloaded .debs, client boot files
#   SI_TEST_CACHE  /var/cache/si-appliance-test  debootstrap trees, the lab's image store
#
# The rules every builder follows:
#   - one builder at a time per artefact: `cache_lock PATH SECONDS` (flock on PATH.lock; a
#     concurrent caller waits, then finds the artefact built and reuses it). The lock's file
#     descriptor is inherited by the builder's children, so a builder killed with SIGKILL keeps
#     the artefact locked until its last child (debootstrap, say) has ended too;
#   - a tree is built under DIR.tmp and renamed into place; the marker DIR.complete (outside the
#     tree) holds the recipe and a digest of the tree's listing, and is checked before any reuse
#     (`cache_tree_valid`); anything else at DIR is rebuilt;
#   - nothing is deleted while a mount is inside it: `cache_rm` unmounts every mount at or below
#     the path first (deepest first) and never crosses into another file system;
#   - long steps run through `cache_run_bounded`, so that SIGTERM or SIGINT reaches the builder's
#     trap at once (bash runs traps only between foreground commands), which stops the step,
#     unmounts what it mounted and removes its partial tree.
# The caller defines `say` and `die`.

SI_CACHE=${SI_CACHE:-/var/cache/si-appliance}
SI_TEST_CACHE=${SI_TEST_CACHE:-/var/cache/si-appliance-test}

# The first Debian URI of this machine's apt sources (the mirror debootstrap uses).
debian_mirror() {
  local m
  m="$(grep -hs -E '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null \
    | grep -o -E 'https?://[^ ]*debian[^ ]*' | grep -v -- '-security' | head -n1 || true)"
  echo "${m:-http://deb.debian.org/debian}"
}

# The Debian security archive of this machine's apt sources (for a root that must carry the
# security updates, e.g. the USB stick's).
debian_security_mirror() {
  local m
  m="$(grep -hs -E '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null \
    | grep -o -E 'https?://[^ ]*-security[^ ]*' | head -n1 || true)"
  echo "${m:-http://deb.debian.org/debian-security}"
}

# Takes the exclusive lock of an artefact (PATH.lock) on file descriptor 9, waiting at most
# SECONDS. Held until the script and all its children have exited.
cache_lock() {
  local path=$1 secs=${2:-900}
  mkdir -p "$(dirname "$path")"
  exec 9>"$path.lock"
  if ! flock -n 9; then
    say "waiting for $path.lock (another build of it is running)"
    flock -w "$secs" 9 || die "timed out after ${secs}s waiting for $path.lock"
  fi
}

# Every mount point at or below DIR, deepest first.
cache_mounts_under() {
  local d
  d=$(readlink -m "$1")
  awk -v d="$d" '{ m = $5; gsub(/\\040/, " ", m); if (m == d || index(m, d "/") == 1) print m }' \
    /proc/self/mountinfo | LC_ALL=C sort -r
}

# Unmounts every mount at or below DIR (a lazy unmount where a plain one is refused); fails if
# one is still there afterwards.
cache_umount_under() {
  local m left
  while read -r m; do
    [ -n "$m" ] || continue
    say "unmounting $m"
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done < <(cache_mounts_under "$1")
  left=$(cache_mounts_under "$1")
  [ -z "$left" ] || { say "still mounted: $left"; return 1; }
}

# Removes DIR after unmounting whatever is mounted inside it; never crosses a file system
# boundary (so a mount that could not be removed is never emptied).
cache_rm() {
  local d=$1
  [ -e "$d" ] || [ -L "$d" ] || return 0
  cache_umount_under "$d" || die "refusing to remove $d: a mount inside it is still there"
  rm -rf --one-file-system -- "$d"
}

# A digest of a tree's listing: every path with its type, size, mode and link target. Cheap
# (no file contents are read) and it catches what breaks a cache in practice: a tree cut short,
# files removed, a tree replaced by another.
cache_tree_digest() {
  (cd "$1" && find . -xdev -printf '%P\t%y\t%s\t%m\t%l\n' | LC_ALL=C sort | sha256sum | cut -d' ' -f1)
}

# True when DIR is a finished build of RECIPE: DIR.complete names RECIPE and the listing digest
# of the tree as it is now, nothing is mounted inside it, and each KEY file (relative) exists.
cache_tree_valid() {
  local dir=$1 recipe=$2 key
  shift 2
  [ -d "$dir" ] && [ -f "$dir.complete" ] || return 1
  [ "$(sed -n 1p "$dir.complete")" = "$recipe" ] || return 1
  [ -z "$(cache_mounts_under "$dir")" ] || return 1
  for key in "$@"; do [ -e "$dir/$key" ] || [ -L "$dir/$key" ] || return 1; done
  [ "$(sed -n 2p "$dir.complete")" = "$(cache_tree_digest "$dir")" ]
}

# Moves the finished tree TMP into place at DIR and writes DIR.complete for RECIPE.
cache_tree_commit() {
  local tmp=$1 dir=$2 recipe=$3 digest
  cache_umount_under "$tmp" || die "a mount is still inside $tmp"
  digest=$(cache_tree_digest "$tmp")
  rm -f "$dir.complete"
  cache_rm "$dir"
  mv "$tmp" "$dir"
  printf '%s\n%s\n' "$recipe" "$digest" > "$dir.complete.tmp"
  mv "$dir.complete.tmp" "$dir.complete"
}

# The common start of a tree builder, called with the builder's arguments: `--check DIR` exits 0
# when DIR is a valid finished build and 1 otherwise; `[DIR]` (default DEFAULT) exits 0 at once
# when DIR is valid, else takes DIR's lock, checks again (another caller may have finished it
# meanwhile), removes what a dead builder left at DIR.tmp and arms the cleanup trap. Sets `dir`
# and `tmp`. Usage: cache_tree_start DEFAULT RECIPE LOCK_SECONDS "KEY…" "$@"
cache_tree_start() {
  local default=$1 recipe=$2 secs=$3 check=0
  local -a keys
  read -r -a keys <<<"$4"
  shift 4
  if [ "${1:-}" = --check ]; then check=1; shift; fi
  dir=$(readlink -m "${1:-$default}")
  tmp="$dir.tmp"
  if [ $check = 1 ]; then cache_tree_valid "$dir" "$recipe" "${keys[@]}"; exit; fi
  [ "$(id -u)" = 0 ] || die "run as root (debootstrap, chroot)"
  if cache_tree_valid "$dir" "$recipe" "${keys[@]}"; then say "reusing $dir"; exit 0; fi
  cache_lock "$dir" "$secs"
  if cache_tree_valid "$dir" "$recipe" "${keys[@]}"; then say "reusing $dir (built while we waited)"; exit 0; fi
  # Holding the lock, whatever is at DIR.tmp was left by a builder that is gone.
  cache_rm "$tmp"
  cache_tree_trap "$tmp"
}

# Runs a command bounded by SECONDS (timeout, then SIGKILL 30 s later) in the background and
# waits for it, so that a signal to this script runs its trap at once. Returns its exit status.
cache_child=
cache_run_bounded() {
  local secs=$1 rc=0
  shift
  timeout --kill-after=30 "$secs" "$@" &
  cache_child=$!
  wait "$cache_child" || rc=$?
  cache_child=
  return $rc
}

# Installs the trap of a tree builder: on any exit (error, SIGTERM, SIGINT, SIGHUP) the running
# step is stopped, everything mounted inside TMP is unmounted and TMP is removed.
cache_tree_trap() {
  cache_trap_tmp=$1
  trap 'cache_tree_cleanup' EXIT
  trap 'say "interrupted"; exit 143' TERM
  trap 'say "interrupted"; exit 130' INT
  trap 'say "hangup"; exit 129' HUP
}
cache_tree_cleanup() {
  local rc=$?
  trap - EXIT TERM INT HUP
  if [ -n "$cache_child" ]; then
    kill -TERM "$cache_child" 2>/dev/null || true
    # timeout passes the signal on to its command; give it a moment, then force it.
    for _ in $(seq 50); do kill -0 "$cache_child" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$cache_child" 2>/dev/null || true
    wait "$cache_child" 2>/dev/null || true
  fi
  if [ -n "${cache_trap_tmp:-}" ] && { [ -e "$cache_trap_tmp" ] || [ -n "$(cache_mounts_under "$cache_trap_tmp")" ]; }; then
    cache_umount_under "$cache_trap_tmp" || true
    [ -z "$(cache_mounts_under "$cache_trap_tmp")" ] && rm -rf --one-file-system -- "$cache_trap_tmp"
  fi
  exit "$rc"
}

# Checks a downloaded .deb against the SHA256 apt's package lists give for PKG=VER; removes it
# when it does not match (a download cut short, a file replaced). True when it is good.
deb_valid() {
  local deb=$1 pkg=$2 ver=$3 want have
  [ -s "$deb" ] || return 1
  want=$(apt-cache show --no-all-versions "$pkg=$ver" 2>/dev/null | sed -n 's/^SHA256: //p' | head -n1)
  have=$(sha256sum "$deb" | cut -d' ' -f1)
  if [ -n "$want" ] && [ "$want" != "$have" ]; then
    say "removing $deb: SHA256 $have, apt's lists say $want"
    rm -f "$deb"
    return 1
  fi
  # Without a digest from apt (lists refreshed since), the archive must at least be whole.
  [ -n "$want" ] || dpkg-deb --info "$deb" >/dev/null 2>&1 || { rm -f "$deb"; return 1; }
}

# The digests of a builder's output files, one line each (`sha256sum` format), for a check
# before reuse: `cache_files_digest FILE…` writes them; `cache_files_valid LIST` verifies them.
cache_files_valid() {
  [ -s "$1" ] && (cd "$(dirname "$1")" && sha256sum --quiet --strict -c "$(basename "$1")" >/dev/null 2>&1)
}

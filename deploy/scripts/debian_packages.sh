# Sourced by the install_*.sh scripts: unpack_debian_packages DEST WHAT PACKAGE... fetches Debian packages with
# `apt-get download` through this machine's own apt sources and unpacks them into DEST without root
# (dpkg-deb -x), replacing what DEST held only once all of them are unpacked. WHAT names the tool in errors.
unpack_debian_packages() {
  local dest=$1 what=$2
  shift 2
  if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then
    echo "$what: not on PATH, and no apt-get and dpkg-deb to fetch Debian's; install $1" >&2
    return 2
  fi
  local tmp
  tmp=$(mktemp -d)
  if ! (cd "$tmp" && apt-get download "$@" >"$tmp/apt.log" 2>&1); then
    echo "$what: apt-get download failed ($(grep -m1 -E '^E:' "$tmp/apt.log" || tail -n 1 "$tmp/apt.log"));" \
         "install $1, or run 'apt-get update' as root and try again" >&2
    rm -rf "$tmp"
    return 2
  fi
  rm -rf "$dest.new"
  mkdir -p "$dest.new"
  for deb in "$tmp"/*.deb; do dpkg-deb -x "$deb" "$dest.new"; done
  rm -rf "$tmp" "$dest"
  mv "$dest.new" "$dest"
}

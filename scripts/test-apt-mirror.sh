#!/usr/bin/env bash
# Tests scripts/apt-mirror.sh (the Debian mirror scripts/docker-base.sh takes from the machine's apt sources)
# on sample apt configurations: deb822 and one-line formats, comments, `[arch=...]` options, disabled and
# deb-src entries, the security archive, foreign suites, apt's file order, and the fallbacks. .ci/run runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/apt-mirror.sh
. scripts/apt-mirror.sh

TMP="$(mktemp -d "${TMPDIR:-/tmp}/fedsb-apt-mirror.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
failed=0
n=0

# root NAME: a fresh configuration root; write its files with `put`.
root() {
  R="$TMP/$1"
  mkdir -p "$R/etc/apt/sources.list.d"
}
put() { cat >"$R/etc/apt/$1"; }

# expect WANT: the mirrors apt_debian_mirrors finds under $R (one per line; `` for none).
expect() {
  local got
  got="$(apt_debian_mirrors "$R")"
  n=$((n + 1))
  if [ "$got" != "$1" ]; then
    printf 'FAIL %s: expected [%s], got [%s]\n' "$(basename "$R")" "$1" "$got" >&2
    failed=$((failed + 1))
  fi
}

root deb822
put sources.list.d/debian.sources <<'EOF'
# Debian's default since bookworm.
Types: deb deb-src
URIs: http://security.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb deb-src
# a comment inside a paragraph
URIs: http://mirror.example.org/debian/
Suites: bookworm bookworm-updates
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
expect "http://mirror.example.org/debian"

root deb822-disabled-and-src
put sources.list.d/a.sources <<'EOF'
Types: deb
URIs: http://disabled.example/debian
Suites: bookworm
Components: main
Enabled: no

Types: deb-src
URIs: http://src-only.example/debian
Suites: bookworm
Components: main

types: deb
uris: https://lowercase.example/debian https://second.example/debian
suites: trixie
components: main
EOF
expect "https://lowercase.example/debian
https://second.example/debian"

root one-line
put sources.list <<'EOF'
# deb http://commented.example/debian bookworm main
#deb http://commented-too.example/debian bookworm main
deb-src http://src.example/debian bookworm main
deb http://security.debian.org/debian-security bookworm-security main
deb [arch=amd64 signed-by=/usr/share/keyrings/docker.gpg] https://download.docker.com/linux/debian bookworm stable
deb [arch=amd64,arm64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://one.example/debian bookworm main # an inline comment
deb http://one.example/debian bookworm-updates main
  deb [ arch=amd64 ] http://spaced-options.example/debian/ bookworm main
EOF
expect "http://one.example/debian
http://spaced-options.example/debian"

# Ubuntu's archive, a PPA, a vendor's repository, a source without `main`, a foreign suite on a /debian path
# and non-http URIs are no Debian mirrors: nothing found.
root foreign
put sources.list <<'EOF'
deb http://archive.ubuntu.com/ubuntu jammy main restricted
deb http://ppa.example/someone/ubuntu noble main
deb http://vendor.example/apt bookworm main
deb http://only-contrib.example/debian bookworm contrib
deb http://ftp.example/debian jammy main
deb cdrom:[Debian GNU/Linux 12]/ bookworm main
deb file:/srv/local-debian bookworm main
EOF
put sources.list.d/ubuntu.sources <<'EOF'
Types: deb
URIs: http://archive.ubuntu.com/ubuntu/
Suites: noble noble-updates
Components: main
EOF
expect ""

# apt's order: sources.list first, then sources.list.d/* by name, .list and .sources alike; other files ignored.
root order
put sources.list <<'EOF'
deb http://deb.debian.org/debian stable main
EOF
put sources.list.d/10-b.sources <<'EOF'
Types: deb
URIs: http://b.example/debian
Suites: sid
Components: main
EOF
put sources.list.d/05-a.list <<'EOF'
deb http://a.example/debian bookworm main
EOF
put sources.list.d/00-ignored.list.disabled <<'EOF'
deb http://ignored.example/debian bookworm main
EOF
expect "http://deb.debian.org/debian
http://a.example/debian
http://b.example/debian"

root empty
rm -rf "$R/etc/apt"
expect ""

# debian_mirror: the environment first, then the apt sources, then the default; it says which.
check_choice() {
  local got log
  n=$((n + 1))
  got="$(debian_mirror "$R" 2>"$TMP/log")"
  log="$(cat "$TMP/log")"
  if [ "$got" != "$1" ] || [[ "$log" != *"$2"* ]]; then
    printf 'FAIL debian_mirror on %s: expected [%s] (%s), got [%s] (%s)\n' "$(basename "$R")" "$1" "$2" "$got" "$log" >&2
    failed=$((failed + 1))
  fi
}
R="$TMP/deb822"
check_choice "http://mirror.example.org/debian" "from the apt sources"
FEDSB_DEBIAN_MIRROR="http://env.example/debian" check_choice "http://env.example/debian" "FEDSB_DEBIAN_MIRROR"
R="$TMP/foreign"
check_choice "http://deb.debian.org/debian" "the default"

if [ "$failed" -gt 0 ]; then
  echo "test-apt-mirror: $failed of $n checks FAILED" >&2
  exit 1
fi
echo "test-apt-mirror: $n checks passed"

# shellcheck shell=bash
# The Debian package mirror scripts/docker-base.sh debootstraps from (sourced, not run; tested by
# scripts/test-apt-mirror.sh):
#   apt_debian_mirrors ROOT  the Debian mirrors of the apt sources under ROOT (`` for this machine), one per
#                            line, in apt's order: ROOT/etc/apt/sources.list, then ROOT/etc/apt/sources.list.d/*
#                            (`.list`: one-line `deb [options] URI SUITE COMPONENT...`; `.sources`: deb822
#                            paragraphs with `Types:`, `URIs:`, `Suites:`, `Components:`, `Enabled:`). A mirror
#                            is the http(s) URI of an enabled `deb` source (not `deb-src`) whose path ends in
#                            /debian (or on a *debian.org host), with a Debian suite (a codename or alias, also
#                            -updates and -backports) and the `main` component; never the security archive.
#   debian_mirror ROOT       $FEDSB_DEBIAN_MIRROR if set, else the first of apt_debian_mirrors, else
#                            http://deb.debian.org/debian; prints it and says on stderr where it came from.

apt_debian_mirrors() {
  local root="${1:-}" f files=()
  [ -f "$root/etc/apt/sources.list" ] && files+=("$root/etc/apt/sources.list")
  for f in "$root"/etc/apt/sources.list.d/*; do
    case "$f" in *.list | *.sources) [ -f "$f" ] && files+=("$f") ;; esac
  done
  [ "${#files[@]}" -gt 0 ] || return 0
  awk '
    function debian(uri, suite, components, base) {
      if (uri !~ /^https?:\/\// || uri ~ /security/ || suite ~ /-security$/) return 0
      if (uri !~ /\/debian\/*$/ && uri !~ /^https?:\/\/([^\/]*\.)?debian\.org(:[0-9]+)?(\/|$)/) return 0
      if ((" " components " ") !~ /[ \t]main[ \t]/) return 0
      base = suite
      sub(/-(updates|backports|backports-sloppy|proposed-updates)$/, "", base)
      return base ~ /^(buster|bullseye|bookworm|trixie|forky|duke|sid|stable|oldstable|oldoldstable|testing|unstable)$/
    }
    function emit(uri) {
      sub(/\/+$/, "", uri)
      if (!(uri in seen)) { seen[uri] = 1; print uri }
    }
    # One deb822 paragraph (a .sources file): every URI of an enabled deb source with a Debian suite.
    function flush(   nt, nu, ns, t, u, s, i, j, isdeb) {
      if (tolower(fld["enabled"]) != "no") {
        nt = split(fld["types"], t, /[ \t]+/)
        isdeb = 0
        for (i = 1; i <= nt; i++) if (t[i] == "deb") isdeb = 1
        nu = split(fld["uris"], u, /[ \t]+/)
        ns = split(fld["suites"], s, /[ \t]+/)
        if (isdeb) for (i = 1; i <= nu; i++) for (j = 1; j <= ns; j++) if (u[i] != "" && debian(u[i], s[j], fld["components"])) { emit(u[i]); break }
      }
      delete fld
      key = ""
    }
    FNR == 1 { if (deb822) flush(); deb822 = FILENAME ~ /\.sources$/ }
    {
      line = $0
      sub(/#.*/, "", line)
      if (deb822) {
        if ($0 ~ /^[ \t]*#/) next   # a comment line does not end the paragraph
        if (line ~ /^[ \t]*$/) { flush(); next }
        if (line ~ /^[ \t]/) { if (key != "") fld[key] = fld[key] " " line; next }   # a continuation line
        i = index(line, ":")
        if (i == 0) next
        key = tolower(substr(line, 1, i - 1))
        fld[key] = substr(line, i + 1)
        gsub(/^[ \t]+|[ \t]+$/, "", fld[key])
        next
      }
      n = split(line, w, /[ \t]+/)
      k = 1
      if (w[k] == "") k++
      if (w[k] != "deb") next
      k++
      # Options: `[arch=amd64 signed-by=...]`, possibly spread over several words.
      if (substr(w[k], 1, 1) == "[") { while (k <= n && w[k] !~ /\]$/) k++; k++ }
      comps = ""
      for (i = k + 2; i <= n; i++) comps = comps " " w[i]
      if (k + 1 <= n && debian(w[k], w[k + 1], comps)) emit(w[k])
    }
    END { if (deb822) flush() }
  ' "${files[@]}"
}

debian_mirror() {
  local m
  if [ -n "${FEDSB_DEBIAN_MIRROR:-}" ]; then
    m="$FEDSB_DEBIAN_MIRROR"
    printf '[docker-base] Debian mirror: %s (FEDSB_DEBIAN_MIRROR)\n' "$m" >&2
  elif m="$(apt_debian_mirrors "${1:-}" | head -n1)" && [ -n "$m" ]; then
    printf '[docker-base] Debian mirror: %s (from the apt sources in %s/etc/apt)\n' "$m" "${1:-}" >&2
  else
    m="http://deb.debian.org/debian"
    printf '[docker-base] Debian mirror: %s (the default: no Debian mirror in %s/etc/apt)\n' "$m" "${1:-}" >&2
  fi
  printf '%s\n' "$m"
}

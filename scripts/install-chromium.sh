#!/usr/bin/env bash
# Debian's chromium for the web interface's browser tests (tests/ui), without installing it
# system-wide: `apt-get download` the chromium packages plus every dependency this machine
# lacks, unpack them with `dpkg-deb -x` under .cache/chromium/root and write the launcher
# .cache/chromium/bin/chromium (it sets LD_LIBRARY_PATH). Idempotent: a working launcher (or a
# system /usr/bin/chromium) is left alone. Prints the executable's path on its last line.
#
#   scripts/install-chromium.sh          # install if needed, print the path
#   CHROMIUM_DIR=/elsewhere scripts/install-chromium.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DIR="${CHROMIUM_DIR:-$PWD/.cache/chromium}"
LAUNCHER="$DIR/bin/chromium"

works() { "$1" --headless --no-sandbox --disable-gpu --version >/dev/null 2>&1; }

for candidate in /usr/bin/chromium "$LAUNCHER"; do
    if [ -x "$candidate" ] && works "$candidate"; then
        echo "$candidate"
        exit 0
    fi
done

command -v apt-get >/dev/null || { echo "install-chromium: no apt-get on this machine" >&2; exit 1; }
if ! apt-cache show chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq
    else
        echo "install-chromium: apt knows no 'chromium' package; run 'apt-get update' as root" >&2
        exit 1
    fi
fi

# chromium and chromium-common plus, recursively, the first alternative of each dependency
# that no installed package satisfies (recommends and suggests are left out).
resolve() {
    python3 - "$@" <<'EOF'
import subprocess
import sys


def installed(package):
    status = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True
    ).stdout
    return "ok installed" in status


def groups(package):
    lines = subprocess.run(
        ["apt-cache", "depends", "--no-recommends", "--no-suggests", "--no-conflicts",
         "--no-breaks", "--no-replaces", "--no-enhances", package],
        capture_output=True, text=True,
    ).stdout.splitlines()
    found, current = [], []
    for line in lines[1:]:
        text = line.strip()
        kind = text.split(":", 1)[0].lstrip("|")
        if kind not in ("Depends", "PreDepends"):
            continue
        current.append(text.split(":", 1)[1].strip())
        if not text.startswith("|"):
            found.append(current)
            current = []
    return found


seen, todo, needed = set(), list(sys.argv[1:]), []
while todo:
    package = todo.pop()
    if package in seen:
        continue
    seen.add(package)
    if installed(package) and package not in sys.argv[1:]:
        continue
    needed.append(package)
    for group in groups(package):
        real = [name for name in group if not name.startswith("<")]
        if real and not any(installed(name) for name in real):
            todo.append(real[0])
print("\n".join(sorted(needed)))
EOF
}

rm -rf "$DIR.tmp"
mkdir -p "$DIR.tmp/debs" "$DIR.tmp/root" "$DIR.tmp/bin"
mapfile -t packages < <(resolve chromium chromium-common)
echo "install-chromium: downloading ${#packages[@]} packages: ${packages[*]}" >&2
# As root apt would fetch as the _apt user, who cannot write here: fetch as ourselves.
(cd "$DIR.tmp/debs" && apt-get download -qq -o APT::Sandbox::User="$(id -un)" "${packages[@]}" >&2)
for deb in "$DIR.tmp"/debs/*.deb; do
    dpkg-deb -x "$deb" "$DIR.tmp/root"
done
rm -rf "$DIR.tmp/debs"

root="$DIR/root"
libs="$root/usr/lib/chromium:$root/usr/lib/x86_64-linux-gnu:$root/lib/x86_64-linux-gnu"
libs="$libs:$root/usr/lib/x86_64-linux-gnu/pulseaudio"
cat >"$DIR.tmp/bin/chromium" <<EOF
#!/bin/sh
# Written by scripts/install-chromium.sh: Debian's chromium unpacked under $root.
export LD_LIBRARY_PATH="$libs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$root/usr/lib/chromium/chromium" "\$@"
EOF
chmod +x "$DIR.tmp/bin/chromium"

# Swap the finished tree in (the paths in the launcher are those of the final folder).
rm -rf "$DIR"
mv "$DIR.tmp" "$DIR"

missing=$(LD_LIBRARY_PATH="$libs" ldd "$root/usr/lib/chromium/chromium" | grep "not found" || true)
if [ -n "$missing" ]; then
    echo "install-chromium: libraries still missing:" >&2
    echo "$missing" >&2
    exit 1
fi
if ! works "$LAUNCHER"; then
    echo "install-chromium: $LAUNCHER does not start:" >&2
    "$LAUNCHER" --headless --no-sandbox --disable-gpu --version >&2 || true
    exit 1
fi
echo "$LAUNCHER"

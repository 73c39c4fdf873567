#!/usr/bin/env bash
# Fills ./wheelhouse with every wheel the images install (the runtime requirements from
# pyproject.toml plus EXTRAS, at the versions in constraints.txt, and setuptools for the
# project's own build), so that they build without any package index:
#
#   scripts/wheelhouse.sh                      # torch's CPU build from the PyTorch CPU index
#   TORCH_CPU_INDEX= scripts/wheelhouse.sh     # torch from PyPI (or pip's configured indexes)
#   PIP_INSTALL_OPTIONS=--no-index docker compose build
#
# Two passes. The host's pip first (it sees the indexes and local wheel folders configured on
# this machine), for Linux / CPython 3.11 / glibc 2.36 whatever the host is. Then, where a Docker
# engine runs, pip inside PYTHON_IMAGE resolves the same requirements with the images' own
# interpreter: environment markers are evaluated with the running Python (Debian 12's 3.11.2
# needs async-timeout, `python_full_version < "3.11.3"`, which a 3.11.7 host skips), and files
# already in the folder are not fetched again. Run it where the indexes are reachable, then carry
# the folder to the air-gapped machine.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
extras=${EXTRAS:-}
torch_index=${TORCH_CPU_INDEX-https://download.pytorch.org/whl/cpu}
image=${PYTHON_IMAGE:-python:3.11-slim-bookworm}
mkdir -p wheelhouse
"$python" - "$extras" > wheelhouse/requirements.txt <<'PY'
import sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = [e for e in sys.argv[1].split(",") if e]
print("\n".join(project["dependencies"] + [d for e in extras for d in project["optional-dependencies"][e]]))
print("setuptools>=77")
PY
trap 'rm -f wheelhouse/requirements.txt' EXIT

arch=$(uname -m)
platforms=()  # every manylinux tag up to glibc 2.36 (older pips do not expand one tag)
for minor in $(seq 36 -1 5); do platforms+=(--platform "manylinux_2_${minor}_${arch}"); done
platforms+=(--platform "manylinux2014_${arch}" --platform "manylinux2010_${arch}" --platform "manylinux1_${arch}")
"$python" -m pip download --quiet --dest wheelhouse --only-binary=:all: \
    --python-version 3.11 --implementation cp --abi cp311 "${platforms[@]}" \
    ${torch_index:+--extra-index-url "$torch_index"} \
    -c constraints.txt -r wheelhouse/requirements.txt

if docker info > /dev/null 2>&1; then
    docker run --rm --network host -v "$PWD:/src" -w /src "$image" sh -c "
        python -m venv /tmp/venv && /tmp/venv/bin/pip download --disable-pip-version-check \
            --dest wheelhouse --find-links wheelhouse --only-binary=:all: \
            ${torch_index:+--extra-index-url $torch_index} \
            -c constraints.txt -r wheelhouse/requirements.txt > /dev/null \
        && chown -R $(id -u):$(id -g) wheelhouse"
else
    echo "note: no Docker engine: markers were evaluated with this host's Python" >&2
fi
echo "wheelhouse: $(find wheelhouse -name '*.whl' | wc -l) wheels, $(du -sh wheelhouse | cut -f1)"

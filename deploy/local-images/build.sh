#!/usr/bin/env bash
# Base images for building and running lookalike's compose stack where no container registry
# is reachable (an air-gapped host, or a CI machine that only reaches Debian's and PyPI's
# package servers). Everything comes from Debian packages:
#
#   lookalike-local/python:3.11-bookworm   debootstrap'd Debian 12 (minbase) with Python 3.11,
#                                          venv and the host's extra CA certificates; the
#                                          Dockerfile's PYTHON_IMAGE.
#   lookalike-local/postgres:15            PostgreSQL 15 with the official image's interface
#                                          (POSTGRES_USER/PASSWORD/DB, /var/lib/postgresql/data).
#   lookalike-local/redis:7                Redis 7 (redis-server, redis-cli; data in /data).
#
#   sudo deploy/local-images/build.sh [--mirror URL] [--force]
#
# Needs root (debootstrap, chroot), debootstrap and a Docker engine. Certificates in
# /usr/local/share/ca-certificates (where a TLS-inspecting proxy's CA is installed) are copied
# into the base, and pip, requests and OpenSSL are pointed at the system bundle, so pip and
# apt inside the images trust what the host trusts. Takes 2-4 minutes; an image that exists
# is kept unless --force is given.
set -euo pipefail
cd "$(dirname "$0")"

mirror=http://deb.debian.org/debian
force=0
while [ $# -gt 0 ]; do
    case "$1" in
        --mirror) mirror="$2"; shift 2 ;;
        --force) force=1; shift ;;
        *) echo "usage: $0 [--mirror URL] [--force]" >&2; exit 2 ;;
    esac
done

BASE=${LOCAL_PYTHON_IMAGE:-lookalike-local/python:3.11-bookworm}
POSTGRES=${LOCAL_POSTGRES_IMAGE:-lookalike-local/postgres:15}
REDIS=${LOCAL_REDIS_IMAGE:-lookalike-local/redis:7}

exists() { docker image inspect "$1" > /dev/null 2>&1 && [ "$force" = 0 ]; }
elapsed() { echo "$(( $(date +%s) - $1 )) s"; }

if exists "$BASE"; then
    echo "$BASE: exists"
else
    start=$(date +%s)
    [ "$(id -u)" = 0 ] || { echo "error: debootstrap needs root" >&2; exit 1; }
    command -v debootstrap > /dev/null || { echo "error: install debootstrap (apt-get install debootstrap)" >&2; exit 1; }
    rootfs=$(mktemp -d /tmp/lookalike-rootfs.XXXXXX)
    trap 'rm -rf "$rootfs"' EXIT
    debootstrap --variant=minbase \
        --include=ca-certificates,python3,python3-venv,python-is-python3 \
        bookworm "$rootfs" "$mirror"
    cat > "$rootfs/etc/apt/sources.list" <<SOURCES
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb ${mirror%/debian}/debian-security bookworm-security main
SOURCES
    if compgen -G "/usr/local/share/ca-certificates/*.crt" > /dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
        chroot "$rootfs" update-ca-certificates
    fi
    # As in Debian's official images: no recommended packages, no apt caches left behind.
    echo 'APT::Install-Recommends "false";' > "$rootfs/etc/apt/apt.conf.d/90no-recommends"
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
        "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/log/*.log "$rootfs"/tmp/*
    tar -C "$rootfs" -c . | docker import \
        --change 'ENV LANG=C.UTF-8' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
        --change 'ENV REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt' \
        --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
        --change 'CMD ["python3"]' \
        - "$BASE"
    echo "$BASE: built in $(elapsed "$start")"
fi

for pair in "postgres:$POSTGRES" "redis:$REDIS"; do
    dir=${pair%%:*}
    image=${pair#*:}
    if exists "$image"; then
        echo "$image: exists"
        continue
    fi
    start=$(date +%s)
    docker build --build-arg "BASE_IMAGE=$BASE" -t "$image" "$dir"
    echo "$image: built in $(elapsed "$start")"
done
docker image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' | grep '^lookalike-local/'

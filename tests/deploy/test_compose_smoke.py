"""The compose stack in real containers: scripts/compose_smoke.py builds the images, starts
docker-compose.yml + docker-compose.cpu.yml, waits for every healthcheck and walks the user
journey (upload, search, train, re-index, restart, down and up) from the host.

Opt-in: it needs a Docker engine with Compose v2 and takes minutes (README, "Production: docker
compose", has the measured times), so it runs only with LOOKALIKE_COMPOSE_SMOKE set:
`online` (public base images and indexes) or `offline` (base images built from Debian packages
and a wheelhouse; needs root and debootstrap). `make compose-smoke` sets it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODE = os.environ.get("LOOKALIKE_COMPOSE_SMOKE", "")

pytestmark = [pytest.mark.docker, pytest.mark.timeout(3600)]


def docker_compose_available() -> str | None:
    """None when `docker compose` and its engine answer, else why not."""
    if shutil.which("docker") is None:
        return "no docker CLI"
    for argv, what in (
        (["docker", "info"], "no Docker engine answers (start dockerd)"),
        (["docker", "compose", "version"], "no Compose v2 plugin (`docker compose`)"),
    ):
        if subprocess.run(argv, capture_output=True, timeout=60).returncode != 0:
            return what
    return None


def test_compose_stack_in_containers() -> None:
    if MODE not in ("online", "offline"):
        pytest.skip("opt-in: LOOKALIKE_COMPOSE_SMOKE=online|offline (make compose-smoke)")
    missing = docker_compose_available()
    if missing:
        pytest.skip(missing)
    argv = [sys.executable, str(ROOT / "scripts/compose_smoke.py")]
    if MODE == "offline":
        argv.append("--offline")
    result = subprocess.run(argv, cwd=ROOT, timeout=3500)
    assert result.returncode == 0, "scripts/compose_smoke.py failed (its output is above)"

"""The production stack in real containers, end to end (README, "Production: docker compose").

Builds the images, starts `docker-compose.yml` + `docker-compose.cpu.yml` as its own compose
project (`lookalike-smoke`, its own volumes and a free host port: a deployment beside it is not
touched), waits until every service reports healthy, and walks the user journey from this host
over HTTP:

  create a gallery, upload labelled images, search (the query's own image first), train a small
  model (a job in the worker-train container), index the gallery with it (worker-cpu), search
  again; `docker compose restart api` and check nothing was lost; `docker compose stop` (every
  container must stop on SIGTERM, not be killed at the end of its grace period), `down` with
  the volumes kept, `up` again and check once more.

It prints the time to healthy, each step's time and the image sizes, exits non-zero on the first
failure (with the containers' logs), and removes the project's containers and volumes at the
end (`--keep` leaves them running).

    python scripts/compose_smoke.py            # public base images and package indexes
    python scripts/compose_smoke.py --offline  # no registry: local base images, wheelhouse

`--offline` first builds the base, PostgreSQL and Redis images from Debian packages
(deploy/local-images/build.sh, needs root and debootstrap) and fills ./wheelhouse
(scripts/wheelhouse.sh, torch from pip's configured indexes), then builds with `--no-index`.
Needs a Docker engine with Compose v2 (`docker compose`) and this project's virtual environment.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "lookalike-smoke"
COMPOSE_FILES = ["docker-compose.yml", "docker-compose.cpu.yml"]
LOCAL_IMAGES = {
    "PYTHON_IMAGE": "lookalike-local/python:3.11-bookworm",
    "POSTGRES_IMAGE": "lookalike-local/postgres:15",
    "REDIS_IMAGE": "lookalike-local/redis:7",
}
# 128 + SIGKILL: docker stop's grace period ran out. (uvicorn exits 143, 128 + SIGTERM, after a
# clean shutdown: it re-raises the signal it handled, so the exit code tells why it stopped.)
CONTAINER_KILLED = 137

MEDIA_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".webp": "image/webp"}

T = TypeVar("T")


class SmokeFailure(Exception):
    """A step of the journey did not do what it should."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SmokeFailure(message)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_dataset(root: Path, per_class: int = 6) -> None:
    """An ImageFolder dataset of coloured shapes, train/ with 8 classes and test/ with 4 others:
    class = (shape, colour), samples vary in position and size."""
    for number in range(12):
        folder = root / ("train" if number < 8 else "test") / f"class_{number:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        colour = ((number * 67) % 256, (number * 131) % 256, (number * 29 + 90) % 256)
        for sample in range(per_class):
            image = Image.new("RGB", (48, 48), (240, 240, 240))
            draw = ImageDraw.Draw(image)
            margin = 4 + (sample * 3) % 10
            box = (margin, margin, 47 - margin, 47 - margin + sample % 3)
            if number % 3 == 0:
                draw.ellipse(box, fill=colour)
            elif number % 3 == 1:
                draw.rectangle(box, fill=colour)
            else:
                draw.polygon([(box[0], box[3]), (box[2], box[3]), (24, box[1])], fill=colour)
            image.save(folder / f"{sample:03d}.png")


class Stack:
    """`docker compose` for the smoke project, with this run's environment."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.files = [arg for name in COMPOSE_FILES for arg in ("-f", str(ROOT / name))]

    def compose(self, *args: str, timeout: float = 600, capture: bool = False) -> str:
        argv = ["docker", "compose", "-p", PROJECT, *self.files, *args]
        result = subprocess.run(
            argv,
            cwd=ROOT,
            env=self.env,
            timeout=timeout,
            text=True,
            stdout=subprocess.PIPE if capture else None,
        )
        if result.returncode != 0:
            raise SmokeFailure(f"`docker compose {' '.join(args)}` exited {result.returncode}")
        return result.stdout or ""

    def containers(self) -> list[dict[str, Any]]:
        out = self.compose("ps", "--all", "--format", "json", capture=True)
        text = out.strip()
        if text.startswith("["):
            return json.loads(text)
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def wait_healthy(self, timeout: float) -> float:
        """Seconds until every running service's healthcheck passes."""
        started = time.monotonic()
        while True:
            containers = self.containers()
            states = {c["Service"]: (c["State"], c.get("Health", "")) for c in containers}
            failed = {s: st for s, st in states.items() if st[0] in ("exited", "dead")}
            check(not failed, f"containers stopped: {failed}")
            if states and all(health == "healthy" for _, health in states.values()):
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise SmokeFailure(f"not healthy after {timeout:.0f} s: {states}")
            time.sleep(2)

    def exit_codes(self) -> dict[str, int]:
        return {c["Service"]: int(c.get("ExitCode", 0)) for c in self.containers()}

    def logs(self) -> None:
        self.compose("logs", "--no-color", "--tail", "60", timeout=120)


def until(what: str, condition: Callable[[], T | None], timeout: float, interval: float = 2) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SmokeFailure(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class Journey:
    """The user's requests, from this host over HTTP."""

    def __init__(self, base_url: str, api_key: str, uploads: Path) -> None:
        self.client = httpx.Client(
            base_url=f"{base_url}/api/v1", headers={"X-API-Key": api_key}, timeout=120
        )
        self.images = sorted(uploads.glob("*/*.png"))
        self.query = self.images[0]
        # The same pictures as JPEG and WebP: the images' codecs decode what users upload.
        for path, suffix in ((self.images[-1], ".jpg"), (self.images[-2], ".webp")):
            converted = uploads / "codecs" / path.with_suffix(suffix).name
            converted.parent.mkdir(exist_ok=True)
            Image.open(path).convert("RGB").save(converted)
            self.images.append(converted)
        self.gallery_id = 0
        self.first_image_id = 0
        self.model_id = 0

    def request(self, method: str, path: str, expect: int, **kwargs: Any) -> Any:
        response = self.client.request(method, path, **kwargs)
        check(
            response.status_code == expect,
            f"{method} {path}: {response.status_code} (expected {expect}): {response.text[:500]}",
        )
        return response.json() if response.content else None

    def search(self) -> dict[str, Any]:
        found = self.request(
            "POST",
            f"/galleries/{self.gallery_id}/search",
            200,
            files={"image": (self.query.name, self.query.read_bytes(), "image/png")},
            data={"k": "5"},
        )
        check(len(found["results"]) == 5, f"5 results expected: {found}")
        top = found["results"][0]
        check(top["score"] > 0.99, f"the query's own image is not first: {top}")
        return found

    def wait_job(self, job_id: int, timeout: float) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            job = self.request("GET", f"/jobs/{job_id}", 200)
            return job if job["state"] in ("succeeded", "failed", "cancelled") else None

        job = until(f"job {job_id}", done, timeout)
        check(job["state"] == "succeeded", f"job {job_id} {job['state']}: {job.get('error')}")
        return job

    def upload_and_search(self) -> str:
        [builtin] = [m for m in self.request("GET", "/models", 200) if m["builtin"]]
        gallery = self.request(
            "POST", "/galleries", 201, json={"name": "smoke", "model_id": builtin["id"]}
        )
        self.gallery_id = gallery["id"]
        self.request(
            "POST",
            f"/galleries/{self.gallery_id}/images",
            201,
            files=[("files", (p.name, p.read_bytes(), MEDIA_TYPES[p.suffix])) for p in self.images],
            data={"label": [p.parent.name for p in self.images]},
        )
        self.first_image_id = self.search()["results"][0]["image_id"]
        return f"{len(self.images)} images (PNG, JPEG, WebP), query found at rank 1"

    def train(self) -> str:
        dataset = self.request(
            "POST",
            "/datasets",
            201,
            json={"name": "shapes", "kind": "imagefolder", "path": "shapes"},
        )
        job = self.request(
            "POST",
            "/jobs",
            202,
            json={
                "type": "train",
                "params": {
                    "dataset_id": dataset["id"],
                    "method": "margin",
                    "model_name": "smoke-margin",
                    "hyperparameters": {
                        "weights": "none",
                        "image_size": 32,
                        "iterations": 6,
                        "batch_size": 8,
                        "samples_per_class": 2,
                        "eval_every": 0,
                    },
                },
            },
        )
        check(job["queue"] == "gpu", f"training runs on the gpu queue: {job}")
        job = self.wait_job(job["id"], timeout=600)
        check(job["worker"].startswith("gpu@"), f"not run by a worker container: {job}")
        self.model_id = job["result"]["model_id"]
        return f"model {self.model_id} trained by {job['worker']}"

    def index(self) -> str:
        job = self.request(
            "POST",
            "/jobs",
            202,
            json={
                "type": "index",
                "params": {"gallery_id": self.gallery_id, "model_id": self.model_id},
            },
        )
        check(job["queue"] == "cpu", f"indexing runs on the cpu queue: {job}")
        job = self.wait_job(job["id"], timeout=600)
        found = self.search()
        check(found["model_id"] == self.model_id, f"search does not use the new model: {found}")
        check(found["results"][0]["image_id"] == self.first_image_id, "a different top image")
        return f"re-indexed by {job['worker']}; search answers with model {self.model_id}"

    def unchanged(self) -> str:
        """Everything the journey stored is still there and searchable."""
        gallery = self.request("GET", f"/galleries/{self.gallery_id}", 200)
        check(gallery["model_id"] == self.model_id, f"the gallery's model changed: {gallery}")
        check(gallery["image_count"] == len(self.images), f"images lost: {gallery}")
        check(gallery["index_size"] == len(self.images), f"index entries lost: {gallery}")
        models = {m["id"] for m in self.request("GET", "/models", 200)}
        check(self.model_id in models, "the trained model is gone")
        found = self.search()
        check(found["results"][0]["image_id"] == self.first_image_id, "a different top image")
        return f"{gallery['image_count']} images, model {self.model_id}, same rank-1 image"


def prepare_offline(env: dict[str, str]) -> None:
    """Local base images and a full wheelhouse; the build then needs no registry or index."""
    subprocess.run([str(ROOT / "deploy/local-images/build.sh")], check=True, env=env)
    env.update(LOCAL_IMAGES)
    env["TORCH_CPU_INDEX"] = ""  # PyTorch's CPU index is not reachable: torch from pip's indexes
    subprocess.run([str(ROOT / "scripts/wheelhouse.sh")], check=True, env=env)
    env["PIP_INSTALL_OPTIONS"] = "--no-index"


def image_sizes(env: dict[str, str]) -> dict[str, str]:
    sizes = {}
    for name in ("lookalike:api", "lookalike:worker-cpu", env.get("POSTGRES_IMAGE", ""),
                 env.get("REDIS_IMAGE", "")):  # fmt: skip
        if not name:
            continue
        result = subprocess.run(
            ["docker", "image", "inspect", "--format", "{{.Size}}", name],
            capture_output=True,
            text=True,
        )
        if result.returncode == 0:
            sizes[name] = f"{int(result.stdout) / 1e9:.2f} GB"
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--offline", action="store_true", help="local base images, wheelhouse")
    parser.add_argument("--no-build", action="store_true", help="use the images already built")
    parser.add_argument("--keep", action="store_true", help="leave the stack running")
    parser.add_argument("--healthy-timeout", type=float, default=420)
    args = parser.parse_args(argv)

    api_key = secrets.token_urlsafe(24)
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="lookalike-smoke-"))
    write_dataset(workdir / "datasets" / "shapes")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOOKALIKE_", "COMPOSE_"))}
    env |= {
        "POSTGRES_PASSWORD": secrets.token_urlsafe(16),
        "LOOKALIKE_API_KEYS": json.dumps([api_key]),
        "API_PORT": str(port),
        "DATASETS_DIR": str(workdir / "datasets"),
    }
    stack = Stack(env)
    timings: list[tuple[str, float, str]] = []

    def step(name: str, action: Callable[[], str | None]) -> None:
        started = time.monotonic()
        detail = action() or ""
        timings.append((name, time.monotonic() - started, detail))
        print(f"[smoke] {name}: {timings[-1][1]:.1f} s {detail}", flush=True)

    failed = False
    try:
        if args.offline:
            step("local base images and wheelhouse", lambda: prepare_offline(env))
        if not args.no_build:
            step("build images", lambda: stack.compose("build") and None)
        stack.compose("down", "--volumes", "--remove-orphans", timeout=300)  # an earlier run's
        step("up", lambda: stack.compose("up", "-d") and None)
        step("every service healthy", lambda: f"({stack.wait_healthy(args.healthy_timeout):.0f} s)")
        uploads = workdir / "datasets" / "shapes" / "test"
        journey = Journey(f"http://127.0.0.1:{port}", api_key, uploads)
        step("gallery, upload, search", journey.upload_and_search)
        step("train in worker-train", journey.train)
        step("index with the new model, search", journey.index)

        def restart_api() -> str:
            stack.compose("restart", "api")
            stack.wait_healthy(args.healthy_timeout)
            return journey.unchanged()

        step("restart api, check", restart_api)

        def stop_on_sigterm() -> str:
            stack.compose("stop", timeout=600)
            codes = stack.exit_codes()
            killed = [service for service, code in codes.items() if code == CONTAINER_KILLED]
            check(not killed, f"killed at the end of their grace period: {killed} ({codes})")
            api_log = stack.compose("logs", "--no-color", "api", capture=True)
            check("Application shutdown complete" in api_log, "the API did not shut down cleanly")
            return f"exit codes {codes}"

        step("stop (SIGTERM)", stop_on_sigterm)
        step("down, volumes kept", lambda: stack.compose("down") and None)

        def up_again() -> str:
            stack.compose("up", "-d")
            seconds = stack.wait_healthy(args.healthy_timeout)
            return f"healthy in {seconds:.0f} s; {journey.unchanged()}"

        step("up again, check", up_again)
    except (SmokeFailure, subprocess.SubprocessError, httpx.HTTPError) as error:
        failed = True
        print(f"[smoke] FAILED: {error}", file=sys.stderr, flush=True)
        with contextlib.suppress(SmokeFailure):
            stack.logs()
    finally:
        if not args.keep:
            stack.compose("down", "--volumes", "--remove-orphans", timeout=300)
    print("[smoke] summary")
    for name, seconds, _ in timings:
        print(f"  {name:<36} {seconds:7.1f} s")
    for name, size in image_sizes(env).items():
        print(f"  image {name:<30} {size}")
    print(f"[smoke] {'FAILED' if failed else 'passed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""docker-compose.yml, its CPU override and the Dockerfile, checked without a Docker engine:
the Compose specification's JSON schema (check-jsonschema's vendored copy), and every command,
environment variable, volume path and port against what the code actually reads."""

from __future__ import annotations

import importlib
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from app.core import settings_doc
from app.core.config import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
COMPOSE_MILVUS = ROOT / "docker-compose.milvus.yml"
# The combinations the docs give: GPU, CPU-only, and each with Milvus as the index backend.
VARIANTS = {
    "gpu": (COMPOSE,),
    "cpu": (COMPOSE, COMPOSE_CPU),
    "gpu-milvus": (COMPOSE, COMPOSE_MILVUS),
    "cpu-milvus": (COMPOSE, COMPOSE_CPU, COMPOSE_MILVUS),
}
DOCKERFILE = ROOT / "Dockerfile"
API_PORT = 8000
SCHEMA = "vendor.compose-spec"  # the Compose specification, vendored by check-jsonschema
CHECK_JSONSCHEMA = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", SCHEMA]


# What .env would hold; compose interpolates `${...}` in values after parsing the YAML.
DOTENV = {"POSTGRES_PASSWORD": "secret", "LOOKALIKE_API_KEYS": '["test-key"]'}


def interpolate(value: Any, env: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, operator, argument = match.group(1), match.group(2) or "", match.group(3) or ""
        if env.get(name):
            return env[name]
        if operator == ":?":
            raise AssertionError(f"compose would stop: {name} unset ({argument})")
        return argument if operator == ":-" else ""

    text = re.sub(r"(?<!\$)\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", substitute, value)
    return text.replace("$$", "$")


def load(path: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    raw = yaml.safe_load(path.read_text())  # resolves anchors and `<<` merge keys
    return interpolate(raw, DOTENV if env is None else env)


def ours(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services that run lookalike's code (built from this repository)."""
    return {name: svc for name, svc in compose["services"].items() if "build" in svc}


def merged(*files: Path) -> dict[str, Any]:
    """The services `docker compose -f A -f B` runs by default: mappings merged key by key,
    the override's scalars and sequences win; services with a profile are left out."""

    def merge(base: Any, override: Any) -> Any:
        if isinstance(base, dict) and isinstance(override, dict):
            out = dict(base)
            for key, value in override.items():
                out[key] = merge(base[key], value) if key in base else value
            return out
        return override

    result: dict[str, Any] = {}
    for path in files:
        result = merge(result, load(path))
    result["services"] = {
        name: svc for name, svc in result["services"].items() if not svc.get("profiles")
    }
    return result


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def command_argv(service: dict[str, Any]) -> list[list[str]]:
    """The command as argv lists; `sh -c "a && exec b"` gives one list per part."""
    command = service["command"]
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    if argv[:2] == ["sh", "-c"]:
        return [shlex.split(part.strip().removeprefix("exec ")) for part in argv[2].split("&&")]
    return [argv]


def parse_cli(group: Any, argv: list[str]) -> Any:
    """Parse `lookalike <subcommand> ...` with the real CLI (option names, types, choices)
    without running it. (Typer carries its own copy of click, hence the duck typing.)"""
    ctx = group.make_context("lookalike", list(argv))
    protected = getattr(ctx, "_protected_args", None) or getattr(ctx, "protected_args", [])
    args = [*protected, *ctx.args]
    name, command, rest = group.resolve_command(ctx, args)
    assert command is not None, f"lookalike has no command {name!r}"
    return command.make_context(name, rest, parent=ctx)


def lookalike_cli() -> Any:
    from app import cli

    return typer.main.get_command(cli.cli)


def option(ctx: Any, name: str) -> Any:
    return ctx.params[name]


def interpolated(text: str) -> set[str]:
    return set(re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)", text))


# --- schema ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_CPU, COMPOSE_MILVUS], ids=lambda p: p.name)
def test_compose_file_matches_the_compose_specification(path: Path) -> None:
    result = subprocess.run(
        [*CHECK_JSONSCHEMA, str(path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_check_rejects_a_broken_file(tmp_path: Path) -> None:
    """The validator really validates: a misspelt key fails."""
    broken = load(COMPOSE)
    broken["services"]["api"]["healthchek"] = broken["services"]["api"].pop("healthcheck")
    path = tmp_path / "compose.yml"
    path.write_text(yaml.safe_dump(broken))
    result = subprocess.run(
        [*CHECK_JSONSCHEMA, str(path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1, result.stdout
    assert "healthchek" in result.stdout


# --- services against the code ----------------------------------------------------------------


@pytest.mark.parametrize("files", VARIANTS.values(), ids=VARIANTS.keys())
def test_every_variable_is_a_setting_and_paths_match_the_volumes(
    files: tuple[Path, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    compose = merged(*files)
    settings_names = settings_doc.env_names()
    services = ours(compose)
    assert {"api", "worker-cpu"} <= set(services)
    for name, service in services.items():
        env = environment(service)
        unknown = set(env) - settings_names
        assert not unknown, f"{name}: not Settings fields: {sorted(unknown)}"
        mounts = {
            volume.split(":")[1]: volume.split(":")[0] for volume in service.get("volumes", [])
        }
        # The data directory is the shared named volume, in every service.
        assert mounts.get(env["LOOKALIKE_DATA_DIR"]) == "lookalike-data", name
        assert env["LOOKALIKE_DATASET_ROOT"] in mounts, name
        with monkeypatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            settings = Settings(_env_file=None)  # parsed as the container would
        assert settings.api_keys == ["test-key"]
        assert settings.database_url.startswith("postgresql+psycopg://")
        assert "@postgres:5432/" in settings.database_url
        assert settings.broker_url.startswith("redis://redis:6379/")
        for volume in mounts.values():
            if not volume.startswith(("$", ".", "/")):
                assert volume in compose["volumes"], f"{name}: volume {volume} not declared"
    # Both lookalike images carry the same user id, so the shared volume stays writable.
    assert "--uid 10001" in DOCKERFILE.read_text()


def test_compose_variables_are_documented_in_env_example() -> None:
    text = COMPOSE.read_text() + COMPOSE_CPU.read_text() + COMPOSE_MILVUS.read_text()
    documented = {name for name, _, _ in settings_doc.COMPOSE_VARIABLES} | {"LOOKALIKE_API_KEYS"}
    assert interpolated(text) <= documented | settings_doc.env_names()
    example = (ROOT / ".env.example").read_text()
    for variable in interpolated(text):
        assert variable in example, variable


@pytest.mark.parametrize("files", VARIANTS.values(), ids=VARIANTS.keys())
def test_workers_parse_with_the_real_cli_and_serve_every_queue(files: tuple[Path, ...]) -> None:
    from app.services.jobs.registry import QUEUES

    group = lookalike_cli()
    served: set[str] = set()
    workers = 0
    for name, service in ours(merged(*files)).items():
        if name == "api":
            continue
        workers += 1
        [argv] = command_argv(service)
        assert argv[0] == "lookalike", name
        ctx = parse_cli(group, argv[1:])
        assert ctx.info_name == "worker", name
        queues = option(ctx, "queues")
        queues = queues.split(",") if isinstance(queues, str) else list(queues)
        served |= set(queues)
        # The healthcheck pings this worker's node: `lookalike worker` names it <queues>@host.
        node = option(ctx, "hostname") or f"{'-'.join(queues)}@%h"
        test = " ".join(service["healthcheck"]["test"])
        assert f"--destination {node.replace('%h', '$HOSTNAME')} " in test, (name, test)
        if "gpu" in queues:
            # One job at a time, in the main process (docs/jobs.md, "Workers and queues").
            assert str(option(ctx, "concurrency")) == "1", name
            assert str(option(ctx, "pool")) == "solo", name
    assert workers >= 2
    assert served == set(QUEUES)


@pytest.mark.parametrize("variant", ["gpu-milvus", "cpu-milvus"])
def test_the_milvus_override_points_every_index_writer_at_its_milvus(variant: str) -> None:
    """The API and the index workers use the milvus backend on the compose network's Milvus
    (the port its healthcheck and the official compose file use), with pymilvus in the image;
    Milvus waits for healthy etcd and MinIO."""
    import tomllib

    compose = merged(*VARIANTS[variant])
    services = compose["services"]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("pymilvus") for d in extras["optional-dependencies"]["milvus"])
    for name in ("api", "worker-cpu", "worker-gpu"):
        if name not in services:
            continue
        service = services[name]
        settings = Settings(
            _env_file=None,
            **{
                key.removeprefix("LOOKALIKE_").lower(): value
                for key, value in environment(service).items()
                if key in ("LOOKALIKE_INDEX_BACKEND", "LOOKALIKE_MILVUS_URI")
            },
        )
        assert settings.index_backend == "milvus", name
        assert settings.milvus_location == "http://milvus:19530", name
        assert service["build"]["args"]["EXTRAS"] == "milvus", name
        assert service["depends_on"]["milvus"]["condition"] == "service_healthy", name
    milvus = services["milvus"]
    assert milvus["command"] == ["milvus", "run", "standalone"]
    assert "localhost:9091/healthz" in " ".join(milvus["healthcheck"]["test"])
    assert environment(milvus)["ETCD_ENDPOINTS"] == "etcd:2379"
    assert environment(milvus)["MINIO_ADDRESS"] == "minio:9000"
    assert set(milvus["depends_on"]) == {"etcd", "minio"}
    for engine in ("milvus", "etcd", "minio"):
        assert "ports" not in services[engine], f"{engine} must not be published"
    assert "EXTRAS" in DOCKERFILE.read_text() and "optional-dependencies" in DOCKERFILE.read_text()


def test_gpu_worker_reserves_a_gpu_and_the_cpu_variant_does_not() -> None:
    gpu = merged(COMPOSE)["services"]["worker-gpu"]
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]
    assert environment(gpu)["LOOKALIKE_WORKER_DEVICE"] == "cuda"
    cpu = merged(COMPOSE, COMPOSE_CPU)["services"]
    assert "worker-gpu" not in cpu
    assert not any("deploy" in service for service in cpu.values())


def test_console_script_and_celery_app_exist() -> None:
    import tomllib

    from celery import Celery
    from celery.app.utils import find_app

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["lookalike"].partition(":")
    assert callable(getattr(importlib.import_module(module), function))
    for text in (COMPOSE.read_text(), COMPOSE_CPU.read_text(), DOCKERFILE.read_text()):
        for target in re.findall(r"celery -A (\S+) inspect ping", text):
            assert isinstance(find_app(target), Celery), target


def test_api_command_prestart_and_uvicorn_factory() -> None:
    from uvicorn.main import main as uvicorn_cli

    api = load(COMPOSE)["services"]["api"]
    prestart, server = command_argv(api)
    assert prestart[:3] == ["python", "-m", "app.prestart"]
    importlib.import_module("app.prestart").main.__call__  # noqa: B018  (the module's entry point)
    ctx = uvicorn_cli.make_context("uvicorn", server[1:])
    assert server[0] == "uvicorn"
    assert ctx.params["factory"] is True
    module, _, factory = ctx.params["app"].partition(":")
    assert callable(getattr(importlib.import_module(module), factory))
    # One port everywhere: uvicorn, the published port, the healthcheck, the image.
    assert ctx.params["port"] == API_PORT
    assert api["ports"] == [f"{API_PORT}:{API_PORT}"]  # host port: API_PORT, default 8000
    assert f"127.0.0.1:{API_PORT}/healthz" in " ".join(api["healthcheck"]["test"])
    assert f"EXPOSE {API_PORT}" in DOCKERFILE.read_text()
    assert f"127.0.0.1:{API_PORT}/healthz" in DOCKERFILE.read_text()
    # The route the healthcheck calls exists (and is outside /api/v1).
    from fastapi.testclient import TestClient

    from app.main import create_app

    client = TestClient(create_app(Settings(_env_file=None)))  # no lifespan: liveness only
    assert client.get("/healthz").status_code == 200


def test_prestart_accepts_its_compose_arguments(tmp_path: Path) -> None:
    from app import prestart

    settings = Settings(data_dir=tmp_path, seed_builtin_model=False)
    prestart.prestart(settings, wait_s=5)
    prestart.prestart(settings, wait_s=5)  # idempotent
    assert (tmp_path / "lookalike.db").exists()
    assert "***" in prestart.redacted("postgresql+psycopg://u:secret@db:5432/x")
    assert "secret" not in prestart.redacted("postgresql+psycopg://u:secret@db:5432/x")


def test_depends_on_conditions_point_at_services_with_healthchecks() -> None:
    for files in VARIANTS.values():
        compose = merged(*files)
        services = compose["services"]
        for name, service in services.items():
            for dependency, condition in service.get("depends_on", {}).items():
                assert dependency in services, f"{name} depends on missing {dependency}"
                if condition["condition"] == "service_healthy":
                    assert "healthcheck" in services[dependency], f"{name} -> {dependency}"
    assert "flower" in load(COMPOSE)["services"]
    assert load(COMPOSE)["services"]["flower"]["profiles"] == ["flower"]


# --- generated documentation ----------------------------------------------------------------


def test_env_example_lists_every_setting() -> None:
    text = (ROOT / ".env.example").read_text()
    assert text == settings_doc.render_env_example(), "stale: run `make settings-doc`"
    for name in settings_doc.env_names():
        assert f"# {name}=" in text


def test_readme_configuration_table_is_current() -> None:
    readme = (ROOT / "README.md").read_text()
    assert settings_doc.readme_with_table(readme) == readme, "stale: run `make settings-doc`"


def test_env_example_defaults_load_back_as_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Uncommenting any line of .env.example changes nothing: each default round-trips through
    the environment variable."""
    defaults = Settings(_env_file=None)
    for name, value, _ in settings_doc.settings_rows():
        monkeypatch.setenv(name, value)
    loaded = Settings(_env_file=None)
    assert loaded == defaults


# --- Dockerfile -----------------------------------------------------------------------------


def dockerfile_stages() -> dict[str, dict[str, Any]]:
    """Stage name -> {"parent": FROM argument, "lines": instructions}; continuation lines
    joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    stages: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.I)
        if match:
            current = {"parent": match.group(1), "lines": []}
            stages[match.group(2) or f"stage{len(stages)}"] = current
        elif current is not None:
            current["lines"].append(line)
    return stages


def effective(stages: dict[str, dict[str, Any]], target: str, instruction: str) -> str | None:
    """The last `instruction` in effect for a target, following FROM <stage> inheritance."""
    stage: str | None = target
    while stage in stages:
        for line in reversed(stages[stage]["lines"]):
            if line.upper().startswith(instruction + " "):
                return line[len(instruction) + 1 :]
        stage = stages[stage]["parent"]
    return None


def test_dockerfile_is_multi_stage_non_root_with_healthchecks() -> None:
    stages = dockerfile_stages()
    targets = {svc["build"]["target"] for svc in ours(load(COMPOSE)).values()}
    targets |= {svc["build"]["target"] for svc in ours(load(COMPOSE_CPU)).values()}
    assert targets == {"api", "worker-cpu", "worker-gpu"}
    assert len(stages) >= 4
    assert list(stages)[-1] == "api"  # `docker build .` builds the API image
    for target in targets:
        assert target in stages, target
        user = effective(stages, target, "USER")
        assert user and user.split(":")[0] not in ("root", "0"), target
        healthcheck = effective(stages, target, "HEALTHCHECK")
        assert healthcheck and "CMD" in healthcheck, target
        # Final images copy built environments; they never compile or download anything.
        assert not any(line.startswith("RUN pip") for line in stages[target]["lines"]), target
        assert effective(stages, target, "CMD"), target
    # Each image's default command is the one compose runs.
    for name, service in ours(load(COMPOSE)).items():
        target = service["build"]["target"]
        cmd = effective(stages, target, "CMD")
        assert json.loads(cmd or "[]") == service["command"], name
        if name != "api":
            queues = service["command"][service["command"].index("--queues") + 1]
            node = f'"{queues.replace(",", "-")}@$HOSTNAME"'
            assert node in (effective(stages, target, "HEALTHCHECK") or ""), name
    # The API image's environment comes from the CPU build (no CUDA libraries).
    assert stages["cpu-runtime"]["lines"][0] == "COPY --from=build-cpu /opt/venv /opt/venv"
    assert "download.pytorch.org/whl/cpu" in DOCKERFILE.read_text()
    # Final stages start from slim Python, not from a builder with compilers and caches.
    assert stages["runtime"]["parent"] == "${PYTHON_IMAGE}"
    assert "python:3.11-slim" in DOCKERFILE.read_text()


def test_docker_build_context_has_what_the_dockerfile_copies() -> None:
    ignore = (ROOT / ".dockerignore").read_text().split()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for stage in dockerfile_stages().values():
        for line in stage["lines"]:
            if line.startswith("COPY ") and "--from=" not in line:
                *sources, _ = line.split()[1:]
                for source in sources:
                    assert (ROOT / source).exists(), source
                    assert source in allowed, f"{source} is excluded by .dockerignore"


def test_constraints_pin_every_dependency_within_pyproject() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    for line in project["dependencies"] + project["optional-dependencies"]["dev"]:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not in constraints.txt; run `make constraints`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (name, pins[name])

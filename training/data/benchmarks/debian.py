"""Fetch and unpack Debian packages into a private cache, without root and without installing.

The benchmarks are built from files that Debian ships (icon themes, fonts). `apt-get download`
fetches a package's .deb into `<cache>/debs` and `dpkg-deb -x` unpacks it under
`<cache>/root/<deb name>`; nothing touches the system. Both steps are skipped when their result
is already in the cache, so a second build works offline.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from tqdm.auto import tqdm

from training.data.records import DatasetError

logger = logging.getLogger(__name__)

SYSTEM_APT_LISTS = Path("/var/lib/apt/lists")
# More hops than this means a symlink loop (Linux itself gives up after 40).
MAX_LINK_HOPS = 40

# apt-get's wording for a package name the archive does not offer (apt 2.x).
_MISSING_PACKAGE_PATTERNS = (
    re.compile(r"Unable to locate package (\S+)"),
    re.compile(r"Package '?([^' ]+)'? has no installation candidate"),
    re.compile(r"Can't select candidate version from package (\S+)"),
)


class DebianError(DatasetError):
    """Debian packages could not be fetched or unpacked; the message says what to fix."""


@dataclass(frozen=True)
class UnpackedPackage:
    """A package's files under `root`, laid out as they would be under `/`."""

    name: str
    version: str
    root: Path


@dataclass(frozen=True)
class FetchResult:
    """The packages that are available in the cache, and those the archive did not have."""

    packages: dict[str, UnpackedPackage]
    missing: list[str]


def default_cache_dir() -> Path:
    """`$LOOKALIKE_CACHE_DIR/debian`, else `~/.cache/lookalike/debian`."""
    base = os.environ.get("LOOKALIKE_CACHE_DIR")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "lookalike"
    return root / "debian"


def fetch_packages(
    names: Sequence[str], cache_dir: Path, *, workers: int = 2, progress: bool = True
) -> FetchResult:
    """Download (if needed) and unpack (if needed) `names`; missing packages are skipped.

    Raises DebianError when the tools are absent, apt-get fails for a reason other than an
    unknown package, or not a single package could be had.
    """
    _require_tools("apt-get", "dpkg-deb")
    cache_dir = cache_dir.expanduser().absolute()
    debs_dir, unpack_dir = cache_dir / "debs", cache_dir / "root"
    try:
        debs_dir.mkdir(parents=True, exist_ok=True)
        unpack_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DebianError(f"cannot create the package cache {cache_dir}: {error}") from error

    to_download = [name for name in names if cached_deb(debs_dir, name) is None]
    missing = download_debs(to_download, debs_dir, cache_dir) if to_download else []
    if missing:
        logger.warning("not in the Debian archive, skipped: %s", ", ".join(missing))
    debs = [deb for name in names if (deb := cached_deb(debs_dir, name)) is not None]
    if not debs:
        raise DebianError(f"none of the packages could be fetched: {', '.join(names)}")

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        jobs = pool.map(lambda deb: unpack_deb(deb, unpack_dir), debs)
        unpacked = list(tqdm(jobs, total=len(debs), desc="unpack .deb", disable=not progress))
    return FetchResult(packages={pkg.name: pkg for pkg in unpacked}, missing=missing)


def cached_deb(debs_dir: Path, name: str) -> Path | None:
    """The newest downloaded .deb of package `name`, if any (apt names them NAME_VERSION_ARCH)."""
    found = sorted(debs_dir.glob(f"{name}_*.deb"), key=lambda path: path.stat().st_mtime)
    return found[-1] if found else None


def parse_deb_filename(deb: Path) -> tuple[str, str]:
    """(package, version) from apt's `NAME_VERSION_ARCH.deb` (the epoch colon is `%3a`)."""
    parts = deb.stem.split("_")
    if len(parts) != 3:
        raise DebianError(f"{deb} is not named NAME_VERSION_ARCH.deb; delete it from the cache")
    return parts[0], unquote(parts[1])


def download_debs(names: Sequence[str], debs_dir: Path, cache_dir: Path) -> list[str]:
    """`apt-get download` the packages into `debs_dir`; returns the names the archive lacks.

    apt-get aborts the whole batch on one unknown name, so those names are parsed from its
    errors and the rest retried. Downloads land in a private folder first, so a .deb in
    `debs_dir` is always complete.
    """
    apt_options = apt_list_options(cache_dir)
    staging = debs_dir / f".partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    pending, missing = list(names), []
    try:
        while pending:
            result = _run(["apt-get", *apt_options, "download", *pending], cwd=staging)
            if result.returncode == 0:
                break
            unknown = [name for name in pending if name in _missing_names(result.stderr)]
            if not unknown:
                raise DebianError(f"apt-get download failed: {_first_error_line(result.stderr)}")
            missing += unknown
            pending = [name for name in pending if name not in unknown]
        for deb in staging.glob("*.deb"):
            deb.replace(debs_dir / deb.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return missing


def apt_list_options(cache_dir: Path) -> list[str]:
    """apt options to use; a private package list under the cache when the system has none.

    A fresh container often has no `/var/lib/apt/lists`, and a non-root user cannot fill it, so
    `apt-get update` then writes into the cache instead (once).
    """
    if any(SYSTEM_APT_LISTS.glob("*_Packages*")):
        return []
    lists, apt_cache = cache_dir / "apt" / "lists", cache_dir / "apt" / "cache"
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    (apt_cache / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    options = ["-o", f"Dir::State::Lists={lists}", "-o", f"Dir::Cache={apt_cache}"]
    if not any(lists.glob("*_Packages*")):
        logger.info("no apt package lists on this system; running apt-get update into %s", lists)
        result = _run(["apt-get", *options, "update"], cwd=cache_dir)
        if result.returncode != 0 or not any(lists.glob("*_Packages*")):
            raise DebianError(f"apt-get update failed: {_first_error_line(result.stderr)}")
    return options


def unpack_deb(deb: Path, unpack_dir: Path) -> UnpackedPackage:
    """`dpkg-deb -x` into `unpack_dir/<deb stem>`, via a temporary folder so a half unpack
    is never mistaken for a complete one."""
    name, version = parse_deb_filename(deb)
    target = unpack_dir / deb.stem
    if not target.is_dir():
        staging = unpack_dir / f".partial-{deb.stem}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        result = _run(["dpkg-deb", "-x", str(deb), str(staging)], cwd=unpack_dir)
        if result.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            raise DebianError(
                f"dpkg-deb could not unpack {deb.name} ({_first_error_line(result.stderr)}); "
                "delete it from the cache and retry"
            )
        staging.rename(target)
    return UnpackedPackage(name=name, version=version, root=target)


def resolve_link(path: Path, package_root: Path) -> Path | None:
    """Follow symlinks; absolute targets point into the installed system, so they are re-rooted
    at the unpacked package (os.path.realpath would follow them into the host's /usr)."""
    for _ in range(MAX_LINK_HOPS):
        if not path.is_symlink():
            return path.resolve() if path.is_file() else None
        target = Path(os.readlink(path))
        if target.is_absolute():
            path = package_root / target.relative_to("/")
        else:
            path = path.parent / target
    return None


def _require_tools(*tools: str) -> None:
    absent = [tool for tool in tools if shutil.which(tool) is None]
    if absent:
        raise DebianError(
            f"{' and '.join(absent)} not found: building this benchmark needs a Debian or "
            "Ubuntu system with apt (no root needed)"
        )


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    logger.debug("running %s", " ".join(command))
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)


def _missing_names(stderr: str) -> set[str]:
    return {match for pattern in _MISSING_PACKAGE_PATTERNS for match in pattern.findall(stderr)}


def _first_error_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("E:")]
    return (errors or lines or ["no error message"])[0]

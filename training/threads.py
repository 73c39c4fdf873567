"""How many threads each compute pool of this process may use, and how its idle threads wait.

Why a policy: torch, FAISS and NumPy each bring an OpenMP or BLAS pool sized to every core of
the machine, and ONNX Runtime its own; by default their idle threads spin. On a shared CPU (a
busy host, or the API and its workers on one box) the spinning threads of one pool hold the
cores another pool's threads wait for at a barrier: the service then ran at an eighth of its
one-thread speed and stayed there (docs/service.md, "Threads"). The policy:

- **CPUs this process may use**: its affinity mask, capped by its cgroup's CPU quota (a
  container's `cpus:`), rounded up.
- **Processes sharing them** (`LOOKALIKE_CPU_SHARERS`, default 1): `lookalike serve` sets it to
  its API plus local workers; under docker compose each container has its own quota, so 1.
- **Threads per pool** = max(1, CPUs // sharers), unless `LOOKALIKE_THREADS` names a number.
  Inter-op pools get one thread: requests run side by side on threads we own, not inside torch.
- **Idle threads sleep**: `OMP_WAIT_POLICY=PASSIVE` (libgomp, which torch and faiss load),
  `KMP_BLOCKTIME=0` (Intel OpenMP) and ONNX Runtime's `allow_spinning=0`.

OpenMP and BLAS read their environment once, when the library loads, so
`configure_environment` runs when the `training` or `app` package is imported, before torch;
variables the user already set win (`LOOKALIKE_THREAD_POLICY=off` leaves all of them alone).
`apply` then sets the pools that can change at run time.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path

THREADS_ENV = "LOOKALIKE_THREADS"
SHARERS_ENV = "LOOKALIKE_CPU_SHARERS"
POLICY_ENV = "LOOKALIKE_THREAD_POLICY"  # "off": leave the environment as it is
# Pools sized from the environment when their library loads.
_POOL_SIZE_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_SLEEPING_WAIT = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
# Pool sizes the user set before `configure_environment` ran: they win everywhere.
_USER_POOL_VARIABLES: set[str] = set()

_CGROUP_V2_MAX = Path("/sys/fs/cgroup/cpu.max")
_CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
_CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def cgroup_cpu_quota(root: Path = Path("/")) -> float | None:
    """CPUs' worth of time this process's cgroup may use per period (`cpus: 1.5` gives 1.5),
    the tightest of its own and its ancestors' quotas (cgroup v2, or v1), or None."""
    quotas = []
    for directory in _cgroup_v2_directories(root):
        try:
            quota, period = (directory / "cpu.max").read_text().split()[:2]
            if quota != "max":
                quotas.append(int(quota) / int(period))
        except (OSError, ValueError):
            continue
    if quotas:
        return min(quotas)
    try:
        quota_v1 = root / _CGROUP_V1_QUOTA.relative_to("/")
        if quota_v1.is_file():
            quota_us = int(quota_v1.read_text())
            period_us = int((root / _CGROUP_V1_PERIOD.relative_to("/")).read_text())
            return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None
    return None


def _cgroup_v2_directories(root: Path) -> list[Path]:
    """This process's cgroup v2 directory and its ancestors up to the mount (a container with
    its own cgroup namespace sees its cgroup as the mount itself)."""
    mount = root / _CGROUP_V2_MAX.parent.relative_to("/")
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
        relative = next(line.split(":", 2)[2] for line in lines if line.startswith("0::"))
    except (OSError, StopIteration, IndexError):
        relative = "/"
    directories = [mount]
    current = mount
    for part in Path(relative).parts[1:]:
        current = current / part
        directories.append(current)
    return directories


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by its cgroup quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def _positive_int(environ: MutableMapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a whole number, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


@dataclass(frozen=True)
class ThreadPolicy:
    """Threads of each intra-op pool in this process, and why."""

    threads: int
    cpus: int
    sharers: int
    overridden: bool

    @classmethod
    def resolve(cls, threads: int = 0, sharers: int = 1, cpus: int | None = None) -> ThreadPolicy:
        """`threads` > 0 overrides; otherwise the CPUs divided among the sharing processes."""
        cpus = usable_cpus() if cpus is None else cpus
        sharers = max(1, sharers)
        if threads > 0:
            return cls(threads, cpus, sharers, overridden=True)
        return cls(max(1, cpus // sharers), cpus, sharers, overridden=False)

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] | None = None) -> ThreadPolicy:
        environ = os.environ if environ is None else environ
        return cls.resolve(
            threads=_positive_int(environ, THREADS_ENV, 0),
            sharers=_positive_int(environ, SHARERS_ENV, 1),
        )

    def describe(self) -> str:
        if self.overridden:
            return f"{self.threads} threads per pool ({THREADS_ENV})"
        return (
            f"{self.threads} threads per pool ({self.cpus} usable CPUs shared by "
            f"{self.sharers} processes)"
        )


def configure_environment(environ: MutableMapping[str, str] | None = None) -> ThreadPolicy:
    """Set the pool sizes and the sleeping wait policy in the environment, where the user has
    not; effective only before torch, faiss and NumPy load (they read it once). With
    `LOOKALIKE_THREAD_POLICY=off` (a program that manages its own threads) it changes nothing."""
    environ = os.environ if environ is None else environ
    if environ.get(POLICY_ENV, "").strip().lower() == "off":
        return ThreadPolicy.resolve()
    try:
        policy = ThreadPolicy.from_environment(environ)
    except ValueError:
        policy = ThreadPolicy.resolve()  # Settings reports the bad value with its field name
    for name in _POOL_SIZE_VARIABLES:
        if name in environ and environ is os.environ:
            _USER_POOL_VARIABLES.add(name)
        environ.setdefault(name, str(policy.threads))
    for name, value in _SLEEPING_WAIT.items():
        environ.setdefault(name, value)
    return policy


def pool_environment(policy: ThreadPolicy) -> dict[str, str]:
    """The pool sizes of `policy` as environment variables, for a process about to load torch
    and faiss (this one before it does, or a child), except those the user set."""
    return {
        name: str(policy.threads)
        for name in _POOL_SIZE_VARIABLES
        if name not in _USER_POOL_VARIABLES
    }


def apply(policy: ThreadPolicy) -> None:
    """Size the pools that can change at run time: torch's intra- and inter-op pools and the
    BLAS pools already loaded (threadpoolctl). OpenMP pools other than torch's (faiss's) keep
    the size `OMP_NUM_THREADS` gave them when they loaded. Call before the first forward pass."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(policy.threads)
    if torch.get_num_interop_threads() != 1:
        # Fixed once any inter-op work ran (RuntimeError); harmless: we never use that pool.
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(1)
    threadpool_limits(limits=policy.threads, user_api="blas")

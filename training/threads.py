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

_CGROUP_V2_MAX = Path("/sys/fs/cgroup/cpu.max")
_CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
_CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def cgroup_cpu_quota(root: Path = Path("/")) -> float | None:
    """CPUs' worth of time the cgroup may use per period (`cpus: 1.5` gives 1.5), or None."""
    v2 = root / _CGROUP_V2_MAX.relative_to("/")
    try:
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        quota_v1 = root / _CGROUP_V1_QUOTA.relative_to("/")
        if quota_v1.is_file():
            quota = int(quota_v1.read_text())
            period = int((root / _CGROUP_V1_PERIOD.relative_to("/")).read_text())
            return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None
    return None


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
        return ThreadPolicy.resolve(threads=_positive_int(environ, "OMP_NUM_THREADS", 0))
    try:
        policy = ThreadPolicy.from_environment(environ)
    except ValueError:
        policy = ThreadPolicy.resolve()  # Settings reports the bad value with its field name
    for name in _POOL_SIZE_VARIABLES:
        environ.setdefault(name, str(policy.threads))
    for name, value in _SLEEPING_WAIT.items():
        environ.setdefault(name, value)
    return policy


def apply(policy: ThreadPolicy) -> None:
    """Size the pools that can change at run time: torch's intra- and inter-op pools and every
    OpenMP/BLAS pool already loaded (threadpoolctl). Call from the process's main thread at
    start-up, before the first forward pass."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(policy.threads)
    if torch.get_num_interop_threads() != 1:
        # Fixed once any inter-op work ran (RuntimeError); harmless: we never use that pool.
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(1)
    threadpool_limits(limits=policy.threads, user_api="blas")

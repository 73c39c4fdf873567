"""The thread policy: CPUs from affinity and cgroup quota, divided among sharing processes;
idle threads sleep; the environment is set before torch loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from training import threads
from training.threads import ThreadPolicy, cgroup_cpu_quota, configure_environment

ROOT = Path(__file__).resolve().parents[1]


def test_threads_are_the_cpus_divided_among_sharers() -> None:
    assert ThreadPolicy.resolve(sharers=1, cpus=8).threads == 8
    assert ThreadPolicy.resolve(sharers=3, cpus=8).threads == 2
    assert ThreadPolicy.resolve(sharers=3, cpus=2).threads == 1  # never below one
    assert ThreadPolicy.resolve(sharers=0, cpus=4).threads == 4  # 0 sharers means 1
    override = ThreadPolicy.resolve(threads=5, sharers=3, cpus=2)
    assert override.threads == 5 and override.overridden
    assert "LOOKALIKE_THREADS" in override.describe()


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({"sys/fs/cgroup/cpu.max": "150000 100000\n"}, 1.5),
        ({"sys/fs/cgroup/cpu.max": "max 100000\n"}, None),
        (
            {
                "sys/fs/cgroup/cpu/cpu.cfs_quota_us": "300000\n",
                "sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n",
            },
            3.0,
        ),
        (
            {
                "sys/fs/cgroup/cpu/cpu.cfs_quota_us": "-1\n",
                "sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n",
            },
            None,
        ),
        (
            {
                "proc/self/cgroup": "0::/system.slice/app.service\n",
                "sys/fs/cgroup/cpu.max": "max 100000\n",
                "sys/fs/cgroup/system.slice/cpu.max": "200000 100000\n",
                "sys/fs/cgroup/system.slice/app.service/cpu.max": "300000 100000\n",
            },
            2.0,  # the tightest of the process's cgroup and its ancestors
        ),
        ({"sys/fs/cgroup/cpu.max": "garbage"}, None),
        ({}, None),
    ],
)
def test_cgroup_quota_v1_and_v2(tmp_path: Path, files: dict[str, str], quota) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_quota(tmp_path) == quota


def test_usable_cpus_respects_the_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(threads, "cgroup_cpu_quota", lambda: 1.5)
    assert threads.usable_cpus() == 2  # a 1.5-CPU quota rounds up
    monkeypatch.setattr(threads, "cgroup_cpu_quota", lambda: None)
    assert threads.usable_cpus() == 4


def test_environment_defaults_never_override_the_user() -> None:
    environ = {"LOOKALIKE_THREADS": "3", "OMP_WAIT_POLICY": "ACTIVE"}
    policy = configure_environment(environ)
    assert policy.threads == 3
    assert environ["OMP_NUM_THREADS"] == environ["OPENBLAS_NUM_THREADS"] == "3"
    assert environ["OMP_WAIT_POLICY"] == "ACTIVE"  # the user's choice stands
    assert environ["KMP_BLOCKTIME"] == "0"


@pytest.mark.parametrize("value", ["two", "-1"])
def test_a_bad_thread_count_is_an_error(value: str) -> None:
    with pytest.raises(ValueError, match="LOOKALIKE_THREADS"):
        ThreadPolicy.from_environment({"LOOKALIKE_THREADS": value})


def test_importing_app_sets_the_environment_before_torch_loads() -> None:
    script = (
        "import json, os, app, torch\n"
        "from training import threads\n"
        "from app.core.config import Settings\n"
        "threads.apply(Settings().thread_policy())\n"
        "print(json.dumps({k: os.environ.get(k) for k in "
        "('OMP_WAIT_POLICY', 'OMP_NUM_THREADS')} | "
        "{'torch': torch.get_num_threads(), 'interop': torch.get_num_interop_threads()}))"
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OMP_", "LOOKALIKE_", "KMP_", "MKL_", "OPENBLAS_"))
    }
    env["LOOKALIKE_CPU_SHARERS"] = "64"  # more sharers than CPUs: one thread each
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen == {
        "OMP_WAIT_POLICY": "PASSIVE",
        "OMP_NUM_THREADS": "1",
        "torch": 1,
        "interop": 1,
    }


def test_the_policy_can_be_switched_off() -> None:
    environ = {"LOOKALIKE_THREAD_POLICY": "off"}
    configure_environment(environ)
    assert environ == {"LOOKALIKE_THREAD_POLICY": "off"}


def test_a_child_gets_the_shared_pool_sizes_unless_the_user_set_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    policy = ThreadPolicy.resolve(sharers=3, cpus=6)
    monkeypatch.setattr(threads, "_USER_POOL_VARIABLES", set())
    assert threads.pool_environment(policy) == {
        "OMP_NUM_THREADS": "2",
        "MKL_NUM_THREADS": "2",
        "OPENBLAS_NUM_THREADS": "2",
    }
    monkeypatch.setattr(threads, "_USER_POOL_VARIABLES", {"OMP_NUM_THREADS"})
    assert "OMP_NUM_THREADS" not in threads.pool_environment(policy)

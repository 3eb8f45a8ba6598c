"""``kill -9`` of ``flora fit`` at seeded moments, then ``--trainer.resume true``: the same run.

The run goes through a small wrapper around ``flora`` that prints a marker before each atomic
file replace and each folder rename of :mod:`flora_lightning.rundir.checkpoint` (and pauses there), so
a kill can land exactly inside a checkpoint write: the temporary file complete but not yet
renamed, or a folder swap half done. One more kill lands at a seeded random time. After each
kill no run-directory file is torn, and the resumed run ends with the uninterrupted run's final
adapter and per-round test losses (1e-6).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flora_lightning.rundir.checkpoint import load_state, verify_folder

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ARGS = [
    "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
    "--trainer.rounds", "3", "--trainer.max_local_steps", "1", "--trainer.progress", "false",
    "--data.partition.num_clients", "3", "--data.max_test_samples", "64",
    "--trainer.cache_features", "false",
]  # fmt: skip
WRAPPER = """
import os, sys, time
from flora_lightning import cli
from flora_lightning.rundir import checkpoint

pause = float(os.environ.get("FLORA_KILL_TEST_PAUSE", "0"))
real_replace = checkpoint._replace

def _replace(tmp, target):
    print("FLORA-MARK write", target, flush=True)
    time.sleep(pause)
    return real_replace(tmp, target)

class _Os:
    def __getattr__(self, name):
        return getattr(os, name)

    @staticmethod
    def rename(src, dst):
        print("FLORA-MARK rename", src, dst, flush=True)
        time.sleep(pause)
        return os.rename(src, dst)

checkpoint._replace = _replace
checkpoint.os = _Os()
sys.argv = ["flora", *sys.argv[1:]]
cli.main()
"""


def start(run_dir: Path, *extra: str, pause: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "FLORA_KILL_TEST_PAUSE": str(pause)}
    return subprocess.Popen(
        [sys.executable, "-c", WRAPPER, *ARGS, "--trainer.default_root_dir", str(run_dir), *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def marks(proc: subprocess.Popen, stop_at: int | None = None) -> list[str]:
    """Read the markers; SIGKILL the process when marker number ``stop_at`` (1-based) shows."""
    seen = []
    for line in proc.stdout:
        if line.startswith("FLORA-MARK "):
            seen.append(line.split(" ", 1)[1].strip())
            if stop_at is not None and len(seen) == stop_at:
                os.kill(proc.pid, signal.SIGKILL)
                break
    proc.wait(timeout=300)
    return seen


def assert_nothing_torn(run_dir: Path) -> None:
    """Every visible safetensors file loads; every folder with a manifest verifies."""
    for path in run_dir.rglob("*.safetensors"):
        if not any(part.startswith(".") for part in path.relative_to(run_dir).parts):
            load_state(path)
    for manifest in run_dir.rglob("manifest.json"):
        if not any(part.startswith(".") for part in manifest.relative_to(run_dir).parts):
            verify_folder(manifest.parent)


def final_state(run_dir: Path):
    return load_state(run_dir / "final" / "adapter_model.safetensors")


def test_sigkill_at_seeded_moments_then_resume_ends_identical(tmp_path, offline_assets):
    full_dir = tmp_path / "full"
    t0 = time.perf_counter()
    full = start(full_dir)
    seen = marks(full)
    seconds = time.perf_counter() - t0
    assert full.returncode == 0
    writes = [i + 1 for i, m in enumerate(seen) if m.startswith("write") and "round_" in m]
    swaps = [i + 1 for i, m in enumerate(seen) if m.startswith("rename")]
    assert writes and swaps, seen

    rng = random.Random(20261129)
    kill_points = [
        ("checkpoint write", rng.choice(writes)),
        ("folder swap", rng.choice(swaps)),
        ("any write", rng.randrange(1, len(seen) + 1)),
        ("random time", None),
    ]
    reference = final_state(full_dir)
    full_summary = json.loads((full_dir / "summary.json").read_text())
    for k, (what, mark) in enumerate(kill_points):
        run_dir = tmp_path / f"killed{k}"
        if mark is None:
            proc = start(run_dir)
            time.sleep(rng.uniform(0.3, 0.9) * seconds)
            proc.kill()
            proc.communicate(timeout=300)
        else:
            proc = start(run_dir, pause=0.2)
            marks(proc, stop_at=mark)
        assert proc.returncode == -signal.SIGKILL or (mark is None and proc.returncode == 0), what
        if run_dir.exists():
            assert_nothing_torn(run_dir)

        resumed = start(run_dir, "--trainer.resume", "true")
        output = resumed.communicate(timeout=600)[0]
        assert resumed.returncode == 0, f"{what}: resume failed:\n{output[-3000:]}"
        for name, tensor in reference.items():
            diff = (final_state(run_dir)[name] - tensor).abs().max().item()
            assert diff <= 1e-6, f"{what} (mark {mark}): {name} differs by {diff}"
        summary = json.loads((run_dir / "summary.json").read_text())
        assert [r["round"] for r in summary["rounds"]] == [0, 1, 2, 3]
        for a, b in zip(full_summary["rounds"], summary["rounds"], strict=True):
            assert a["test_loss"] == pytest.approx(b["test_loss"], abs=1e-6), what
        last = "checkpoints/round_003.safetensors"
        for name, tensor in load_state(full_dir / last).items():
            assert torch.allclose(load_state(run_dir / last)[name], tensor, atol=1e-6, rtol=0)

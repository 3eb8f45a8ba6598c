"""``flora`` on bad input and failures: exit code, the one-line message, files on disk.

Config errors exit 2, runtime failures 1; a bug or out-of-memory never reads as a config error;
``--debug`` / ``FLORA_DEBUG=1`` add the traceback; the run directory's ``flora.log`` gets it.
"""

from __future__ import annotations

import errno
import json
import linecache
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flora_lightning import cli
from flora_lightning.error_report import PACKAGE_DIR, ConfigError, classify

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
FAST = [
    "--trainer.rounds", "2", "--trainer.max_local_steps", "1", "--trainer.progress", "false",
    "--data.partition.num_clients", "3", "--data.max_test_samples", "64",
    "--trainer.cache_features", "false",
]  # fmt: skip
BAD_YAML = "trainer:\n  rounds: 2\n   seed: [1\n"


def run_main(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """``flora ARGS`` in this process: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["flora", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


def fit_args(run_dir: Path, *extra: str) -> list[str]:
    return [
        "fit", "--config", QUICKSTART, "--trainer.default_root_dir", str(run_dir), *FAST, *extra
    ]  # fmt: skip


def bad_yaml(tmp: Path) -> list[str]:
    (tmp / "bad.yaml").write_text(BAD_YAML)
    return ["fit", "--config", str(tmp / "bad.yaml")]


def root_dir_is_file(tmp: Path) -> list[str]:
    (tmp / "run").write_text("not a folder")
    return ["fit", "--config", QUICKSTART, "--trainer.default_root_dir", str(tmp / "run")]


def root_dir_file_in_config(tmp: Path) -> list[str]:
    (tmp / "run").write_text("not a folder")
    (tmp / "c.yaml").write_text(f"trainer:\n  default_root_dir: {tmp / 'run'}\n")
    return ["fit", "--config", QUICKSTART, "--config", str(tmp / "c.yaml")]


def root_dir_below_a_file(tmp: Path) -> list[str]:
    (tmp / "run").write_text("not a folder")
    return ["fit", "--config", QUICKSTART, "--trainer.default_root_dir", str(tmp / "run" / "x")]


EARLY = [
    # (id, args builder, expected message start (tmp → text))
    ("yaml-syntax", bad_yaml,
     lambda tmp: f"--config {tmp / 'bad.yaml'}: YAML syntax error at line 3, column 8: "
        "mapping values are not allowed here"),
    ("missing-config", lambda tmp: ["fit", "--config", str(tmp / "nope.yaml")],
     lambda tmp: f"--config {tmp / 'nope.yaml'}: no such file"),
    ("root-dir-is-a-file", root_dir_is_file,
     lambda tmp: f"trainer.default_root_dir={tmp / 'run'} cannot be a run directory: it is an "
     "existing file"),
    ("root-dir-file-from-config", root_dir_file_in_config,
     lambda tmp: f"trainer.default_root_dir={tmp / 'run'} cannot be a run directory"),
    ("root-dir-below-a-file", root_dir_below_a_file,
     lambda tmp: f"trainer.default_root_dir={tmp / 'run' / 'x'} cannot be a run directory: "
     f"{tmp / 'run'} is an existing file"),
]  # fmt: skip


@pytest.mark.parametrize(("build", "expected"), [c[1:] for c in EARLY], ids=[c[0] for c in EARLY])
def test_errors_found_before_the_heavy_imports(tmp_path, build, expected):
    """Reported with exit 2 in one line, before torch / transformers / lightning are imported."""
    args = build(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    probe = (
        "import sys\nfrom flora_lightning import cli\n"
        f"sys.argv = ['flora', *{args!r}]\n"
        "try:\n    cli.main()\nexcept SystemExit as e:\n    code = e.code\n"
        "heavy = [m for m in ('torch', 'transformers', 'lightning') if m in sys.modules]\n"
        "print(code, heavy)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.stdout.strip() == "2 []", done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"flora: error: {expected(tmp_path)}"), lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_root_dir_that_is_a_file_is_refused_after_the_full_parse_too(tmp_path, monkeypatch, capsys):
    """Set where the early check cannot see it (a --trainer group file), the stage refuses it."""
    (tmp_path / "run").write_text("keep me")
    (tmp_path / "trainer.yaml").write_text(f"default_root_dir: {tmp_path / 'run'}\n")
    args = ["fit", "--config", QUICKSTART, "--trainer", str(tmp_path / "trainer.yaml")]
    code, err = run_main(args, monkeypatch, capsys)
    assert code == 2
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith(
            f"flora: error: trainer.default_root_dir={tmp_path / 'run'} cannot be a run directory"
        )
    )
    assert (tmp_path / "run").read_text() == "keep me"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--trainer.rounds", "many"], "Parser key \"trainer.rounds\": Expected a <class 'int'>"),
        (["--trainer.rounds", "-1"], "trainer.rounds must be >= 0 (got -1)."),
        (["--no_such_option", "1"], "unrecognized arguments: --no_such_option 1"),
        (
            ["--trainer.strategy", "FedProx", "--trainer.strategy.mu", "-1"],
            "trainer.strategy.mu must be >= 0 (got -1.0)",
        ),
    ],
    ids=["parse", "validation", "unknown-option", "strategy-setting"],
)
def test_config_errors_are_one_line_exit_2(tmp_path, monkeypatch, capsys, override, message):
    code, err = run_main(fit_args(tmp_path / "run", *override), monkeypatch, capsys)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith(f"flora: error: {message}")
    assert "Traceback" not in err and "usage:" not in err
    assert not (tmp_path / "run").exists()


def boom(*args, **kwargs):
    return {}["a key that is not there"]  # an accident, not a `raise`: a bug


def cuda_oom(*args, **kwargs):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.parametrize(
    ("failure", "message"),
    [
        (boom, "internal error: KeyError: a key that is not there — this is a bug, please report"),
        (cuda_oom, "out of GPU memory: CUDA out of memory. Tried to allocate 2.00 GiB — reduce "
         "data.batch_size"),
    ],
    ids=["internal-bug", "cuda-oom"],
)  # fmt: skip
def test_bugs_and_oom_never_read_as_config_errors(
    tmp_path, monkeypatch, capsys, offline_assets, failure, message
):
    from flora_lightning.methods.base import FederatedCLIPModule

    # Round 0's evaluation runs after the run directory exists.
    monkeypatch.setattr(FederatedCLIPModule, "evaluate_batch", failure)
    run_dir = tmp_path / "run"
    code, err = run_main(fit_args(run_dir), monkeypatch, capsys)
    assert code == 1
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"flora: error: {message}"), lines[-1]
    assert "Traceback" not in err
    log = (run_dir / "flora.log").read_text()
    assert "flora fit failed:" in log and "Traceback (most recent call last)" in log
    assert f"in {failure.__name__}" in log  # the frame where it happened


@pytest.mark.parametrize("how", ["flag-before", "flag-after", "env"])
def test_debug_prints_the_traceback(tmp_path, monkeypatch, capsys, how):
    args = ["fit", "--config", str(tmp_path / "nope.yaml")]
    if how == "flag-before":
        args = ["--debug", *args]
    elif how == "flag-after":
        args = [*args, "--debug"]
    else:
        monkeypatch.setenv("FLORA_DEBUG", "1")
    code, err = run_main(args, monkeypatch, capsys)
    assert code == 2
    assert err.startswith("Traceback (most recent call last)")
    assert "flora_lightning.error_report.ConfigError" in err
    assert err.strip().splitlines()[-1].startswith(f"flora: error: --config {tmp_path}")


def test_disk_full_mid_run_stops_clearly_and_resume_matches_an_uninterrupted_run(
    tmp_path, monkeypatch, capsys, offline_assets
):
    """ENOSPC while writing round 2's checkpoint: exit 1, round 1 intact, resume = full run."""
    import safetensors.torch

    from flora_lightning.rundir.checkpoint import load_state

    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    assert run_main(fit_args(full_dir), monkeypatch, capsys)[0] == 0

    real = safetensors.torch.save_file

    def disk_full_at_round_2(tensors, filename, metadata=None):
        if Path(filename).name == ".round_002.safetensors.tmp":
            Path(filename).write_bytes(b"\x00" * 9)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full_at_round_2)
    code, err = run_main(fit_args(cut_dir), monkeypatch, capsys)
    monkeypatch.undo()
    assert code == 1
    target = cut_dir / "checkpoints" / "round_002.safetensors"
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith(f"flora: error: could not write {target}: no space left on device")
    )
    assert "--trainer.resume true" in err
    assert sorted(p.name for p in (cut_dir / "checkpoints").glob("round_*")) == [
        "round_001.safetensors"
    ]
    load_state(cut_dir / "checkpoints" / "round_001.safetensors")  # intact
    assert "RunDirWriteError" in (cut_dir / "flora.log").read_text()

    code, err = run_main(fit_args(cut_dir, "--trainer.resume", "true"), monkeypatch, capsys)
    assert code == 0, err
    full = json.loads((full_dir / "summary.json").read_text())
    resumed = json.loads((cut_dir / "summary.json").read_text())
    assert [r["round"] for r in resumed["rounds"]] == [0, 1, 2]
    for a, b in zip(full["rounds"], resumed["rounds"], strict=True):
        assert a["test_loss"] == pytest.approx(b["test_loss"], abs=1e-6)
        assert a["test_acc"] == pytest.approx(b["test_acc"], abs=1e-6)
    last_full = load_state(full_dir / "checkpoints" / "round_002.safetensors")
    last_resumed = load_state(target)
    for name, tensor in last_full.items():
        torch.testing.assert_close(last_resumed[name], tensor, atol=1e-6, rtol=0)


def raised_in_package(line: str, monkeypatch) -> Exception:
    """The exception ``line`` raises when it runs in a (fake) module inside the package."""
    filename = str(PACKAGE_DIR / "_fake_module_for_tests.py")
    source = f"def f():\n    {line}\n"
    lines = source.splitlines(True)
    monkeypatch.setitem(linecache.cache, filename, (len(source), None, lines, filename))
    namespace: dict = {}
    exec(compile(source, filename, "exec"), namespace)
    try:
        namespace["f"]()
    except Exception as err:
        return err
    raise AssertionError(f"{line} did not raise")


@pytest.mark.parametrize(
    ("line", "kind", "code"),
    [
        ("raise ValueError('data.x must be > 0')", "config", 2),
        ("raise TypeError('model.y must be a list')", "config", 2),
        ("raise FileExistsError('the run exists')", "config", 2),
        ("raise RuntimeError('too few clients accepted')", "runtime", 1),
        ("int('an accident in our code')", "internal", 1),
        ("{}['an accident in our code']", "internal", 1),
        ("None + 1", "internal", 1),
    ],
)
def test_classify_separates_our_raises_from_accidents(line, kind, code, monkeypatch):
    report = classify(raised_in_package(line, monkeypatch))
    assert (report.kind, report.exit_code) == (kind, code)


@pytest.mark.parametrize(
    ("err", "kind"),
    [
        (ValueError("raised by a library"), "internal"),
        (RuntimeError("CUDA error: device-side assert triggered"), "internal"),
        (torch.cuda.OutOfMemoryError("CUDA out of memory"), "oom"),
        (MemoryError(), "oom"),
    ],
)
def test_classify_library_errors_and_out_of_memory(err, kind):
    assert classify(err).kind == kind
    assert classify(err).exit_code == 1


def test_a_full_disk_outside_checkpoint_py_is_a_disk_error_not_a_bug():
    """E.g. TensorBoard's event file or a plain write_text on a full disk."""
    err = OSError(errno.ENOSPC, "No space left on device", "/runs/q/tensorboard/events.out")
    report = classify(err)
    assert (report.kind, report.exit_code) == ("runtime", 1)
    assert report.message.startswith(
        "could not write /runs/q/tensorboard/events.out: no space left on device"
    )
    assert "previous version is intact" not in report.message  # not one of our atomic writes
    assert "Free space on that disk, then rerun (`--trainer.resume true`" in report.message


def test_ctrl_c_is_one_line_exit_130(monkeypatch, capsys):
    def interrupted(args=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run", interrupted)
    code, err = run_main(["fit"], monkeypatch, capsys)
    assert code == 130
    assert err.strip().splitlines() == [
        "flora: interrupted; files written so far are complete (`--trainer.resume true` "
        "continues a fit run from its last resume state)."
    ]


def test_run_log_holds_lines_until_the_run_directory_exists(tmp_path):
    import logging

    from flora_lightning.error_report import run_log

    log = logging.getLogger("flora_lightning.test_run_log")
    log.setLevel(logging.INFO)
    run_dir = tmp_path / "run"
    handlers = list(logging.getLogger().handlers)
    with run_log(run_dir, "flora fit") as path:
        log.info("before the folder exists")
        run_dir.mkdir()
        log.warning("after")
    assert path == run_dir / "flora.log"
    lines = path.read_text().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == ["before the folder exists", "after"]
    assert "INFO flora_lightning.test_run_log" in lines[0]

    never = tmp_path / "never"
    with pytest.raises(ValueError), run_log(never, "flora fit"):
        log.info("a config error follows")
        raise ValueError("trainer.rounds must be >= 0")
    assert not never.exists()  # a failed config writes nothing
    assert logging.getLogger().handlers == handlers  # the handler is removed each time


def test_run_log_gets_the_traceback_of_a_runtime_failure_only(tmp_path):
    from flora_lightning.error_report import ConfigError, run_log

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(ConfigError), run_log(run_dir, "flora fit"):
        raise ConfigError("trainer.default_root_dir=... cannot be a run directory")
    assert not (run_dir / "flora.log").exists()
    with pytest.raises(ZeroDivisionError), run_log(run_dir, "flora fit"):
        1 / 0  # noqa: B018
    text = (run_dir / "flora.log").read_text()
    assert "ERROR flora_lightning: flora fit failed:" in text
    assert "Traceback (most recent call last)" in text and "ZeroDivisionError" in text


def test_print_config_does_not_check_the_run_directory(tmp_path, capsys):
    (tmp_path / "run").write_text("a file")
    args = ["fit", "--config", QUICKSTART, "--trainer.default_root_dir", str(tmp_path / "run")]
    cli.precheck([*args, "--print_config"])  # prints only: nothing to refuse
    with pytest.raises(ConfigError, match="cannot be a run directory"):
        cli.precheck(args)

"""``flora sweep`` end to end on the offline tiny CLIP: run, skip, retry, resume, report.

The module's grid (FLoRA, FedLC and a method whose model cannot load x IID and pathological
few-shot x 2 seeds, 1 round of 2 local steps, 2 clients) runs once; the tests read it.
"""

from __future__ import annotations

import csv
import json
import shutil
import statistics
import sys
from pathlib import Path

import pytest
import yaml

from flora_lightning import cli

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
FAST = [
    "--trainer.rounds",
    "1",
    "--trainer.max_local_steps",
    "2",
    "--trainer.progress",
    "false",
    "--data.max_test_samples",
    "64",
    "--data.partition.num_clients",
    "2",
]
GOOD = [
    f"digits/{p}/{m}/seed{s}" for p in ("iid", "pat16") for m in ("FLoRA", "FedLC") for s in (0, 1)
]
BROKEN = [f"digits/{p}/Broken/seed{s}" for p in ("iid", "pat16") for s in (0, 1)]


def write_spec(path: Path, **entries) -> Path:
    spec = {
        "base": str(CONFIGS / "quickstart.yaml"),
        "overrides": FAST,
        "datasets": {"digits": None},
        "methods": {
            "FLoRA": str(CONFIGS / "quickstart.yaml"),
            "FedLC": str(CONFIGS / "quickstart_fedlc.yaml"),
            # Valid config, but the model folder does not exist: fails when the cell runs.
            "Broken": {
                "class_path": "flora_lightning.methods.FedLC",
                "init_args": {"name_or_path": str(path.parent / "no_such_clip")},
            },
        },
        "partitions": {
            "iid": {"kind": "iid"},
            "pat16": str(CONFIGS / "partitions" / "pathological_fewshot16.yaml"),
        },
        "seeds": [0, 1],
        "callbacks": ["MemoryProfiler"],
    }
    spec.update(entries)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def sweep(*args: str) -> dict:
    return cli.run(["sweep", *args])


def files_with_mtimes(folder: Path) -> dict[str, int]:
    """The run's files (not ``run.lock``, which records whoever last locked the cell: a sweep
    checking a finished cell takes its lock too)."""
    return {
        str(p.relative_to(folder)): p.stat().st_mtime_ns
        for p in folder.rglob("*")
        if p.name != "run.lock"
    }


@pytest.fixture(scope="module")
def grid(tmp_path_factory, offline_assets):
    folder = tmp_path_factory.mktemp("sweep")
    spec = write_spec(folder / "grid.yaml")
    out = folder / "out"
    record = sweep("--config", str(spec), "--out", str(out))
    return spec, out, record


def summary(out: Path, cell: str) -> dict:
    return json.loads((out / cell / "summary.json").read_text())


def table_rows(path: Path) -> dict[str, list[str]]:
    lines = [line for line in path.read_text().splitlines() if line.startswith("| ")][2:]
    return {
        c[0]: c[1:] for c in ([x.strip() for x in line.strip("|").split("|")] for line in lines)
    }


def test_cells_run_and_a_failing_cell_does_not_stop_the_others(grid):
    spec, out, record = grid
    assert record["counts"] == {"done": 8, "failed": 4}
    statuses = {c["cell"]: c["status"] for c in record["cells"]}
    assert statuses == {**dict.fromkeys(GOOD, "done"), **dict.fromkeys(BROKEN, "failed")}
    assert json.loads((out / "sweep.json").read_text())["cells"] == record["cells"]
    for cell in GOOD:
        s = summary(out, cell)
        assert [r["round"] for r in s["rounds"]] == [0, 1]
        assert s["method"] == cell.split("/")[2]
        assert s["peak_memory_bytes"] > 0  # the spec's MemoryProfiler callback
        assert (out / cell / "final").is_dir()
        config = yaml.safe_load((out / cell / "config.yaml").read_text())
        assert config["trainer"]["seed"] == config["data"]["partition"]["seed"] == int(cell[-1])
        by_cell = {c["cell"]: c for c in record["cells"]}
        assert by_cell[cell]["best_test_acc"] == s["best_test_acc"]
    pat = yaml.safe_load((out / GOOD[4] / "config.yaml").read_text())["data"]["partition"]
    assert (pat["kind"], pat["classes_per_client"], pat["shots"]) == ("pathological", None, 16)
    assert (out / GOOD[4] / "label_table.txt").read_text().splitlines()[1].split()[1] == "80"
    for cell in BROKEN:
        failure = json.loads((out / cell / "failed.json").read_text())
        assert failure["cell"] == cell
        assert failure["error_type"] == "NotAvailableError"
        assert "no_such_clip" in failure["message"]
        assert "Traceback" in failure["traceback"]
        assert failure["args"][:3] == ["fit", "--config", str(CONFIGS / "quickstart.yaml")]
        assert not (out / cell / "summary.json").exists()


def test_tables_hold_the_summaries_numbers(grid):
    _, out, _ = grid
    for partition in ("iid", "pat16"):
        rows = table_rows(out / "report" / f"results_{partition}.md")
        assert list(rows) == ["FLoRA", "FedLC", "Broken"]  # the spec's order
        assert rows["Broken"] == ["–"]
        with (out / "report" / f"results_{partition}.csv").open() as f:
            saved = {r["method"]: r for r in csv.DictReader(f)}
        for method in ("FLoRA", "FedLC"):
            accs = [
                summary(out, f"digits/{partition}/{method}/seed{s}")["best_test_acc"]
                for s in (0, 1)
            ]
            mean, std = statistics.fmean(accs), statistics.stdev(accs)
            assert rows[method][0].replace("**", "") == f"{100 * mean:.2f} ± {100 * std:.2f}"
            assert float(saved[method]["digits_acc_mean"]) == pytest.approx(mean)
            assert float(saved[method]["digits_acc_std"]) == pytest.approx(std)
            tex = (out / "report" / f"results_{partition}.tex").read_text()
            assert f"{100 * mean:.2f} $\\pm$ {100 * std:.2f}" in tex
        assert (out / "report" / f"accuracy_digits_{partition}.png").read_bytes()[:4] == b"\x89PNG"
    lines = (out / "report" / "cost.md").read_text().splitlines()[4:]
    cost = {
        c[1]: c[1:] for c in ([x.strip() for x in line.strip("|").split("|")] for line in lines)
    }
    # Tiny CLIP: FLoRA's LoRA 512 parameters, FedLC's 65 x 10 head; fp32 bytes.
    assert cost["FLoRA"][1:3] == ["512", "2,048"]
    assert cost["FedLC"][1:3] == ["650", "2,600"]
    assert cost["FLoRA"][3] == "4,096"  # 2 clients x 2,048 bytes up per round
    assert cost["FLoRA"][-1] == "4" and cost["FLoRA"][-2] != "n/a"
    report = (out / "report" / "report.md").read_text()
    assert "8 finished cells." in report
    assert all(f"- `{cell}`: NotAvailableError:" in report for cell in BROKEN)


def test_rerun_skips_finished_cells_and_retries_failed_ones(grid, capsys):
    spec, out, _ = grid
    before = {cell: files_with_mtimes(out / cell) for cell in GOOD}
    capsys.readouterr()
    record = sweep("--config", str(spec), "--out", str(out))
    assert record["counts"] == {"skipped": 8, "failed": 4}
    assert {c["cell"]: c["action"] for c in record["cells"]} == {
        **dict.fromkeys(GOOD, "skip"),
        **dict.fromkeys(BROKEN, "run"),
    }
    assert {cell: files_with_mtimes(out / cell) for cell in GOOD} == before
    printed = capsys.readouterr().out
    assert f"[1/12] {GOOD[0].replace('FLoRA', 'Broken')} failed (NotAvailableError:" in printed
    best = summary(out, GOOD[0])["best_test_acc"]
    assert f"] {GOOD[0]} skipped (finished; best acc {best:.4f})" in printed
    assert "[sweep] 8 skipped, 4 failed in" in printed


def test_report_only_rebuilds_the_same_tables(grid):
    spec, out, _ = grid
    saved = {p.name: p.read_bytes() for p in (out / "report").iterdir() if p.suffix != ".png"}
    shutil.rmtree(out / "report")
    sweep("--config", str(spec), "--out", str(out), "--report_only")
    again = {p.name: p.read_bytes() for p in (out / "report").iterdir() if p.suffix != ".png"}
    assert again == saved
    # Without the spec: the same numbers, rows in sorted order, no row for Broken.
    shutil.rmtree(out / "report")
    sweep("--out", str(out), "--report_only")
    rows = table_rows(out / "report" / "results_iid.md")
    assert list(rows) == ["FLoRA", "FedLC"]
    assert rows["FLoRA"] == table_rows_from(saved["results_iid.md"])["FLoRA"]


def table_rows_from(content: bytes) -> dict[str, list[str]]:
    lines = [line for line in content.decode().splitlines() if line.startswith("| ")][2:]
    return {
        c[0]: c[1:] for c in ([x.strip() for x in line.strip("|").split("|")] for line in lines)
    }


def test_dry_run_lists_cells_and_writes_nothing(grid, tmp_path, capsys):
    spec, out, _ = grid
    before = files_with_mtimes(out)
    capsys.readouterr()
    record = sweep("--config", str(spec), "--out", str(out), "--dry_run")
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"[sweep] {spec}: 12 cells into {out}"
    assert printed[1] == "[1/12] digits/iid/Broken/seed0: run (failed)"
    assert f"[3/12] {GOOD[0]}: skip (finished)" in printed
    assert len(printed) == 13 and record["counts"] == {"planned": 12}
    assert files_with_mtimes(out) == before
    fresh = tmp_path / "fresh"
    sweep("--config", str(spec), "--out", str(fresh), "--dry_run", "--shard", "2/5")
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"[sweep] {spec}: 3 cells (shard 2/5: 3 of 12) into {fresh}"
    assert printed[1:] == [
        "[1/3] digits/iid/Broken/seed1: run (missing)",  # cells 1, 6, 11 of the sorted 12
        "[2/3] digits/pat16/Broken/seed0: run (missing)",
        "[3/3] digits/pat16/FedLC/seed1: run (missing)",
    ]
    assert not fresh.exists()


def test_shards_then_more_rounds_resume(tmp_path, offline_assets):
    """Two shards fill one OUT; raising trainer.rounds then resumes every finished cell."""
    spec = write_spec(
        tmp_path / "one.yaml",
        methods={"FedLC": str(CONFIGS / "quickstart_fedlc.yaml")},
        partitions={"iid": {"kind": "iid"}},
    )
    out = tmp_path / "out"
    first = sweep("--config", str(spec), "--out", str(out), "--shard", "1/2")
    assert [c["cell"] for c in first["cells"]] == ["digits/iid/FedLC/seed0"]
    assert (out / "sweep_shard1of2.json").is_file() and not (out / "sweep.json").exists()
    assert not (out / "digits/iid/FedLC/seed1").exists()
    assert table_rows(out / "report" / "results_iid.md")["FedLC"][0].count("±") == 0  # 1 seed
    sweep("--config", str(spec), "--out", str(out), "--shard", "2/2")
    assert "±" in table_rows(out / "report" / "results_iid.md")["FedLC"][0]
    short = {s: summary(out, f"digits/iid/FedLC/seed{s}") for s in (0, 1)}

    write_spec(  # trainer.rounds 1 -> 2
        spec,
        methods={"FedLC": str(CONFIGS / "quickstart_fedlc.yaml")},
        partitions={"iid": {"kind": "iid"}},
        overrides=["--trainer.rounds", "2", *FAST[2:]],
    )
    record = sweep("--config", str(spec), "--out", str(out))
    assert [c["action"] for c in record["cells"]] == ["resume", "resume"]
    assert record["counts"] == {"done": 2}
    for s in (0, 1):
        cell = out / f"digits/iid/FedLC/seed{s}"
        extended = summary(out, f"digits/iid/FedLC/seed{s}")
        assert [r["round"] for r in extended["rounds"]] == [0, 1, 2]
        assert extended["rounds"][:2] == short[s]["rounds"]  # rounds 0-1 kept, not re-run
        assert yaml.safe_load((cell / "config.resumed.yaml").read_text())["trainer"]["rounds"] == 2
    assert "over rounds 0..2" in (out / "report" / "results_iid.md").read_text()


def test_unfinished_cell_without_resume_state_starts_fresh(tmp_path, offline_assets):
    spec = write_spec(
        tmp_path / "one.yaml",
        methods={"FedLC": str(CONFIGS / "quickstart_fedlc.yaml")},
        partitions={"iid": {"kind": "iid"}},
        seeds=[0],
    )
    cell = tmp_path / "out" / "digits" / "iid" / "FedLC" / "seed0"
    cell.mkdir(parents=True)
    (cell / "summary.json").write_text('{"rounds": [{"round": 0}]}')  # the loop would refuse it
    (cell / "stale.txt").write_text("left by a killed run")
    record = sweep("--config", str(spec), "--out", str(tmp_path / "out"))
    assert [(c["state"], c["action"], c["status"]) for c in record["cells"]] == [
        ("incomplete", "run", "done")
    ]
    assert not (cell / "stale.txt").exists()
    rounds = summary(tmp_path / "out", "digits/iid/FedLC/seed0")["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shard", "3/2"], "flora: error: sweep --shard '3/2': expected i/n with 1 <= i <= n"),
        (["--shard", "0/2"], "flora: error: sweep --shard '0/2'"),
        (["--shard", "one/two"], "flora: error: sweep --shard 'one/two'"),
        ([], None),
    ],
)
def test_cli_rejects_bad_input_before_any_cell_runs(tmp_path, monkeypatch, capsys, args, message):
    spec = write_spec(
        tmp_path / "bad.yaml",
        partitions={"iid": {"kind": "iid"}, "bad": {"kind": "dirichlet", "beta": -1}},
    )
    if message is None:  # a valid shard: the invalid cells stop it
        message = (
            f"flora: error: {spec}: 6 of 12 cells do not validate; nothing was run:\n"
            "cell digits/bad/Broken/seed0 (datasets.digits, partitions.bad, methods.Broken, "
            "seed 0): data.partition.beta must be > 0 (got -1.0)"
        )
    argv = ["flora", "sweep", "--config", str(spec), "--out", str(tmp_path / "out"), *args]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(message)
    assert not (tmp_path / "out").exists()


def test_cli_needs_a_config_unless_report_only(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["flora", "sweep", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        cli.main()
    assert "flora: error: sweep --config is required" in capsys.readouterr().err
    monkeypatch.setattr(
        sys, "argv", ["flora", "sweep", "--out", str(tmp_path / "x"), "--report_only"]
    )
    with pytest.raises(SystemExit):
        cli.main()
    assert "does not exist; nothing to report" in capsys.readouterr().err


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["sweep", "--help"])
    out = capsys.readouterr().out
    for flag in ("--config", "--out", "--shard", "--dry_run", "--report_only", "1-based"):
        assert flag in out, flag


HOLD = (
    "import sys, time\n"
    "from flora_lightning.rundir.lock import RunDirLock\n"
    "RunDirLock(sys.argv[1]).acquire()\n"
    "print('held', flush=True)\n"
    "time.sleep(60)\n"
)


def test_a_cell_another_process_writes_is_left_alone(tmp_path, monkeypatch):
    """Neither cleared nor run: its folder's lock is held (another sweep or flora fit)."""
    import subprocess

    from flora_lightning import stages
    from flora_lightning.sweep.cells import Cell
    from flora_lightning.sweep.runner import run_cell

    cell = Cell("digits", "iid", "FedLC", 0)
    run_dir = cell.run_dir(tmp_path / "out")
    run_dir.mkdir(parents=True)
    (run_dir / "stale.txt").write_text("being written")  # incomplete: would be cleared
    monkeypatch.setattr(stages, "fit", lambda args: pytest.fail("the busy cell was run"))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        result = run_cell(None, cell, tmp_path / "out", rounds=1)
    finally:
        holder.kill()
        holder.wait()
    assert (result.state, result.action, result.status) == ("busy", "skip", "busy")
    assert f"process {holder.pid} on host" in result.error
    assert (run_dir / "stale.txt").read_text() == "being written"

"""``flora_lightning.sweep.report``: tables and plots from run directories alone."""

from __future__ import annotations

import csv
import statistics

import pytest
from fake_runs import fake_run

from flora_lightning.sweep import Table, build_report, collect, latex_escape, mean_std
from flora_lightning.sweep.plots import accuracy_curve

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def out(tmp_path):
    """Two datasets, one partition, three methods; FedFFT has one seed, FedAA none on b."""
    out = tmp_path / "sweep"
    dirichlet = {"kind": "dirichlet", "beta": 0.1, "num_clients": 5}
    for dataset, shift in (("a", 0.0), ("b", 0.1)):
        for seed, accs in enumerate(([0.5, 0.7, 0.6], [0.5, 0.8, 0.9])):
            fake_run(
                out / dataset / "dir0.1" / "FLoRA" / f"seed{seed}",
                [x + shift for x in accs],
                partition=dirichlet,
                peak=300 * 2**20,
                growth=(seed + 1) * 2**19,
            )
            fake_run(
                out / dataset / "dir0.1" / "FedLC" / f"seed{seed}",
                [x - 0.1 for x in accs],
                seconds=1.0,
                partition=dirichlet,
                peak=200 * 2**20,
            )
        fake_run(out / dataset / "dir0.1" / "FedFFT" / "seed0", [0.5, 0.95], partition=dirichlet)
    fake_run(out / "a" / "dir0.1" / "FedAA" / "seed0", [0.4, 0.5], partition=dirichlet)
    # Not counted: an interrupted cell, a failed one, unrelated folders.
    fake_run(out / "b" / "dir0.1" / "FedAA" / "seed0", [0.4, 0.99], rounds=5, final=False)
    (out / "b" / "dir0.1" / "FedAA" / "seed1").mkdir()
    (out / "b" / "dir0.1" / "FedAA" / "seed1" / "failed.json").write_text(
        '{"error_type": "RuntimeError", "message": "boom"}'
    )
    (out / "notes" / "x" / "y" / "seedling").mkdir(parents=True)
    return out


def rows(md: str) -> dict[str, list[str]]:
    """Table rows of a markdown file by their first column."""
    lines = [line for line in md.splitlines() if line.startswith("| ")][2:]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return {c[0]: c[1:] for c in cells}


def test_collect_counts_finished_cells_only(out):
    records = collect(out)
    assert len(records) == 11
    assert {(r.dataset, r.method, r.seed) for r in records if r.method == "FedAA"} == {
        ("a", "FedAA", 0)
    }


def test_accuracy_table(out):
    path = build_report(out, {"methods": ["FLoRA", "FedFFT", "FedLC", "FedAA", "FedVMLC"]})
    report = out / "report"
    md = (report / "results_dir0.1.md").read_text()
    assert md.startswith(
        "Partition `dir0.1` (dirichlet, beta=0.1, 5 clients): best test accuracy (%) over "
        "rounds 0..2, mean ± std over seeds (sample std)."
    )
    table = rows(md)
    assert list(table) == ["FLoRA", "FedFFT", "FedLC", "FedAA", "FedVMLC"]  # spec order first
    # FLoRA on a: best accs 0.7 and 0.9 -> 80.00 ± 14.14 (sample std).
    mean, std = statistics.fmean([0.7, 0.9]), statistics.stdev([0.7, 0.9])
    assert table["FLoRA"][0] == f"{100 * mean:.2f} ± {100 * std:.2f}" == "80.00 ± 14.14"
    assert table["FLoRA"][1] == "90.00 ± 14.14"
    assert table["FedLC"] == ["70.00 ± 14.14", "70.00 ± 14.14"]
    # One seed where the others have two: no std, marked; and it is the best mean (bold).
    assert table["FedFFT"] == ["**95.00 (n=1)**", "**95.00 (n=1)**"]
    assert table["FedAA"] == ["50.00 (n=1)", "–"]
    assert table["FedVMLC"] == ["–", "–"]

    with (report / "results_dir0.1.csv").open() as f:
        saved = {r["method"]: r for r in csv.DictReader(f)}
    assert float(saved["FLoRA"]["a_acc_mean"]) == pytest.approx(mean)
    assert float(saved["FLoRA"]["a_acc_std"]) == pytest.approx(std)
    assert saved["FLoRA"]["a_seeds"] == "2"
    assert saved["FedVMLC"]["b_acc_mean"] == "" and saved["FedVMLC"]["b_seeds"] == "0"

    tex = (report / "results_dir0.1.tex").read_text()
    assert "\\begin{tabular}{lrr}" in tex
    assert "method & a & b \\\\" in tex
    assert "FLoRA & 80.00 $\\pm$ 14.14 & 90.00 $\\pm$ 14.14 \\\\" in tex
    assert "FedFFT & \\textbf{95.00 (n=1)} & \\textbf{95.00 (n=1)} \\\\" in tex
    assert "FedVMLC & -- & -- \\\\" in tex

    text = path.read_text()
    assert "11 finished cells." in text
    assert "- `b/dir0.1/FedAA/seed1`: RuntimeError: boom" in text
    for name in ("accuracy_a_dir0.1.png", "accuracy_b_dir0.1.png"):
        assert (report / name).read_bytes()[:8] == PNG
        assert f"({name})" in text


def test_cost_table(out):
    build_report(out)
    # Sorted names without a spec; rows per dataset and method; FLoRA: rounds take 3 s and 4 s.
    header = (out / "report" / "cost.md").read_text().splitlines()[2]
    assert header == (
        "| dataset | method | trainable params | bytes/round/client (each way) | "
        "bytes up/round (all clients) | s/round | feature caching (s) | peak memory (MiB) | "
        "memory growth (MiB) | cells |"
    )
    lines = [r for r in (out / "report" / "cost.md").read_text().splitlines() if "| a |" in r]
    assert [line.split("|")[2].strip() for line in lines] == ["FLoRA", "FedAA", "FedFFT", "FedLC"]
    by_method = {
        line.split("|")[2].strip(): [c.strip() for c in line.split("|")[3:-1]] for line in lines
    }
    assert by_method["FLoRA"] == [
        "512",
        "2,048",
        "4,096",
        "3.50 ± 0.00",
        "0.50",
        "300",
        "1.0",  # the larger growth of its two seeds: 2 x 0.5 MiB
        "2",
    ]
    assert by_method["FedLC"][3:7] == ["2.50 ± 0.00", "0.50", "200", "0.0"]
    assert by_method["FedFFT"][3:] == ["3.00 ± 0.00", "0.50", "n/a", "n/a", "1"]
    with (out / "report" / "cost.csv").open() as f:
        saved = list(csv.DictReader(f))
    assert float(saved[0]["seconds_per_round"]) == pytest.approx(3.5)
    assert float(saved[0]["peak_memory_mib"]) == pytest.approx(300.0)
    assert float(saved[0]["memory_growth_mib"]) == pytest.approx(1.0)
    assert "cpu_peak_rss" in (out / "report" / "cost.md").read_text()


def test_report_is_regenerated_identically(out):
    build_report(out)
    first = {p.name: p.read_bytes() for p in (out / "report").iterdir() if p.suffix != ".png"}
    build_report(out)
    again = {p.name: p.read_bytes() for p in (out / "report").iterdir() if p.suffix != ".png"}
    assert again == first


def test_mean_std_and_curve():
    assert mean_std([0.5]) == (0.5, 0.0)
    assert mean_std([0.2, 0.4]) == pytest.approx((0.3, 0.1414213562))
    rounds, mean, std = accuracy_curve(
        [{"rounds": [{"round": 0, "test_acc": 0.2}, {"round": 1, "test_acc": 0.6}]},
         {"rounds": [{"round": 0, "test_acc": 0.4}, {"round": 1, "test_acc": 0.8},
                     {"round": 2, "test_acc": 0.9}]}]
    )  # fmt: skip
    assert rounds.tolist() == [0, 1]  # only the rounds every run reached
    assert mean.tolist() == pytest.approx([0.3, 0.7])
    assert std.tolist() == pytest.approx([0.1414213562] * 2)


def test_latex_escape():
    assert latex_escape("dir_0.1 & 50% ± 1 – #") == "dir\\_0.1 \\& 50\\% $\\pm$ 1 -- \\#"
    table = Table("t\nsecond", ["a_b", "c"], [["x", "1"]], bold={(0, 1)})
    assert table.latex().splitlines()[:3] == ["% t", "% second", "\\begin{tabular}{lr}"]
    assert "x & \\textbf{1} \\\\" in table.latex()
    assert table.markdown().splitlines()[-1] == "| x | **1** |"


def test_report_without_matplotlib_writes_the_tables_and_says_why_no_plots(out, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    text = build_report(out).read_text()
    assert "Plots skipped: " in text and "flora-lightning[plots]" in text
    assert not list((out / "report").glob("*.png"))
    assert (out / "report" / "cost.csv").exists()

"""A real federation on loopback: three SuperNodes, each with its own imagefolder, and a ServerApp
that holds no training data (run config ``node-data = true``).

The sites are disjoint subsets of the digits written as imagefolders
(:func:`~flora_lightning.offline.site_folders.write_site_folders`). Every process runs under
an audit hook (``sitecustomize`` on its ``PYTHONPATH``) that logs each file it opens below the
sites' folder, so the test sees what each process read: the ServerApp no site file (the test
set folder only), node ``i`` only files of its own site. The final adapters equal ``flora fit``
with ``data.partition.kind: folders`` over the same folders (the deployment's YAML names none) (1e-6: float32 arrays travel exactly
and both sides aggregate in the same float64 order, as tests/flower/test_deployment.py), and
the federated evaluation (each node on its own local test rows) equals flora fit's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_deployment import QUICKSTART, federation, flower_env, flwr  # noqa: F401 (fixture)

from flora_lightning import cli
from flora_lightning.flower.server_data import NOT_SHARED
from flora_lightning.offline.site_folders import write_site_folders

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
ROUNDS = 2
CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

AUDIT = """
import os, sys
_log, _root = os.environ.get("FLORA_AUDIT_LOG"), os.environ.get("FLORA_AUDIT_ROOT")
if _log and _root:
    def _hook(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.path.abspath(os.fsdecode(args[0]))
            if path.startswith(_root):
                with open(_log, "a") as out:
                    out.write(path + "\\n")
    sys.addaudithook(_hook)
"""


def overlays(tmp: Path, sites: list[Path], test: Path) -> tuple[Path, Path]:
    """The deployment's YAML (added to the quickstart; it names no site folder) and the
    rehearsal's (the sites' folders as kind: folders, for flora fit and the simulation)."""
    deployment, rehearsal = tmp / "sites.yaml", tmp / "rehearsal.yaml"
    deployment.write_text(
        f"data:\n  class_names: [{', '.join(CLASSES)}]\n  test_dataset: {test}\n"
        "  max_test_samples: 64\n  local_test_fraction: 0.25\n"
        f"  partition:\n    num_clients: {len(sites)}\n"
        "trainer:\n  max_local_steps: 2\n  callbacks:\n"
        "    - class_path: flora_lightning.callbacks.FederatedEvaluation\n"
    )
    dirs = ", ".join(str(s) for s in sites)
    rehearsal.write_text(f"data:\n  partition:\n    kind: folders\n    client_dirs: [{dirs}]\n")
    return deployment, rehearsal


def audited(env: dict, tmp: Path, name: str, root: Path) -> dict:
    hook = tmp / "audit"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(AUDIT)
    return {
        **env,
        "PYTHONPATH": f"{hook}:{env['PYTHONPATH']}",
        "FLORA_AUDIT_LOG": str(tmp / f"opened_{name}.txt"),
        "FLORA_AUDIT_ROOT": str(root),
    }


def opened(tmp: Path, name: str) -> set[str]:
    log = tmp / f"opened_{name}.txt"
    return set(log.read_text().split()) if log.exists() else set()


def test_three_sites_keep_their_data_and_equal_flora_fit(tmp_path, flower_env):  # noqa: F811
    root = tmp_path / "sites"
    sites = write_site_folders(root, 3, seed=0, max_per_site=60)
    yaml, rehearsal = overlays(tmp_path, sites, root / "test")
    reference = tmp_path / "in_process"
    cli.run(["fit", "--config", str(QUICKSTART), "--config", str(yaml), "--config", str(rehearsal),
             "--trainer.rounds", str(ROUNDS), "--trainer.default_root_dir", str(reference),
             "--trainer.progress", "false"])  # fmt: skip

    configs = [
        f'data-path="{sites[i]}" client-id={i} share-label-counts={"true" if i < 2 else "false"}'
        for i in range(3)
    ]
    envs = {"superlink": audited(flower_env, tmp_path, "server", root)}
    for i in range(3):
        envs[f"supernode{i}"] = audited(flower_env, tmp_path, f"node{i}", root)
    out = tmp_path / "flower_run"
    run_config = (
        f'config="{QUICKSTART}" out-dir="{out}" num-server-rounds={ROUNDS} '
        f'overrides="--config {yaml}" node-data=true'
    )
    with federation(tmp_path, flower_env, num_nodes=3, node_configs=configs, envs=envs):
        result = flwr(flower_env, "run", str(REPO / "flower_app"), "--stream",
                      "--run-config", run_config, cwd=tmp_path)  # fmt: skip
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("*.log")))
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}\n{logs}"

    # who read what: the server no site file, each node its own site only
    site_files = {i: {str(p) for p in sites[i].rglob("*.png")} for i in range(3)}
    server = opened(tmp_path, "server")
    assert not server & set().union(*site_files.values())
    for i in range(3):
        read = opened(tmp_path, f"node{i}")
        assert read & site_files[i]  # the hook works: the node read its images
        others = set().union(*(site_files[j] for j in range(3) if j != i))
        assert not read & others

    adapter = load_file(out / "final" / "adapter_model.safetensors")
    expected = load_file(reference / "final" / "adapter_model.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(adapter[name], tensor, rtol=0, atol=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    ref = json.loads((reference / "summary.json").read_text())
    for record, ref_record in zip(summary["rounds"][1:], ref["rounds"][1:], strict=True):
        assert record["federated_test_clients"] == ref_record["federated_test_clients"] == [0, 1, 2]
        for key in ("federated_test_acc", "federated_test_loss", "test_acc"):
            assert record[key] == pytest.approx(ref_record[key], abs=1e-6), key
        assert record["federated_test_samples"] == ref_record["federated_test_samples"] > 0
    assert summary["federated_test_acc"] == pytest.approx(ref["federated_test_acc"], abs=1e-6)

    # the label table shows what the nodes shared; counted here from the files themselves
    table = (out / "label_table.txt").read_text().splitlines()
    rows = {line.split()[0]: line for line in table[1:]}
    assert NOT_SHARED in rows["2"]
    for i in range(2):
        cells = rows[str(i)].split()
        files = [len(list((sites[i] / c).glob("*.png"))) for c in CLASSES]
        trained = int(cells[1])
        assert trained < sum(files)  # the local test share stays out of the training count
        assert sum(int(c) for c in cells[2:]) == trained


def test_a_node_with_a_bad_folder_fails_its_rounds_and_the_run_goes_on(tmp_path, flower_env):  # noqa: F811
    root = tmp_path / "sites"
    sites = write_site_folders(root, 3, seed=1, max_per_site=30)
    (sites[2] / "eleven").mkdir()  # a class the run does not know
    (sites[2] / "zero").rename(sites[2] / "eleven" / "zero_moved")
    for image in (sites[2] / "eleven" / "zero_moved").glob("*.png"):
        image.rename(sites[2] / "eleven" / image.name)
    yaml, rehearsal = overlays(tmp_path, sites, root / "test")
    out = tmp_path / "flower_run"
    run_config = (
        f'config="{QUICKSTART}" out-dir="{out}" num-server-rounds={ROUNDS} '
        f'overrides="--config {yaml} --config {rehearsal}" node-data=true'
    )
    with federation(tmp_path, flower_env, num_nodes=3, simulation=True):
        result = flwr(flower_env, "run", str(REPO / "flower_app"), "--stream",
                      "--run-config", run_config, cwd=tmp_path)  # fmt: skip
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("*.log")))
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}\n{logs}"
    summary = json.loads((out / "summary.json").read_text())
    for record in summary["rounds"][1:]:
        assert record["accepted_clients"] == [0, 1]
        reason = record["rejected_clients"]["2"]
        assert str(sites[2]) in reason and "eleven" in reason

"""Config errors are reported before the heavy libraries are imported (issue 22 part 4).

Each case runs ``flora`` in a fresh interpreter and counts imports, not seconds: after the
error, none of torch, transformers, peft, datasets, lightning, flwr or opacus may be in
``sys.modules``, the exit code is 2 and the one-line message names the field and the fix.
The expected messages are written out by hand from what the full parser prints for the same
mistake (saved before this change in the session notes), so the early check must word its
errors as the full parser does.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
HEAVY = ("torch", "transformers", "peft", "datasets", "lightning", "flwr", "opacus")
PROBE = f"""
import json, sys
from flora_lightning import cli
sys.argv = ["flora", *json.loads(sys.argv[1])]
code = 0
try:
    cli.main()
except SystemExit as exit_info:
    code = exit_info.code
print(json.dumps([code, [m for m in {HEAVY!r} if m in sys.modules]]))
"""


def flora(args: list[str], cwd: Path) -> tuple[int, list[str], str]:
    """``flora ARGS`` in a fresh interpreter: (exit code, heavy modules imported, stderr)."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    code, heavy = json.loads(done.stdout.strip().splitlines()[-1])
    return code, heavy, done.stderr


def write(tmp: Path, name: str, text: str) -> str:
    (tmp / name).write_text(text)
    return str(tmp / name)


FIT = ["fit", "--config", QUICKSTART]
CASES = [
    # (id, args (tmp -> list), expected message (tmp -> str))
    ("unknown-field-cli",
     lambda tmp: [*FIT, "--trainer.rouns", "3"],
     lambda tmp: "unrecognized arguments: --trainer.rouns 3; did you mean --trainer.rounds?"),
    ("unknown-field-yaml",
     lambda tmp: [*FIT, "--config", write(tmp, "c.yaml", "trainer:\n  rouns: 3\n")],
     lambda tmp: "Subcommand 'fit' does not accept option 'trainer.rouns'; did you mean "
     "trainer.rounds?"),
    ("unknown-nested-field",
     lambda tmp: [*FIT, "--data.partition.numclients", "5"],
     lambda tmp: "unrecognized arguments: --data.partition.numclients 5; did you mean "
     "--data.partition.num_clients?"),
    ("wrong-type-cli",
     lambda tmp: [*FIT, "--trainer.rounds", "many"],
     lambda tmp: "Parser key \"trainer.rounds\": Expected a <class 'int'>. Got value: many"),
    ("wrong-type-yaml",
     lambda tmp: [*FIT, "--config", write(tmp, "c.yaml", "data:\n  batch_size: big\n")],
     lambda tmp: "Parser key \"data.batch_size\": Expected a <class 'int'>. Got value: big"),
    ("negative-rounds",
     lambda tmp: [*FIT, "--trainer.rounds", "-1"],
     lambda tmp: "trainer.rounds must be >= 0 (got -1)."),
    ("fraction-above-1",
     lambda tmp: [*FIT, "--trainer.join_ratio", "1.5"],
     lambda tmp: "trainer.join_ratio must be in (0, 1] (got 1.5); 1.0 means every client "
     "joins every round."),
    ("data-fraction-above-1",
     lambda tmp: [*FIT, "--data.test_fraction", "1.5"],
     lambda tmp: "data.test_fraction must be in (0, 1) (got 1.5)."),
    ("dataclass-range",
     lambda tmp: [*FIT, "--data.partition.beta", "-1"],
     lambda tmp: "data.partition.beta must be > 0 (got -1.0); use e.g. 0.1 for strong "
     "non-IID or 1.0 for mild"),
    ("tier-shares",
     lambda tmp: [*FIT, "--config", write(
         tmp, "c.yaml", "trainer:\n  client_ranks: [{rank: 2, share: 0.5}]\n")],
     lambda tmp: "trainer.client_ranks: the tiers' shares must sum to 1 (got 0.5)"),
    ("literal-choice",
     lambda tmp: [*FIT, "--trainer.precision", "16"],
     lambda tmp: "Parser key \"trainer.precision\": Expected a typing.Literal['32-true', "
     "'16-mixed', 'bf16-mixed']. Got value: 16"),
    ("literal-choice-nested",
     lambda tmp: [*FIT, "--data.partition.kind", "dirichle"],
     lambda tmp: "Parser key \"data.partition.kind\": Expected a typing.Literal['iid', "
     "'dirichlet', 'pathological', 'fewshot', 'folders']. Got value: dirichle"),
    ("literal-choice-privacy",
     lambda tmp: [*FIT, "--privacy.level", "sampel"],
     lambda tmp: "Parser key \"privacy.level\": Expected a typing.Literal['none', 'sample', "
     "'client']. Got value: sampel"),
    ("missing-config-file",
     lambda tmp: ["fit", "--config", str(tmp / "nope.yaml")],
     lambda tmp: f"--config {tmp / 'nope.yaml'}: no such file"),
    ("missing-checkpoint",
     lambda tmp: ["validate", "--config", QUICKSTART, "--ckpt_path", str(tmp / "r.safetensors")],
     lambda tmp: f"--ckpt_path {tmp / 'r.safetensors'}: no such file"),
    ("missing-image-folder",
     lambda tmp: [*FIT, "--data.dataset", "imagefolder", "--data.data_dir", str(tmp / "imgs")],
     lambda tmp: f"data.data_dir={tmp / 'imgs'}: no such folder"),
    ("unknown-method-short",
     lambda tmp: [*FIT, "--model", "FLora"],
     lambda tmp: "model: unknown method class 'FLora'; did you mean FLoRA? Choose one of "
     "FLoRA, FedAA, FedFFT, FedLC, FedVMLC"),
    ("unknown-method-path",
     lambda tmp: [*FIT, "--config", write(
         tmp, "c.yaml", "model:\n  class_path: flora_lightning.methods.FLora\n")],
     lambda tmp: "model: unknown method class 'flora_lightning.methods.FLora'; did you mean "
     "flora_lightning.methods.FLoRA?"),
    ("unknown-strategy",
     lambda tmp: [*FIT, "--trainer.strategy", "FedAdamm"],
     lambda tmp: "trainer.strategy: unknown strategy class 'FedAdamm'; did you mean FedAdam?"),
    ("unknown-strategy-path",
     lambda tmp: [*FIT, "--trainer.strategy.class_path", "flora_lightning.strategy.FedAdamm"],
     lambda tmp: "trainer.strategy: unknown strategy class 'flora_lightning.strategy.FedAdamm'"
     "; did you mean flora_lightning.strategy.FedAdam?"),
    ("unknown-method-setting",
     lambda tmp: [*FIT, "--config", write(tmp, "c.yaml", "model:\n  init_args:\n    lora:\n      rnak: 4\n")],
     lambda tmp: "Parser key \"model\": Problem with given class_path "
     "'flora_lightning.methods.FLoRA': Group 'lora' does not accept option 'rnak'"),
    ("setting-of-another-method",
     lambda tmp: [*FIT, "--model", "FedFFT", "--model.lora.rank", "3"],
     lambda tmp: "Parser key \"model\": Problem with given class_path "
     "'flora_lightning.methods.FedFFT': unrecognized arguments: --lora.rank=3"),
    ("method-setting-range",
     lambda tmp: [*FIT, "--model.init_args.lora.rank", "0"],
     lambda tmp: "model.lora.rank must be >= 1 (got 0); the paper uses 2."),
    ("method-setting-range-yaml",
     lambda tmp: [*FIT, "--config", write(
         tmp, "c.yaml", "model:\n  init_args:\n    optimizer:\n      lr: -0.001\n")],
     lambda tmp: "model.optimizer.lr must be > 0 (got -0.001); e.g. 5e-5."),
    # NaN and infinity (YAML .nan/.inf, CLI 1e400) passed the range checks (issue 25)
    ("method-setting-nan-yaml",
     lambda tmp: [*FIT, "--config", write(
         tmp, "c.yaml", "model:\n  init_args:\n    optimizer:\n      eps: .nan\n")],
     lambda tmp: "model.optimizer.eps must be a finite number (got nan); e.g. 1e-06 (the "
     "default)."),
    ("method-setting-inf-cli",
     lambda tmp: [*FIT, "--model.optimizer.lr", "1e400"],
     lambda tmp: "model.optimizer.lr must be a finite number (got inf); e.g. 5e-05 (the "
     "default)."),
    ("lora-alpha-nan",
     lambda tmp: [*FIT, "--model.lora.alpha", ".nan"],
     lambda tmp: "model.lora.alpha must be a finite number (got nan); e.g. null (the default)."),
    ("privacy-inf",
     lambda tmp: [*FIT, "--privacy.clip_norm", ".inf"],
     lambda tmp: "privacy.clip_norm must be a finite number (got inf); e.g. 1.0 (the default)."),
    ("method-literal-choice",
     lambda tmp: [*FIT, "--model.lora.tower", "txt"],
     lambda tmp: "Parser key \"model\": Problem with given class_path "
     "'flora_lightning.methods.FLoRA': Parser key \"lora.tower\": Expected a "
     "typing.Literal['text', 'vision', 'both']. Got value: txt"),
]  # fmt: skip


@pytest.mark.parametrize(("build", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_config_error_is_reported_before_the_heavy_imports(tmp_path, build, expected):
    code, heavy, err = flora(build(tmp_path), tmp_path)
    assert heavy == [], f"imported {heavy} before reporting:\n{err}"
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"flora: error: {expected(tmp_path)}"), lines[0]


def test_a_good_config_still_runs_the_full_parser(tmp_path):
    """The early check passes a good config on; the full parser then imports and checks the
    rest (here: an unknown strategy setting, which only the strategy's own signature knows)."""
    args = [*FIT, "--trainer.strategy", "FedProx", "--trainer.strategy.init_args.muu", "0.1"]
    code, heavy, err = flora(args, tmp_path)
    assert code == 2
    assert "torch" in heavy  # the full parser ran
    assert "muu" in err.strip().splitlines()[-1]

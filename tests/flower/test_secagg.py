"""Secure aggregation (Flower's SecAgg+) on the Flower path.

Fast: the run-config keys, the quantisation bound, the client handler's legacy layout, the
server strategy's record of what it is told, and the refusals. Slow (``run_simulation``, 3
virtual SuperNodes, one round of FLoRA on the offline tiny CLIP, one local step each): the
SecAgg+ global adapter equals ``flora fit``'s within the quantisation bound of
:func:`~flora_lightning.flower.secagg_config.quantisation_bound`, and a client that fails in
the *collect masked vectors* stage (after key sharing: a mid-round dropout) leaves a round
that still completes, with the other two clients' weighted mean.

The bound, for the defaults ``c = 8``, ``Q = 2**22`` and ``w_max`` = the largest partition:
each of the ``K`` clients' values is off by less than one step ``2c/Q ~= 3.8e-6`` before the
division by ``sum_k n_k / w_max`` (~2.9 for 3 similar partitions), so about ``4e-6``;
float32 storage adds two ulps of the largest value.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import (  # noqa: E402
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    RecordDict,
)
from flwr.client.mod import secaggplus_mod  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.common import (  # noqa: E402
    Code,
    FitIns,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common import recorddict_compat as compat  # noqa: E402
from flwr.server.workflow import SecAggPlusWorkflow  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from flora_lightning import cli  # noqa: E402
from flora_lightning.federation.engine import RoundEngine, RoundFailedError  # noqa: E402
from flora_lightning.flower.app_config import FlowerRunConfig, build_components  # noqa: E402
from flora_lightning.flower.client_app import client_components, fit_message  # noqa: E402
from flora_lightning.flower.secagg_client import (  # noqa: E402
    CLEAR_METRICS,
    run_config_of,
    secagg_fit,
)
from flora_lightning.flower.secagg_config import (  # noqa: E402
    SecAggConfig,
    quantisation_bound,
    split_run_config,
)
from flora_lightning.flower.secagg_server import (  # noqa: E402
    SecAggFedAvg,
    check_supported,
    make_secagg_server_app,
    masked_bytes,
    serve,
)
from flora_lightning.flower.server_strategy import to_state  # noqa: E402
from flora_lightning.rundir.round_record import RoundTally  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
OVERRIDES = "--data.partition.num_clients 3 --trainer.max_local_steps 1"
NODE = 7
ROUND_1 = Path("checkpoints") / "round_001.safetensors"
"""The global trainable state after round 1, by communicated-tensor name."""
F32_EPS = float(torch.finfo(torch.float32).eps)


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages are stamped with the run/task of the process; a test has to pretend one."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", NODE)):
        monkeypatch.setattr(TaskIdentity, name, value)


# ------------------------------------------------------------------ config and bound
def test_secagg_keys_are_split_from_the_flora_keys_and_checked():
    run_config = {"config": "c.yaml", "secagg-max-weight": 500.0, "secagg_timeout": 9.0}
    flora, secagg = split_run_config(run_config)
    assert flora == {"config": "c.yaml"}
    config = SecAggConfig.from_run_config(secagg)
    assert (config.max_weight, config.timeout, config.num_shares) == (500.0, 9.0, 1.0)
    with pytest.raises(ValueError, match="unknown run-config key 'secagg-shares'.*secagg-num"):
        SecAggConfig.from_run_config({"secagg-shares": 3})
    with pytest.raises(ValueError, match="secagg-max-weight must be >= 0"):
        SecAggConfig(max_weight=-1.0)
    with pytest.raises(ValueError, match="secagg-clipping-range must be > 0"):
        SecAggConfig(clipping_range=0.0)
    with pytest.raises(ValueError, match="num_shares` as an integer must be greater than 2.*"
                       "secagg-num-shares"):  # fmt: skip
        SecAggConfig(num_shares=2)
    with pytest.raises(ValueError, match="modulus_range` must be a power of 2"):
        SecAggConfig(modulus_range=3 * 2**22)
    context = Context(run_id=1, node_id=NODE, node_config={}, state=RecordDict(),
                      run_config={"secagg-max-weight": 5.0})  # fmt: skip
    assert run_config_of(context, {"overrides": "x"}) == FlowerRunConfig(overrides="x")


def test_quantisation_bound_holds_for_flowers_quantiser():
    """Flower's own quantise → sum → dequantise (the masks cancel exactly modulo 2**32):
    the error stays below the bound, which is not loose by orders of magnitude."""
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    config = SecAggConfig(max_weight=100.0, quantization_range=2**12)  # coarse: visible error
    rng = np.random.default_rng(0)
    counts = [37, 100, 64]
    updates = [rng.normal(0, 0.5, size=4000) for _ in counts]
    q = config.quantization_range
    ratios = [round(q * n / config.max_weight) for n in counts]
    total = sum(
        quantize([u * r / q], config.clipping_range, q)[0].astype(np.int64)
        for u, r in zip(updates, ratios, strict=True)
    )
    summed = dequantize([total], config.clipping_range, q)[0]
    summed -= (len(counts) - 1) * config.clipping_range  # the workflow's offset
    secagg = summed * q / sum(ratios)
    exact = sum(n * u for n, u in zip(counts, updates, strict=True)) / sum(counts)
    spread = max(np.abs(u - exact).max() for u in updates)
    bound = quantisation_bound(config, counts, spread)
    error = np.abs(secagg - exact).max()
    assert error < bound < 10 * error


# -------------------------------------------------------------------- client handler
RUN = FlowerRunConfig(config=str(QUICKSTART), overrides=OVERRIDES)


def node_context() -> Context:
    return Context(
        run_id=1,
        node_id=NODE,
        node_config={"partition-id": 0, "num-partitions": 3},
        state=RecordDict(),
        run_config={},
    )


def test_client_handler_speaks_the_mods_layout_and_trains_like_the_plain_client(
    offline_assets,
):
    start = client_components(RUN, node_context()).model.communicated_state()
    fitins = FitIns(
        ndarrays_to_parameters([t.numpy() for t in start.values()]), {"server-round": 1}
    )
    request = Message(
        compat.fitins_to_recorddict(fitins, keep_input=True),
        dst_node_id=NODE,
        message_type=MessageType.TRAIN,
    )
    reply = compat.recorddict_to_fitres(secagg_fit(request, node_context(), RUN).content, True)
    plain_request = Message(
        RecordDict({"arrays": ArrayRecord(start), "config": ConfigRecord({"server-round": 1})}),
        dst_node_id=NODE,
        message_type=MessageType.TRAIN,
    )
    plain = fit_message(plain_request, node_context(), RUN).content
    expected = to_state(plain["arrays"])
    got = parameters_to_ndarrays(reply.parameters)
    assert len(got) == len(expected)
    for array, (name, tensor) in zip(got, expected.items(), strict=True):
        torch.testing.assert_close(torch.from_numpy(array), tensor, rtol=0, atol=0, msg=name)
    assert reply.num_examples == plain["metrics"]["num-examples"] > 0
    assert set(reply.metrics) == set(CLEAR_METRICS)  # the training loss stays on the node
    assert reply.metrics["partition-id"] == 0


# --------------------------------------------------------------------- server strategy
class StubLoop(RoundEngine):
    """A bare round engine with the loop surface :class:`SecAggFedAvg` uses, and a two-tensor
    model."""

    join_ratio = 1.0

    def __init__(self, on_too_few_updates: str = "skip") -> None:
        super().__init__(on_too_few_updates)
        self.state = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
        self.model = self
        self.rounds: list[int] = []

    def communicated_state(self) -> dict[str, torch.Tensor]:
        return self.state

    def clients_per_round(self, num_clients: int) -> int:
        return num_clients

    def begin_round(self, round_: int, clients: list[int]) -> RoundTally:
        self.rounds.append(round_)
        return super().begin_round(round_, clients)


class Manager:  # Flower's client manager, as far as FedAvg.configure_fit asks
    def num_available(self):
        return 3

    def wait_for(self, *_):
        return True

    def sample(self, num_clients, min_num_clients=None, criterion=None):
        return [object()] * num_clients


def fit_result(mean: list[np.ndarray], client: int, n: int) -> tuple[None, FitRes]:
    metrics = {"partition-id": client, "train-seconds": 0.5}
    return None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(mean), n, metrics)


def test_server_strategy_records_only_what_secagg_tells_it():
    loop = StubLoop()
    strategy = SecAggFedAvg(loop, ["a", "b"], num_clients=3, min_clients=2)
    mean = [np.full((2, 3), 0.25), np.arange(4.0)]  # the unmasked mean, float64
    params = ndarrays_to_parameters([np.zeros((2, 3), np.float32), np.zeros(4, np.float32)])

    instructions = strategy.configure_fit(1, params, Manager())
    assert len(instructions) == 3 and instructions[0][1].config == {"server-round": 1}
    tally = strategy.reports[1]
    assert loop.rounds == [1] and tally.clients == [0, 1, 2]
    assert tally.bytes_down == 3 * (6 + 4) * 4
    dropped = Exception("node 9 failed")
    aggregate, metrics = strategy.aggregate_fit(
        1, [fit_result(mean, 2, 30), fit_result(mean, 0, 10)], [dropped, dropped]
    )
    arrays = parameters_to_ndarrays(aggregate)
    assert [a.dtype for a in arrays] == [np.float32, np.float32]  # the model's dtype
    np.testing.assert_array_equal(arrays[1], np.arange(4.0, dtype=np.float32))
    assert tally.accepted == [0, 2] and tally.aggregated
    assert tally.rejected == {"failure 0": "node 9 failed"}  # repeated failures once
    assert tally.client_bytes_up == {0: 8 * 11, 2: 8 * 11}  # int64 masks + the factor
    assert tally.bytes_up == 2 * 8 * 11 == 2 * masked_bytes(params)
    assert tally.train_loss == {}  # never sent
    assert metrics == {"num-accepted": 2, "num-failures": 2}
    strategy.configure_fit(2, params, Manager())
    aggregate, _ = strategy.aggregate_fit(2, [fit_result(mean, 1, 10)], [dropped])
    assert aggregate is None and not strategy.reports[2].aggregated  # fewer than min_clients


def test_too_few_in_the_sum_raises_by_default_as_flora_fit():
    """``trainer.on_too_few_updates`` (default raise) holds on the SecAgg+ server too; it used
    to log and go on."""
    strategy = SecAggFedAvg(StubLoop("raise"), ["a", "b"], num_clients=3, min_clients=2)
    params = ndarrays_to_parameters([np.zeros((2, 3), np.float32), np.zeros(4, np.float32)])
    strategy.configure_fit(1, params, Manager())
    mean = [np.full((2, 3), 0.25), np.arange(4.0)]
    with pytest.raises(RoundFailedError, match="round 1: 1 client update"):
        strategy.aggregate_fit(1, [fit_result(mean, 1, 10)], [Exception("node 9 failed")])
    tally = strategy.reports[1]
    assert tally.accepted == [1] and not tally.aggregated
    assert tally.rejected == {"failure 0": "node 9 failed"}


def test_round_offset_numbers_rounds_as_the_run_does():
    """A resumed SecAgg+ run: Flower counts from 1 again; the clients' seeds (server-round),
    the tallies and the records use the run's rounds."""
    loop = StubLoop()
    strategy = SecAggFedAvg(loop, ["a", "b"], num_clients=3, min_clients=1, round_offset=2)
    params = ndarrays_to_parameters([np.zeros((2, 3), np.float32), np.zeros(4, np.float32)])
    instructions = strategy.configure_fit(1, params, Manager())
    assert instructions[0][1].config == {"server-round": 3} and loop.rounds == [3]
    strategy.aggregate_fit(1, [fit_result([np.zeros((2, 3)), np.zeros(4)], 0, 10)], [])
    assert set(strategy.reports) == {3} and strategy.reports[3].accepted == [0]
    assert strategy.evaluate(0, params) is None  # round 0: evaluated by the run sequence


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ("--trainer.strategy LoraProductAverage", "trainer.strategy=LoraProductAverage"),
        (
            "--privacy.level client --privacy.noise_multiplier 1.0",
            "privacy.level=client clips each update on the server",
        ),
        ("--trainer.join_ratio 0.4", "SecAgg\\+ needs at least 2 clients per round"),
    ],
)
def test_what_secagg_cannot_aggregate_is_refused(offline_assets, overrides, message):
    run = FlowerRunConfig(config=str(QUICKSTART), overrides=f"{OVERRIDES} {overrides}")
    parts = build_components(run)
    with pytest.raises(ValueError, match=message):
        check_supported(parts.loop, parts.data.num_clients)


def test_a_max_weight_below_the_largest_partition_is_refused(offline_assets, tmp_path):
    run = FlowerRunConfig(config=str(QUICKSTART), out_dir=str(tmp_path), overrides=OVERRIDES)
    with pytest.raises(ValueError, match="secagg-max-weight=10.0 is below the largest partition"):
        serve(None, None, run, SecAggConfig(max_weight=10.0))  # fails before any message


class ScriptedWorkflow:
    """Stands in for Flower's ``DefaultWorkflow`` with SecAgg+: drives the server strategy as
    the workflow does (initial parameters, evaluate(0), then per round configure_fit → the
    unmasked mean → aggregate_fit → evaluate), the clients' "mean" a fixed function of the
    parameters sent and the round they were told."""

    told: list[int] = []
    """The ``server-round`` of each round's train config (the clients' seeds)."""

    def __init__(self, fit_workflow=None) -> None:
        pass

    def __call__(self, grid, legacy) -> None:
        strategy = legacy.strategy
        params = strategy.initialize_parameters(Manager())
        strategy.evaluate(0, params)
        for server_round in range(1, legacy.config.num_rounds + 1):
            instructions = strategy.configure_fit(server_round, params, Manager())
            told = int(instructions[0][1].config["server-round"])
            ScriptedWorkflow.told.append(told)
            mean = [a + 1e-3 * told for a in parameters_to_ndarrays(params)]
            results = [fit_result(mean, client, 10) for client in range(3)]
            params, _ = strategy.aggregate_fit(server_round, results, [])
            strategy.evaluate(server_round, params)


def test_a_resumed_secagg_run_ends_as_an_uninterrupted_one(offline_assets, tmp_path, monkeypatch):
    """The SecAgg+ ServerApp runs the shared run sequence: with resume it restores the last
    complete round and continues, the clients told the run's rounds (their seeds)."""
    from flora_lightning.flower import secagg_server

    monkeypatch.setattr(secagg_server, "DefaultWorkflow", ScriptedWorkflow)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})

    def run(out_dir: Path, rounds: int, resume: bool = False) -> tuple[dict, list[int]]:
        ScriptedWorkflow.told = []
        config = FlowerRunConfig(config=str(QUICKSTART), out_dir=str(out_dir),
                                 num_server_rounds=rounds, resume=resume,
                                 overrides=OVERRIDES)  # fmt: skip
        return serve(None, context, config, SecAggConfig()), ScriptedWorkflow.told

    full, told = run(tmp_path / "full", 3)
    assert told == [1, 2, 3]
    run(tmp_path / "cut", 2)
    resumed, told = run(tmp_path / "cut", 3, resume=True)
    assert told == [3]  # restored after round 2: only round 3 trains, told its run round
    assert [r["round"] for r in resumed["rounds"]] == [0, 1, 2, 3]
    assert [r["test_acc"] for r in resumed["rounds"]] == [r["test_acc"] for r in full["rounds"]]
    expected = load_file(tmp_path / "full" / "checkpoints" / "round_003.safetensors")
    got = load_file(tmp_path / "cut" / "checkpoints" / "round_003.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0)


def test_secagg_workflow_refuses_a_plain_context():
    """Why the Message-API strategy cannot host SecAgg+ in flwr 1.42 (hence the legacy app)."""
    workflow = SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=0.5)
    with pytest.raises(TypeError, match="Expect a LegacyContext, but get Context"):
        workflow(None, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                               run_config={}))  # fmt: skip


# ------------------------------------------------------------------------ simulations
def spy_client_app(defaults: dict, spy_dir: Path, fail_partition: int | None = None):
    """The SecAgg+ ClientApp that also saves each client's plaintext update (what the server
    must never see) for the test, and fails ``fail_partition`` after key sharing."""
    client = ClientApp(mods=[secaggplus_mod])

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        partition = int(context.node_config["partition-id"])
        if partition == fail_partition:
            raise RuntimeError(f"partition {partition} drops out mid-round")
        run = run_config_of(context, defaults)
        reply = secagg_fit(msg, context, run)
        fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
        names = list(client_components(run, context).model.communicated_state())
        arrays = parameters_to_ndarrays(fitres.parameters)
        tensors = {n: torch.from_numpy(np.array(a)) for n, a in zip(names, arrays, strict=True)}
        save_file(tensors, str(spy_dir / f"{partition}.safetensors"))
        (spy_dir / f"{partition}.json").write_text(json.dumps(fitres.num_examples))
        return reply

    return client


def simulate_secagg(out_dir: Path, spy_dir: Path, fail_partition=None, **secagg) -> dict:
    from flwr.simulation import run_simulation

    spy_dir.mkdir(parents=True)
    defaults = {
        "config": str(QUICKSTART),
        "out-dir": str(out_dir),
        "num-server-rounds": 1,
        "overrides": OVERRIDES,
        **secagg,
    }
    run_simulation(
        server_app=make_secagg_server_app(defaults),
        client_app=spy_client_app(defaults, spy_dir, fail_partition),
        num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    return json.loads((out_dir / "summary.json").read_text())


def client_updates(spy_dir: Path) -> dict[int, tuple[dict, int]]:
    """Partition -> (its plaintext update by tensor name, its num_examples)."""
    found = {}
    for path in spy_dir.glob("*.safetensors"):
        state = {name: t.double() for name, t in load_file(path).items()}
        found[int(path.stem)] = (state, json.loads(path.with_suffix(".json").read_text()))
    return found


def weighted_mean(updates: list[tuple[dict, int]]) -> dict[str, torch.Tensor]:
    total = sum(n for _, n in updates)
    return {name: sum(s[name] * n for s, n in updates) / total for name in updates[0][0]}


def assert_within_bound(adapter: dict, updates: list[tuple[dict, int]], config: SecAggConfig):
    exact = weighted_mean(updates)
    spread = max((s[k] - exact[k]).abs().max().item() for s, _ in updates for k in exact)
    bound = quantisation_bound(config, [n for _, n in updates], spread)
    largest = max(t.abs().max().item() for t in exact.values())
    tolerance = bound + 2 * F32_EPS * largest
    errors = {k: (adapter[k].double() - exact[k]).abs().max().item() for k in exact}
    assert max(errors.values()) <= tolerance, (errors, tolerance)
    assert max(errors.values()) > 0  # quantised: not the plain float sum
    return exact, tolerance


@pytest.mark.slow
def test_secagg_matches_flora_fit_within_the_quantisation_bound(tmp_path):
    summary = simulate_secagg(tmp_path / "secagg", tmp_path / "spy")
    reference = tmp_path / "flora_fit"
    cli.run(["fit", "--config", str(QUICKSTART), "--trainer.rounds", "1",
             "--trainer.default_root_dir", str(reference), "--trainer.progress", "false",
             *OVERRIDES.split()])  # fmt: skip
    expected = load_file(reference / ROUND_1)
    adapter = load_file(tmp_path / "secagg" / ROUND_1)
    assert set(adapter) == set(expected)
    updates = client_updates(tmp_path / "spy")
    assert sorted(updates) == [0, 1, 2]
    config = SecAggConfig(max_weight=max(n for _, n in updates.values()))  # the default
    exact, tolerance = assert_within_bound(adapter, list(updates.values()), config)
    for name, tensor in expected.items():  # the clients trained exactly as in flora fit
        torch.testing.assert_close(exact[name].float(), tensor, rtol=0, atol=1e-6)
        torch.testing.assert_close(adapter[name], tensor, rtol=0, atol=tolerance)
    record = summary["rounds"][1]
    assert record["accepted_clients"] == [0, 1, 2] and record["rejected_clients"] == {}
    per_value = sum(t.numel() for t in expected.values())
    assert record["bytes_up"] == 3 * 8 * (per_value + 1)  # masked int64 vectors
    assert record["client_train_loss"] == {}  # losses never left the nodes


@pytest.mark.slow
def test_secagg_survives_a_client_dropping_out_mid_round(tmp_path):
    """Partition 1 fails after key sharing; the others' masks still cancel (its pairwise masks
    are rebuilt from the shares of its 2 live neighbours, the reconstruction threshold)."""
    summary = simulate_secagg(
        tmp_path / "secagg", tmp_path / "spy", fail_partition=1, **{"secagg-max-weight": 1000.0}
    )
    adapter = load_file(tmp_path / "secagg" / ROUND_1)
    updates = client_updates(tmp_path / "spy")
    assert sorted(updates) == [0, 2]  # partition 1 never finished its fit
    assert all(n <= 1000 for _, n in updates.values())  # max_weight above every partition
    assert_within_bound(adapter, list(updates.values()), SecAggConfig(max_weight=1000.0))
    record = summary["rounds"][1]
    assert record["accepted_clients"] == [0, 2]
    assert len(record["rejected_clients"]) == 1
    assert "partition 1 drops out mid-round" in next(iter(record["rejected_clients"].values()))


@pytest.fixture
def flower_env(tmp_path, offline_assets) -> dict:
    """The environment of the Flower processes (as in ``test_deployment.py``)."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "FLWR_HOME": str(tmp_path / "flwr_home"),
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }


@pytest.mark.slow
def test_flwr_run_of_the_secagg_app(tmp_path, flower_env):
    """``flwr run flower_app_secagg`` on a simulation SuperLink: its components load and its
    declared ``secagg-*`` keys are accepted (``flwr`` refuses undeclared ones)."""
    from test_deployment import federation, flwr  # the deployment tests' process helpers

    out_dir = tmp_path / "secagg_run"
    run_config = (
        f'config="{QUICKSTART}" out-dir="{out_dir}" num-server-rounds=1 '
        f'overrides="{OVERRIDES}" secagg-max-weight=1000.0 secagg-timeout=300.0'
    )
    with federation(tmp_path, flower_env, num_nodes=3, simulation=True):
        result = flwr(
            flower_env, "run", str(REPO / "flower_app_secagg"), "--stream",
            "--run-config", run_config, cwd=tmp_path,
        )  # fmt: skip
    logs = "\n".join(p.read_text()[-2000:] for p in sorted(tmp_path.glob("*.log")))
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}\n{logs}"
    assert (out_dir / "final").is_dir(), f"{result.stdout[-4000:]}\n{logs}"
    record = json.loads((out_dir / "summary.json").read_text())["rounds"][1]
    assert record["accepted_clients"] == [0, 1, 2] and record["client_train_loss"] == {}
    values = sum(t.numel() for t in load_file(out_dir / ROUND_1).values())
    assert record["bytes_up"] == 3 * 8 * (values + 1)


def test_unusable_clear_fields_are_rejected_not_raised():
    """A reply whose clear fields do not parse (NaN, a list, a string, an id out of range, a
    repeated partition, zero samples) is recorded as rejected with a reason, never raised; an
    unmasked mean that is not finite in the model's dtype is not applied."""
    loop = StubLoop("skip")
    strategy = SecAggFedAvg(loop, ["a", "b"], num_clients=3, min_clients=1)
    mean = [np.full((2, 3), 0.25), np.arange(4.0)]
    params = ndarrays_to_parameters([np.zeros((2, 3), np.float32), np.zeros(4, np.float32)])
    strategy.configure_fit(1, params, Manager())
    bad = []
    for metrics, n in [
        ({"partition-id": float("nan")}, 10),
        ({"partition-id": [1]}, 10),
        ({"partition-id": "1"}, 10),
        ({"partition-id": 7}, 10),
        ({"partition-id": 1, "train-seconds": float("inf")}, 10),
        ({"partition-id": 1}, 0),
        ({}, 10),
    ]:
        bad.append((None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(mean), n, metrics)))
    good = [fit_result(mean, 0, 10), fit_result(mean, 0, 10)]  # the second repeats partition 0
    aggregate, _ = strategy.aggregate_fit(1, [good[0], *bad, good[1]], [])
    tally = strategy.reports[1]
    assert tally.accepted == [0] and aggregate is not None
    assert len(tally.rejected) == len(bad) + 1
    assert all(len(reason) <= 300 for reason in tally.rejected.values())
    assert "second reply for partition 0" in tally.rejected[f"reply {len(bad) + 1}"]

    strategy.configure_fit(2, params, Manager())
    huge = [np.full((2, 3), 1e39), np.arange(4.0)]  # finite in float64, Inf in float32
    aggregate, _ = strategy.aggregate_fit(2, [fit_result(huge, 1, 10)], [])
    assert aggregate is None and not strategy.reports[2].aggregated
    assert "not finite" in strategy.reports[2].rejected["1"]

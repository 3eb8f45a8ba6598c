"""Flower end to end with ``flwr run``: deployment (a SuperLink and 2 SuperNodes as processes,
plain and with TLS + SuperNode authentication) and simulation (a simulation SuperLink).

Each runs two rounds of FLoRA on the offline tiny CLIP and digits (2 clients, 2 local steps each), then
the same config in-process (``flora fit``): the final adapters must agree. Arrays travel as
float32 bytes (exact) and both sides aggregate with the same float64 FedAvg, so the only room
for a difference is summation order; the tolerance 1e-6 covers that (observed: identical).

Faults: a SuperNode killed mid-run (the run finishes, the node rejoins after a restart), and a
ServerApp resumed on its run directory (ends as the uninterrupted run).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from safetensors.torch import load_file  # noqa: E402

from flora_lightning import cli  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
ROUNDS = 2
OVERRIDES = "--data.partition.num_clients 2 --trainer.max_local_steps 2"
TOLERANCE = 1e-6


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, log: Path, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{process.args[0]} exited early:\n{log.read_text()[-3000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    pytest.fail(f"nothing listens on port {port} after {seconds}s:\n{log.read_text()[-3000:]}")


def bin_path(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def write_connection(env: dict, port: int, tls: dict | None, num_supernodes: int | None) -> None:
    """The SuperLink connection ``flwr`` uses (``$FLWR_HOME/config.toml``, default ``test``)."""
    home = Path(env["FLWR_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    security = f'root-certificates = "{tls["ca"]}"' if tls else "insecure = true"
    options = f"options.num-supernodes = {num_supernodes}\n" if num_supernodes else ""
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "test"\n\n[superlink.test]\n'
        f'address = "127.0.0.1:{port}"\n{security}\n{options}'
    )


def flwr(env: dict, *args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [bin_path("flwr"), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


@contextmanager
def federation(
    tmp: Path,
    env: dict,
    num_nodes: int = 2,
    tls: dict | None = None,
    simulation: bool = False,
    node_keys: list[str] | None = None,
    state_dir: Path | None = None,
    node_configs: list[str] | None = None,
    envs: dict[str, dict] | None = None,
):
    """A SuperLink plus ``num_nodes`` SuperNodes, or a simulation SuperLink (its virtual
    SuperNodes come from the connection's ``options.num-supernodes``). With ``node_keys``
    (needs ``tls``), SuperNode authentication is on and node ``i`` registers and uses
    ``node_keys[i]``; with ``state_dir`` the nodes keep their optimizer states there
    (``node_config`` ``state-dir``); ``node_configs[i]`` replaces node ``i``'s
    ``partition-id``/``num-partitions`` node config; ``envs`` gives a process (``superlink``,
    ``supernode0``, ...) its own environment. Yields ``start_node`` (to launch more SuperNodes; its
    ``nodes`` attribute lists the SuperNode processes started); always stops every process
    group it started."""
    processes: list[subprocess.Popen] = []

    def start(args: list[str], name: str) -> tuple[subprocess.Popen, Path]:
        log = tmp / f"{name}.log"
        with open(log, "w") as out:
            process = subprocess.Popen(
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=(envs or {}).get(name, env),
                cwd=tmp,
                start_new_session=True,
            )
        processes.append(process)
        return process, log

    link_port = free_port()
    security = (
        ["--ssl-ca-certfile", tls["ca"], "--ssl-certfile", tls["cert"], "--ssl-keyfile", tls["key"]]
        if tls
        else ["--insecure"]
    )
    node_security = ["--root-certificates", tls["ca"]] if tls else ["--insecure"]
    try:
        link, log = start(
            [
                bin_path("flower-superlink"),
                *security,
                "--port",
                str(link_port),
                "--disable-runtime-dependency-installation",  # never `uv sync` the app
                *(["--simulation"] if simulation else []),
                *(["--enable-supernode-auth"] if node_keys else []),
            ],
            "superlink",
        )
        wait_for_port(link_port, link, log)
        write_connection(env, link_port, tls, num_nodes if simulation else None)

        def start_node(i: int, key: str | None = None, name: str | None = None, retries=None):
            node_port = free_port()
            auth = ["--auth-supernode-private-key", key] if key else []
            more = ["--max-retries", str(retries)] if retries is not None else []
            node_config = f"partition-id={i} num-partitions={num_nodes}"
            if node_configs is not None:
                node_config = node_configs[i]
            if state_dir is not None:
                node_config += f' state-dir="{state_dir}"'
            started = start(
                [
                    bin_path("flower-supernode"),
                    *node_security,
                    *auth,
                    *more,
                    "--superlink",
                    f"127.0.0.1:{link_port}",
                    "--port",
                    str(node_port),
                    "--node-config",
                    node_config,
                ],
                name or f"supernode{i}",
            )
            start_node.nodes.append(started[0])
            return started, node_port

        start_node.nodes = []

        for i in range(0 if simulation else num_nodes):
            key = node_keys[i] if node_keys else None
            if key:
                registered = flwr(env, "supernode", "register", f"{key}.pub", cwd=tmp, timeout=60)
                assert registered.returncode == 0, registered.stdout + registered.stderr
            (node, log), node_port = start_node(i, key)
            wait_for_port(node_port, node, log)
        yield start_node
    finally:
        for process in processes:  # whole process groups: SuperExec and app children too
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=15)


def run_config(out_dir: Path, overrides: str = OVERRIDES, rounds: int = ROUNDS, more: str = ""):
    """The ``--run-config`` of ``flwr run flower_app`` (``more``: extra ``key=value`` pairs)."""
    return (
        f'config="{QUICKSTART}" out-dir="{out_dir}" num-server-rounds={rounds} '
        f'overrides="{overrides}" {more}'
    ).strip()


def flwr_run(
    tmp: Path, env: dict, out_dir: Path, overrides: str = OVERRIDES, **config
) -> subprocess.CompletedProcess:
    """``flwr run flower_app`` (2 rounds, 2 clients) on the connection ``federation`` wrote."""
    return flwr(
        env,
        "run",
        str(REPO / "flower_app"),
        "--stream",
        "--run-config",
        run_config(out_dir, overrides, **config),
        cwd=tmp,
    )


@pytest.fixture(scope="module")
def flower_env(tmp_path_factory, offline_assets) -> dict:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "FLWR_HOME": str(tmp_path_factory.mktemp("flwr_home")),
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        # The apps import flora_lightning from this checkout, whatever is installed.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }


@pytest.fixture(scope="module")
def in_process(tmp_path_factory, offline_assets) -> Path:
    return fit_in_process(tmp_path_factory.mktemp("in_process") / "run", OVERRIDES)


def fit_in_process(run_dir: Path, overrides: str) -> Path:
    """The reference: ``flora fit`` of the same config in this process."""
    cli.run(
        [
            "fit",
            "--config",
            str(QUICKSTART),
            "--trainer.rounds",
            str(ROUNDS),
            "--trainer.default_root_dir",
            str(run_dir),
            "--trainer.progress",
            "false",
            *overrides.split(),
        ]
    )
    return run_dir


def assert_same_run(flower_dir: Path, reference: Path) -> None:
    adapter = load_file(flower_dir / "final" / "adapter_model.safetensors")
    expected = load_file(reference / "final" / "adapter_model.safetensors")
    assert set(adapter) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(adapter[name], tensor, rtol=0, atol=TOLERANCE)
    summary = json.loads((flower_dir / "summary.json").read_text())
    ref_summary = json.loads((reference / "summary.json").read_text())
    assert set(ref_summary) <= set(summary)
    per_client = summary["bytes_per_client_per_direction"]
    assert per_client == sum(t.numel() * 4 for t in expected.values())  # float32 arrays
    assert [r["round"] for r in summary["rounds"]] == list(range(ROUNDS + 1))
    for record, ref in zip(summary["rounds"][1:], ref_summary["rounds"][1:], strict=True):
        assert set(ref) <= set(record)
        clients = sorted(ref["client_train_loss"], key=int)  # who trained in flora fit
        assert record["bytes_up"] == record["bytes_down"] == len(clients) * per_client
        assert record["client_bytes_up"] == dict.fromkeys(clients, per_client)
        assert record["test_acc"] == pytest.approx(ref["test_acc"], abs=1e-6)
        assert record["client_train_loss"] == pytest.approx(ref["client_train_loss"], abs=1e-5)
        assert record["accepted_clients"] == [int(c) for c in clients]
        assert record["rejected_clients"] == {}
    for round_ in range(1, ROUNDS + 1):
        assert (flower_dir / "checkpoints" / f"round_{round_:03d}.safetensors").is_file()
    assert list((flower_dir / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_deployment_matches_in_process_loop(tmp_path, flower_env, in_process):
    """One SuperNode per partition, as docs/flower.md deploys it: the nodes free their image
    encoders after caching (one-partition-per-node) and the run still equals flora fit."""
    out_dir = tmp_path / "flower_run"
    with federation(tmp_path, flower_env):
        result = flwr_run(tmp_path, flower_env, out_dir, more="one-partition-per-node=true")
    logs = "\n".join(p.read_text()[-2000:] for p in sorted(tmp_path.glob("*.log")))
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}\n{logs}"
    assert (out_dir / "final").is_dir(), f"{result.stdout[-4000:]}\n{logs}"
    assert_same_run(out_dir, in_process)


def make_certificates(folder: Path) -> dict:
    """A self-signed CA and a server certificate for 127.0.0.1/localhost (openssl)."""
    folder.mkdir(parents=True, exist_ok=True)
    ext = folder / "san.ext"
    ext.write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)

    openssl("genrsa", "-out", "ca.key", "2048")
    openssl(
        "req",
        "-x509",
        "-new",
        "-key",
        "ca.key",
        "-sha256",
        "-days",
        "2",
        "-subj",
        "/CN=flora-test-ca",
        "-out",
        "ca.crt",
    )
    openssl("genrsa", "-out", "server.key", "2048")
    openssl("req", "-new", "-key", "server.key", "-subj", "/CN=127.0.0.1", "-out", "server.csr")
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-sha256",
        "-extfile",
        str(ext),
        "-out",
        "server.pem",
    )
    return {
        k: str(folder / v)
        for k, v in {"ca": "ca.crt", "cert": "server.pem", "key": "server.key"}.items()
    }


def make_node_key(path: Path) -> str:
    """An ECDSA (P-384) key pair in OpenSSH format, as SuperNode authentication expects."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(path)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return str(path)


@pytest.mark.slow
def test_deployment_over_tls_with_supernode_auth(tmp_path, flower_env, in_process):
    """TLS with a self-signed CA, and only registered SuperNode keys may join."""
    for tool in ("openssl", "ssh-keygen"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    tls = make_certificates(tmp_path / "certs")
    keys = [make_node_key(tmp_path / f"node{i}") for i in range(2)]
    out_dir = tmp_path / "flower_tls_run"
    with federation(tmp_path, flower_env, tls=tls, node_keys=keys) as start_node:
        (stranger, _), _ = start_node(1, make_node_key(tmp_path / "stranger"), "stranger", 1)
        result = flwr_run(tmp_path, flower_env, out_dir)
        assert stranger.wait(timeout=120) != 0  # its key was never registered: refused
    logs = "\n".join(p.read_text()[-2000:] for p in sorted(tmp_path.glob("*.log")))
    assert "Failed to activate SuperNode" in (tmp_path / "stranger.log").read_text()
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}\n{logs}"
    assert (out_dir / "final").is_dir(), f"{result.stdout[-4000:]}\n{logs}"
    assert_same_run(out_dir, in_process)


@pytest.mark.slow
def test_simulation_matches_in_process_loop(tmp_path, flower_env, in_process):
    """``flwr run`` on a simulation SuperLink: 2 virtual SuperNodes (Ray) instead of processes."""
    out_dir = tmp_path / "flower_sim_run"
    with federation(tmp_path, flower_env, simulation=True):
        result = flwr_run(tmp_path, flower_env, out_dir)
    logs = "\n".join(p.read_text()[-2000:] for p in sorted(tmp_path.glob("*.log")))
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}\n{logs}"
    assert (out_dir / "final").is_dir(), f"{result.stdout[-4000:]}\n{logs}"
    assert_same_run(out_dir, in_process)


@pytest.mark.slow
def test_partial_participation_trains_the_same_clients_as_flora_fit(tmp_path, flower_env):
    """join_ratio 0.5 of 4 clients: the ServerApp asks each node its partition once, then each
    round trains the partitions ``flora fit`` samples (seeded), not Flower's random pick."""
    overrides = (
        "--data.partition.num_clients 4 --trainer.max_local_steps 2 --trainer.join_ratio 0.5"
    )
    reference = fit_in_process(tmp_path / "in_process", overrides)
    trained = [
        sorted(r["client_train_loss"])
        for r in json.loads((reference / "summary.json").read_text())["rounds"][1:]
    ]
    assert all(len(clients) == 2 for clients in trained) and trained[0] != trained[1]
    out_dir = tmp_path / "flower_partial_run"
    with federation(tmp_path, flower_env, num_nodes=4, simulation=True):
        result = flwr_run(tmp_path, flower_env, out_dir, overrides)
    logs = "\n".join(p.read_text()[-2000:] for p in sorted(tmp_path.glob("*.log")))
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}\n{logs}"
    assert_same_run(out_dir, reference)


@pytest.mark.slow
def test_simulation_with_lora_product_average_matches_flora_fit(tmp_path, flower_env):
    """Any flora Strategy runs on the Flower path, not just FedAvg: LoraProductAverage gives
    the same adapter as ``flora fit`` with it."""
    overrides = f"{OVERRIDES} --trainer.strategy LoraProductAverage"
    reference = fit_in_process(tmp_path / "in_process", overrides)
    out_dir = tmp_path / "flower_lora_product_run"
    with federation(tmp_path, flower_env, simulation=True):
        result = flwr_run(tmp_path, flower_env, out_dir, overrides)
    logs = "\n".join(p.read_text()[-2000:] for p in sorted(tmp_path.glob("*.log")))
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}\n{logs}"
    assert "LoraProductAverage" in (out_dir / "config.yaml").read_text()
    assert_same_run(out_dir, reference)


def recorded_rounds(out_dir: Path) -> list[dict]:
    """The rounds summary.json holds so far (the ServerApp rewrites it after every round)."""
    try:
        return json.loads((out_dir / "summary.json").read_text())["rounds"]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def wait_until(condition, what: str, run: subprocess.Popen, log: Path, seconds: float = 300):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        if run.poll() is not None:
            pytest.fail(f"flwr run ended before {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)
    pytest.fail(f"no {what} after {seconds}s:\n{log.read_text()[-4000:]}")


@pytest.mark.slow
def test_a_killed_supernode_does_not_stall_the_run_and_rejoins(tmp_path, flower_env):
    """SIGKILL a SuperNode after round 1: the run goes on with the other one (the missing
    partition recorded per round), and the restarted SuperNode trains again."""
    rounds, out_dir = 5, tmp_path / "flower_fault_run"
    config = run_config(out_dir, rounds=rounds, more="node-wait-seconds=20")
    log = tmp_path / "flwr_run.log"
    with federation(tmp_path, flower_env) as start_node, open(log, "w") as out:
        run = subprocess.Popen(
            [bin_path("flwr"), "run", str(REPO / "flower_app"), "--stream", "--run-config",
             config],  # fmt: skip
            env=flower_env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            wait_until(lambda: len(recorded_rounds(out_dir)) >= 2, "round 1", run, log)
            os.killpg(start_node.nodes[1].pid, signal.SIGKILL)  # the node and its ClientApp

            def not_connected() -> bool:
                return any(
                    r["rejected_clients"].get("1", "").startswith("node not connected")
                    for r in recorded_rounds(out_dir)
                )

            wait_until(not_connected, "round without partition 1", run, log)
            restarted_after = len(recorded_rounds(out_dir)) - 1
            (node, node_log), port = start_node(1, name="supernode1_restarted")
            wait_for_port(port, node, node_log)
            assert run.wait(timeout=600) == 0, log.read_text()[-4000:]
        finally:
            if run.poll() is None:
                run.kill()
    records = recorded_rounds(out_dir)
    assert [r["round"] for r in records] == list(range(rounds + 1))  # every round, none stalled
    assert (out_dir / "final" / "adapter_model.safetensors").is_file()
    after_kill = records[2:]
    assert all(r["accepted_clients"][:1] == [0] for r in records[1:])  # node 0 always trained
    missing = [r["round"] for r in after_kill if "1" in r["rejected_clients"]]
    assert missing and restarted_after in missing  # recorded, with a reason, per round
    # Keyed by partition, also the SuperLink's heartbeat error of the round it died in.
    assert all(set(r["rejected_clients"]) <= {"1"} for r in records)
    rejoined = [r["round"] for r in records if r["round"] > restarted_after and
                r["accepted_clients"] == [0, 1]]  # fmt: skip
    assert rejoined, [(r["round"], r["accepted_clients"]) for r in records]


@pytest.mark.slow
def test_a_resumed_serverapp_ends_as_an_uninterrupted_run(tmp_path, flower_env, in_process):
    """The ServerApp stops after round 1, then a new ``flwr run`` with resume=true on the same
    run directory does round 2: the final adapter equals ``flora fit``'s uninterrupted run.
    The SuperNodes keep the clients' Adam states under their ``state-dir`` (a new run has a
    fresh ``context.state``), so round 2 continues from round 1's moments."""
    out_dir, state_dir = tmp_path / "flower_resumed_run", tmp_path / "node_states"
    with federation(tmp_path, flower_env, state_dir=state_dir):
        first = flwr_run(tmp_path, flower_env, out_dir, rounds=1)
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        assert [r["round"] for r in recorded_rounds(out_dir)] == [0, 1]
        second = flwr_run(tmp_path, flower_env, out_dir, rounds=ROUNDS, more="resume=true")
    logs = "\n".join(p.read_text()[-2000:] for p in sorted(tmp_path.glob("*.log")))
    assert second.returncode == 0, f"{second.stdout[-3000:]}\n{second.stderr[-3000:]}\n{logs}"
    assert (out_dir / "config.resumed.yaml").is_file()
    (run_states,) = state_dir.glob("run-*")  # one folder: the resumed run kept its fingerprint
    for partition in (0, 1):
        saved = sorted(p.name for p in (run_states / f"partition-{partition}").iterdir())
        assert saved == ["manifest.json", "round_001.safetensors", "round_002.safetensors"]
    assert_same_run(out_dir, in_process)

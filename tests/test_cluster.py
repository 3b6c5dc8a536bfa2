"""cluster.yaml checked offline the way `ray up` checks it, the head's MLflow command run for real, loopback
defaults of every server we start, and `weit submit` against a real (private, loopback) Ray head."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster.yaml"


@pytest.fixture(scope="module")
def cluster_raw() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def listening(port: int) -> set[str]:
    """Local addresses (IPv4 dotted or IPv6 hex) listening on TCP ``port``, from /proc/net/tcp{,6}."""
    addrs = set()
    for name in ("tcp", "tcp6"):
        path = Path("/proc/net") / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            host, p = local.rsplit(":", 1)
            if state == "0A" and int(p, 16) == port:
                if len(host) == 8:
                    addrs.add(".".join(str(int(host[i:i + 2], 16)) for i in (6, 4, 2, 0)))
                else:
                    addrs.add(host)
    return addrs


def test_cluster_yaml_passes_rays_own_validation(cluster_raw):
    """jsonschema against ray-schema.json on the raw file, then prepare_config + validate_config: the
    checks `ray up` runs before it touches a cloud (all offline; the AWS defaults are read from Ray's
    package)."""
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster_raw, schema)
    cfg = prepare_config(copy.deepcopy(cluster_raw))
    validate_config(cfg)
    types = cfg["available_node_types"]
    assert cfg["provider"]["type"] == "aws" and types[cfg["head_node_type"]]["max_workers"] == 0
    gpu = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    assert gpu and all(re.match(r"(g|p)\d", v["node_config"]["InstanceType"]) for v in gpu.values())
    assert all(0 <= v["min_workers"] <= v["max_workers"] <= cfg["max_workers"] for v in gpu.values())
    assert not re.match(r"(g|p)\d", types[cfg["head_node_type"]]["node_config"]["InstanceType"])
    # setup runs on every node: weit installed from the synced checkout by scripts/setup.sh
    assert cfg["file_mounts"]["~/weit"] == "." and "~/.ray/auth_token" in cfg["file_mounts"]
    for cmds in (cfg["head_setup_commands"], cfg["worker_setup_commands"]):
        assert any("scripts/setup.sh" in c for c in cmds)

    # the validation is strict: a misspelt key or an impossible worker count is refused
    bad = copy.deepcopy(cluster_raw)
    bad["available_node_types"]["gpu_1x"]["max_wokers"] = 3
    with pytest.raises(jsonschema.ValidationError, match="max_wokers"):
        jsonschema.validate(bad, schema)
    bad = copy.deepcopy(cluster_raw)
    bad["available_node_types"]["gpu_1x"]["min_workers"] = cluster_raw["max_workers"] + 1
    with pytest.raises(ValueError, match="max_workers"):
        validate_config(prepare_config(bad))


def test_cluster_network_exposure(cluster_raw):
    """Dashboard on the head's loopback only; MLflow on the head's private address (never 0.0.0.0);
    every node's Ray started with token auth and MLFLOW_TRACKING_URI pointing at the head's server."""
    text = CLUSTER.read_text()
    commands = "\n".join(c for k in ("head_start_ray_commands", "worker_start_ray_commands", "setup_commands",
                                      "head_setup_commands", "worker_setup_commands") for c in cluster_raw[k])
    assert "0.0.0.0" not in commands and "0.0.0.0" not in text.replace("never on 0.0.0.0", "")
    head = cluster_raw["head_start_ray_commands"]
    start = next(c for c in head if "ray start --head" in c)
    assert "--dashboard-host=127.0.0.1" in start
    mlflow = next(c for c in head if "mlflow server" in c)
    assert "HEAD_IP=$(hostname -I | awk '{print $1}')" in mlflow and '--host "$HEAD_IP"' in mlflow
    assert head.index(mlflow) < head.index(start)  # the server is up before Ray's workers look for it
    for cmd, ip in ((start, "$HEAD_IP"), (next(c for c in cluster_raw["worker_start_ray_commands"]
                                                 if "ray start" in c), "$RAY_HEAD_IP")):
        export = cmd.index(f"export MLFLOW_TRACKING_URI=http://{ip}:5000 RAY_AUTH_MODE=token")
        assert export < cmd.index("ray start")  # raylet (and so every worker and job) inherits it


def test_head_mlflow_commands_from_cluster_yaml_run(cluster_raw, tmp_path):
    """Run the head's MLflow lines from cluster.yaml as the head would (bash, its own HOME), with `hostname -I`
    answering loopback: the server outlives the starting shell, binds only there and takes runs; a second
    `ray up` (stop line, start line) replaces it on the same port and database; the stop line ends it."""
    from mlflow import MlflowClient
    from mlflow_machinery import free_port, live_pids

    head = cluster_raw["head_start_ray_commands"]
    stop = next(c for c in head if "server.pid" in c and "kill" in c)
    port = free_port()
    start = next(c for c in head if "mlflow server" in c).replace("5000", str(port)).replace(
        "--workers 4", "--workers 1")  # one worker: 2 shared cores
    home, fakebin = tmp_path / "home", tmp_path / "bin"
    (home / "mlflow").mkdir(parents=True), fakebin.mkdir()
    (fakebin / "hostname").write_text("#!/bin/sh\necho 127.0.0.1\n")  # the head's private IP, here loopback
    (fakebin / "hostname").chmod(0o755)
    env = {**os.environ, "HOME": str(home), "PATH": f"{fakebin}:{Path(sys.executable).parent}:{os.environ['PATH']}"}

    def sh(line: str) -> int:
        out = subprocess.run(["bash", "-c", line], env=env, capture_output=True, text=True, timeout=150)
        log = home / "mlflow" / "server.log"
        assert out.returncode == 0, out.stderr[-2000:] + (log.read_text()[-2000:] if log.exists() else "")
        return int((home / "mlflow" / "server.pid").read_text()) if "mlflow server" in line else 0

    pids = [sh(stop) + sh(start)]  # the first `ray up`: nothing to stop yet
    try:
        assert listening(port) == {"127.0.0.1"} and live_pids(pgid=pids[0])
        client = MlflowClient(f"http://127.0.0.1:{port}")
        run = client.create_run(client.create_experiment("head"))
        client.log_metric(run.info.run_id, "acc", 0.5)
        pids.append(sh(stop) + sh(start))  # a second `ray up`
        assert pids[1] != pids[0] and not live_pids(pgid=pids[0])
        assert client.get_metric_history(run.info.run_id, "acc")[0].value == 0.5  # same database
    finally:
        sh(stop)
    assert not (home / "mlflow" / "server.pid").exists()
    assert not live_pids(pgid=pids[-1]) and not listening(port)


def test_servers_bind_loopback_by_default(mlflow_server):
    """Everything weit starts by itself listens on 127.0.0.1: the MLflow server and the Ray dashboard
    (Jobs API) of `init_ray` and of the private test head. (Ray's GCS port listens on all interfaces
    whatever you pass; docs/cluster.md says so and why the security group matters.)"""
    port = int(mlflow_server.uri.rsplit(":", 1)[1])
    assert listening(port) == {"127.0.0.1"}
    code = ("import sys, ray\nfrom pipelines.common import init_ray\ninit_ray(num_cpus=1)\n"
            "print('DASH', ray._private.worker.get_dashboard_url(), flush=True)\nsys.stdin.readline()\n"
            "ray.shutdown()\n")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    probe = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = probe.stdout.readline()
        url = re.search(r"DASH (\S+)", line).group(1)
        assert listening(int(url.rsplit(":", 1)[1])) == {"127.0.0.1"}
    finally:
        probe.communicate("\n", timeout=120)


def test_private_head_loopback_submit_exit_code_and_clean_stop(capsys, monkeypatch):
    """The test head (`start_local_head`) has its Jobs API on 127.0.0.1 only; `weit submit --wait` ships the
    checkout, runs the command there and exits with the job's own code (2 and the one-line error for bad
    input inside the job); `stop()` ends exactly this head's processes (no `ray stop`, which would stop
    every Ray on the machine)."""
    from mlflow_machinery import live_pids
    from ray_machinery import start_local_head

    from pipelines.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    head = start_local_head(num_cpus=1)
    try:
        port = int(head.dashboard_url.rsplit(":", 1)[1])
        assert listening(port) == {"127.0.0.1"}
        assert live_pids(sid=head.proc.pid)
        rc = main(["submit", "sweep", "--address", head.dashboard_url, "--wait", "--working-dir", str(ROOT),
                   "--space", "tune_spaces/no_such_space.yaml"])
        out, err = capsys.readouterr()
        assert rc == 2, (out, err)
        assert "error: search space tune_spaces/no_such_space.yaml not found" in out, (out, err)  # job log
        assert "FAILED: Job entrypoint command failed with exit code 2" in out, (out, err)
    finally:
        head.stop()
    deadline = time.monotonic() + 20
    while live_pids(sid=head.proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not live_pids(sid=head.proc.pid) and not listening(port)


@pytest.mark.slow  # 50-120 s call + 40-90 s setup here (2 cores shared with other test runs)
def test_submit_sweep_through_jobs_api_logs_to_mlflow_server(digits_bank, mlflow_server, tmp_path, monkeypatch):
    """`weit submit sweep --wait` to a private Ray head whose nodes carry MLFLOW_TRACKING_URI (as cluster.yaml
    sets it): the job runs the uploaded checkout, its trials arrive in the MLflow server over HTTP, exit 0."""
    from mlflow import MlflowClient
    from ray_machinery import start_local_head

    from pipelines.cli import main
    from weit_core.io import save_bank

    bank, aux, _ = digits_bank
    bank_path = save_bank(tmp_path / "bank.safetensors", bank, aux, {"mode": "wave"})
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the URI must come from the cluster's nodes
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    head = start_local_head(num_cpus=2, env={"MLFLOW_TRACKING_URI": mlflow_server.uri})
    try:
        t0 = time.monotonic()
        rc = main(["submit", "sweep", "--address", head.dashboard_url, "--wait", "--working-dir", str(ROOT),
                   "--space", "tune_spaces/ci.yaml", "--bank", str(bank_path), "--limit-trials", "4",
                   "--name", "submitted", "--storage", str(tmp_path / "runs")])
        job_s = time.monotonic() - t0
        assert rc == 0
    finally:
        head.stop()
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("weit-sweep")
    parents = client.search_runs([exp.experiment_id], "tags.`weit.sweep` = 'submitted' and tags.`weit.kind` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)
    assert all(0.0 <= r.data.metrics["val_acc"] <= 1.0 for r in children)
    assert len({r.data.params["strategy"] for r in children if "strategy" in r.data.params}) >= 2
    print(f"submitted sweep of 4 trials finished in {job_s:.1f} s")

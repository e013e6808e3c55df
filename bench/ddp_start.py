"""Where a Ray Train trial's time goes beyond its training: 1 worker on one node vs 2 workers across two nodes.

Starts its own two-node Ray cluster on this machine (``ray start --head --num-cpus 1`` plus
``ray start --address ... --num-cpus 1``; only one Ray can run on a machine, so nothing else may run
beside it), then runs the digits-smoke recipe through a ``TorchTrainer`` with 1 worker and with 2
(one per node, DDP over gloo), timing on the one clock the nodes share:

- start: ``fit()`` called -> the training function entered on the last worker (Ray Train's worker group
  and controller start, the torch process group is set up);
- imports: the project's modules (torch, timm, torchvision) imported by the training function;
- setup: imported -> first epoch starts (this project's: datasets, model, DDP wrap, optimizer);
- training: the epochs' own time (``epoch_s``, evaluation included);
- reports: the rest between epochs (reports and checkpoints through Ray Train);
- end: the last report -> ``fit()`` returned (the worker group stops).

    python bench/ddp_start.py [--epochs 2] [--preload torch,torchvision,timm,trainables.classification]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
BIN = os.path.dirname(sys.executable)


def timed_worker(config: dict) -> None:
    """A Ray Train worker: the project's classification loop, with the time it entered and each report's."""
    entered = time.time()
    from trainables import TrainSession, train_recipe

    imported = time.time()

    class Session(TrainSession):
        def report(self, report, checkpoint_dir):
            report.metrics["bench/reported_at"] = time.time()
            report.metrics["bench/entered_at"] = entered
            report.metrics["bench/imported_at"] = imported
            super().report(report, checkpoint_dir)

    train_recipe(config["recipe"], Session())


def run(workers: int, epochs: int, storage: str) -> dict[str, float]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from spaces import resolve_recipe

    recipe = resolve_recipe("digits-smoke", {"schedule.epochs": epochs, "runtime.workers": workers, "optim.batch_size": 64})
    trainer = TorchTrainer(
        timed_worker, train_loop_config={"recipe": recipe.model_dump(mode="json")},
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}, placement_strategy="SPREAD"),
        run_config=RunConfig(name=f"ddp-start-{workers}-{time.time_ns()}", storage_path=storage),
    )
    called = time.time()
    result = trainer.fit()
    returned = time.time()
    history = result.metrics_dataframe  # rank 0's reports
    entered, imported = float(history["bench/entered_at"].iloc[0]), float(history["bench/imported_at"].iloc[0])
    first, last = float(history["bench/reported_at"].iloc[0]), float(history["bench/reported_at"].iloc[-1])
    training = float(history["epoch_s"].sum())
    setup = first - imported - float(history["epoch_s"].iloc[0])
    return {
        "start": entered - called, "imports": imported - entered, "setup": setup, "training": training,
        "reports": (last - first) - float(history["epoch_s"].iloc[1:].sum()), "end": returned - last, "total": returned - called,
    }


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def two_nodes(preload: str):
    """A head and a worker node of 1 CPU each on this machine; yields the GCS address and the nodes' environment."""
    ray = os.path.join(BIN, "ray")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": ROOT, "RAY_AUTH_MODE": "disabled"}
    if preload:  # Ray's experimental switch: every worker process the nodes start imports these first
        env["RAY_preload_python_modules"] = preload
    env.pop("RAY_ADDRESS", None)
    subprocess.run([ray, "stop", "--force"], capture_output=True, timeout=120)
    port = _free_port()
    subprocess.run([ray, "start", "--head", "--port", str(port), "--num-cpus", "1", "--dashboard-host", "127.0.0.1",
                    "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=180)
    address = f"127.0.0.1:{port}"
    node = subprocess.Popen([ray, "start", "--address", address, "--num-cpus", "1", "--block", "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while "0.0/2.0 CPU" not in subprocess.run([ray, "status", "--address", address], env=env, capture_output=True, text=True).stdout:
            if time.time() > deadline:
                raise SystemExit("the second node did not join in 120 s")
            time.sleep(2)
        yield address, env
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, signal.SIGKILL)
        subprocess.run([ray, "stop", "--force"], capture_output=True, timeout=120, env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--preload", default="", help="modules every Ray worker process imports when it starts, e.g. torch,timm")
    args = parser.parse_args()
    import ray

    with two_nodes(args.preload) as (address, env), tempfile.TemporaryDirectory() as storage:
        os.environ.update(RAY_AUTH_MODE=env["RAY_AUTH_MODE"])
        ray.init(address=address, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": ROOT}})
        rows = {workers: run(workers, args.epochs, storage) for workers in (1, 2)}
        ray.shutdown()
    preloaded = f"; workers preload {args.preload}" if args.preload else ""
    print(f"TorchTrainer trial of digits-smoke x {args.epochs} epochs, seconds (1 CPU per worker; 2 workers: one per node{preloaded})")
    print(f"{'workers':<9}" + "".join(f"{name:>10}" for name in rows[1]))
    for workers, row in rows.items():
        print(f"{workers:<9}" + "".join(f"{value:>10.1f}" for value in row.values()))


if __name__ == "__main__":
    main()

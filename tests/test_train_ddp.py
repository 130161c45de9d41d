"""Two CPU processes under torchrun (gloo): shards, synchronised weights, one run folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from safetensors.numpy import load_file  # noqa: E402

WORKER = textwrap.dedent("""
    import json, os, sys
    from safetensors.torch import save_file
    from mvcompile.train.loop import train
    from mvcompile.train.model import export_state_dict
    from mvcompile.train.options import TrainOptions

    class Count:
        steps = 0
        def epoch_start(self, *args): pass
        def batch_end(self, loss, lr, resolution): self.steps += 1
        def epoch_end(self, row): self.row = row

    out = sys.argv[1]
    count = Count()
    result = train(TrainOptions(data="digits", resolution=64, epochs=1, batch_size=8,
                                subset=64, runs_dir=out, name="ddp"), count)
    rank = int(os.environ["RANK"])
    save_file(export_state_dict(result.model), f"{out}/rank{rank}.safetensors")
    if rank == 0:
        json.dump({"steps": count.steps, "row": count.row}, open(f"{out}/rank0.json", "w"))
""")


def _torchrun_two(worker: str, tmp_path: Path) -> None:
    """Run the script ``worker`` (argument: ``tmp_path``) as two torchrun processes."""
    script = tmp_path / "worker.py"
    script.write_text(worker)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_process_torchrun_trains_one_synchronised_model(tmp_path: Path) -> None:
    _torchrun_two(WORKER, tmp_path)
    report = json.loads((tmp_path / "rank0.json").read_text())
    assert report["steps"] == 64 // (2 * 8)  # each rank takes half of every global batch
    assert 0.0 <= report["row"]["val_acc"] <= 1.0
    a, b = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert all(np.array_equal(a[k], b[k]) for k in a)  # DDP kept the replicas identical
    saved = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    assert saved["epoch"] == 1 and len(saved["rng"]) == 2  # one RNG state per rank
    assert saved["options"]["batch_size"] == 8


STOPPING_WORKER = textwrap.dedent("""
    import json, os, signal, sys
    from mvcompile.interrupts import Terminated, sigterm_as_stop_request
    from mvcompile.train import loop
    from mvcompile.train.options import TrainOptions

    rank = int(os.environ["RANK"])
    steps = 0
    make_optimizer = loop.make_optimizer

    def count_step(*_):  # rank 1 gets a SIGTERM in its second step
        global steps
        steps += 1
        if rank == 1 and steps == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    def counting_optimizer(*args, **kwargs):
        optimizer = make_optimizer(*args, **kwargs)
        optimizer.register_step_pre_hook(count_step)
        return optimizer

    loop.make_optimizer = counting_optimizer
    out = sys.argv[1]
    try:
        with sigterm_as_stop_request():
            loop.train(TrainOptions(data="digits", resolution=64, epochs=2, batch_size=8,
                                    subset=128, runs_dir=out, name="ddp"))
        outcome = "finished"
    except Terminated:
        outcome = "stopped"
    json.dump({"outcome": outcome, "steps": steps}, open(f"{out}/rank{rank}.json", "w"))
""")


def test_a_sigterm_to_one_rank_stops_every_rank_after_the_same_batch(tmp_path: Path) -> None:
    """Ranks that stopped on their own would leave the others waiting in the next
    all-reduce (here, gloo fails when the peer is gone)."""
    _torchrun_two(STOPPING_WORKER, tmp_path)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert reports == [{"outcome": "stopped", "steps": 2}] * 2, reports

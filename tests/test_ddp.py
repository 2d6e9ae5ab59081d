"""DDP on CPU: two gloo processes under torchrun train the tiny detector (ImPA + a trainable extra module) on
different shards of a tiny cache; their parameters must stay identical, and only rank 0 writes files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from tests.conftest import TINY_MODEL, build_tiny_cache

SCRIPT = textwrap.dedent(
    """
    import hashlib, json, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from comoto_cli.config import TeacherConfig
    from comoto_cli.engine.teacher import make_impa_loss
    from comoto_cli.engine import distributed
    from comoto_cli.data.datasets import DetectionDataset
    from comoto_cli.engine.trainer import seed_everything, train
    from comoto_cli.networks.detector import build_detector

    cache, out = sys.argv[1], Path(sys.argv[2])
    config = TeacherConfig.model_validate(json.loads(sys.argv[3]))
    env = distributed.init_distributed(use_cuda=False)
    assert env.enabled and env.world_size == 2
    # Different seeds per rank for the model init: DDP must broadcast rank 0's weights.
    seed_everything(config.seed + 100 * env.rank)
    model = build_detector(config.model, (64, 64))
    initial = [p.detach().clone() for p in model.parameters()]
    head = torch.nn.Linear(model.feature_channels, 2)
    impa = make_impa_loss(config, (64, 64))
    seen = []

    def extra_loss(batch, losses, features, ctx):
        seen.extend(batch["rows"].tolist())
        terms = impa(batch, losses, features, ctx)
        terms["toy"] = 0.1 * ctx.extra_modules["head"](features.mean(dim=(2, 3))).pow(2).mean()
        return terms

    train_set = DetectionDataset(cache, "train", augment=config.augment, seed=config.seed)
    summary = train(config, model=model, train_set=train_set, val_fn=lambda m: {"mean_sensitivity": 0.5},
                    run_dir=out / "run", extra_loss=extra_loss, extra_modules={"head": head}, dist_env=env)
    digest = hashlib.sha256()
    # Parameters only: BatchNorm running statistics are broadcast from rank 0 at each forward and then
    # updated with the rank's own batch, so they legitimately differ after the last step.
    for tensor in list(model.parameters()) + list(head.parameters()):
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    moved = sum(float((p.detach() - q).abs().sum()) for p, q in zip(model.parameters(), initial))
    (out / f"rank{env.rank}.json").write_text(json.dumps(
        {"hash": digest.hexdigest(), "moved": moved, "rows": seen, "epochs": len(summary["history"])}))
    distributed.cleanup(env)
    """
)


def test_two_gloo_processes_stay_in_sync(tmp_path):
    cache = build_tiny_cache(tmp_path / "tiny.h5", train=12, val=2)
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    config = {"model": TINY_MODEL, "optim": {"name": "sgd", "lr": 0.01, "scheduler": "none"}, "epochs": 1,
              "batch_size": 2, "log_every": 1, "seed": 3}
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         str(cache), str(tmp_path), json.dumps(config)],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["hash"] == ranks[1]["hash"]
    assert ranks[0]["moved"] > 0
    # each rank saw its own half of the 12 training images (3 steps of 2)
    assert len(ranks[0]["rows"]) == len(ranks[1]["rows"]) == 6
    assert sorted(ranks[0]["rows"] + ranks[1]["rows"]) == list(range(12))
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 1 and {"impa", "toy", "classification"} <= set(history[0]["losses"])
    assert (tmp_path / "run" / "last.pt").exists() and (tmp_path / "run" / "best.pt").exists()

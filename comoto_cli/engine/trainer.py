"""The one training loop of the project: the mammography teacher and the DBT student both go through
:func:`train`. Read it top to bottom: setup (:func:`build_trainee`), resume (:func:`restore_state`), then per epoch
:func:`train_one_epoch` -> :func:`validate` -> :func:`save_state` -> :func:`log_epoch`.

Plug-in points (how ``train-teacher`` and ``distill`` differ without copying the loop):

``extra_loss(batch, losses, features, ctx) -> dict[str, Tensor]``
    Called inside the (DDP-wrapped) forward after ``model.forward_train`` with the moved ``batch``
    (``images``, ``targets``, ``rows``), the detector's loss dict, the distillation feature map of the SAME
    forward pass (``(B, C, h, w)``, in the autograd graph) and a :class:`StepContext`. It returns extra,
    already weighted loss terms by name (e.g. ``{"impa": ...}`` or ``{"lskd": ...}``); each is added to the
    total and logged as its own component (epoch mean over the steps that produced it). Return ``{}`` to skip
    a step (a lesion-free batch). Use ``ctx.generator`` for random choices (reproducible and resumable) and
    ``ctx.extra_modules[name]`` for trainable helpers. A frozen teacher is captured in the closure.
``extra_modules: dict[str, nn.Module]``
    Trainable modules besides the detector (the LsKD ``Linear(P, P)`` projection): moved to the device,
    optimised with the detector, wrapped by DDP together with it, saved in every checkpoint under
    ``extra_states`` and restored on resume.
``val_fn(model) -> dict``
    Validation metrics of the (unwrapped) detector, in eval mode, called on rank 0 after the epochs
    ``config.val_every`` picks (:func:`resolve_val_every`; always the last); one of its keys is
    ``config.best_metric`` (higher is better, unless the name contains "loss").
``epoch_report(epoch) -> dict``
    Called after each epoch's training steps with its 0-based index; its keys join that epoch's metrics.jsonl
    line (``distill`` adds ``distill_diagnostics``).
``metadata``
    Put into every checkpoint's metadata (e.g. ``kind``, the cache's config hash) next to the epoch, the
    epoch's metrics and the history the trainer adds itself.

Run folder: ``config.json``, ``metrics.jsonl`` (one line per finished epoch), ``last.pt`` every epoch,
``best.pt`` when ``best_metric`` improves, ``tensorboard/`` when tensorboard is installed. All writes are atomic
and ``metrics.jsonl`` is rewritten from the history stored in ``last.pt``, so a killed run resumed with
``resume=True`` has exactly one metrics line per epoch.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from comoto_cli.config import OptimConfig, TrainConfig
from comoto_cli.data.datasets import make_loader, make_sampler, move_batch
from comoto_cli.engine import distributed
from comoto_cli.errors import CheckpointError, ComotoError, UsageError
from comoto_cli.networks.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from comoto_cli.utils.atomic import ensure_writable_dir, write_json_atomic, write_text_atomic
from comoto_cli.utils.system import loader_workers

LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
GRAD_SCALER_KEY = "grad_scaler"


@dataclass
class StepContext:
    """What an ``extra_loss`` may need about the current step."""

    epoch: int                      # 0-based epoch index
    step: int                       # 0-based global step (across epochs)
    step_in_epoch: int
    model: nn.Module                # the unwrapped detector being trained
    extra_modules: nn.ModuleDict    # the trainable extra modules (same objects the optimiser updates)
    device: torch.device
    generator: torch.Generator      # CPU generator seeded from (seed, rank, step)
    config: TrainConfig


ExtraLoss = Callable[[dict, dict[str, Tensor], Tensor, StepContext], dict[str, Tensor]]


class TrainStep(nn.Module):
    """Detector + extra modules, whose ``forward`` computes every loss term of one step.

    DDP synchronises the gradients of parameters used inside the wrapped module's ``forward``; routing
    ``forward_train`` and the extra loss through this module is what makes the detector and the extra modules
    train identically on every rank.
    """

    def __init__(self, model: nn.Module, extra_modules: nn.ModuleDict, extra_loss: ExtraLoss | None):
        super().__init__()
        self.model = model
        self.extra_modules = extra_modules
        self.extra_loss = extra_loss

    def forward(self, batch: dict, ctx: StepContext) -> dict[str, Tensor]:
        losses, features = self.model.forward_train(batch["images"], batch["targets"])
        losses = dict(losses)
        if self.extra_loss is not None:
            extra = self.extra_loss(batch, losses, features, ctx)
            clash = set(extra) & set(losses)
            if clash:
                raise ValueError(f"extra loss terms {sorted(clash)} clash with the detector's loss names")
            losses.update(extra)
        return losses


# ------------------------------------------------------------------------------------------------ setup helpers
def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, numpy and torch; with ``deterministic``, ask torch for deterministic kernels (warn only
    where none exists, e.g. some CUDA scatter ops) and fix cuBLAS's workspace as its docs require."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] >> 1))
    return generator


def build_optimizer(parameters, optim: OptimConfig) -> torch.optim.Optimizer:
    parameters = [p for p in parameters if p.requires_grad]
    if optim.name == "sgd":
        return torch.optim.SGD(parameters, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    return torch.optim.AdamW(parameters, lr=optim.lr, weight_decay=optim.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, epochs: int):
    """Stepped once per epoch: StepLR(step_size, gamma), cosine annealing to 0 over ``epochs``, or none."""
    if optim.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=optim.step_size, gamma=optim.gamma)
    if optim.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    return None


# Validation split size (volumes for DBT, images for mammography) above which val_every "auto" validates every
# AUTO_VAL_EVERY epochs instead of every epoch: a full pass over BCS-DBT's 1,163 validation volumes (74,000
# slices) takes longer than a training epoch on small data. The last epoch is always validated.
LARGE_VALIDATION = 200
AUTO_VAL_EVERY = 5


def resolve_val_every(value: int | str, validation_size: int) -> int:
    if value != "auto":
        return int(value)
    return AUTO_VAL_EVERY if validation_size > LARGE_VALIDATION else 1


def metric_improved(value, best, metric_name: str) -> bool:
    """Strict improvement; a missing/NaN value never improves, anything beats no best yet."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if best is None:
        return True
    return value < best if "loss" in metric_name else value > best


def _jsonable(value):
    """NaN/inf -> None so metrics.jsonl stays strict JSON."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_metrics(run_dir: Path, history: list[dict]) -> None:
    write_text_atomic(run_dir / METRICS_FILE, "".join(json.dumps(record) + "\n" for record in history))


# ------------------------------------------------------------------------------------------------ state
@dataclass
class Trainee:
    """Everything an optimiser step touches. ``step_module`` is the :class:`TrainStep` over ``model`` and
    ``extras``, DDP-wrapped when distributed; ``parameters`` are those of both (what gradient clipping sees)."""

    model: nn.Module
    extras: nn.ModuleDict
    step_module: nn.Module
    parameters: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    scaler: torch.amp.GradScaler
    use_amp: bool


@dataclass
class RunState:
    """Where a run stands: the first epoch still to train (0-based), one record per finished epoch, best so far."""

    start_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best_value: float | None = None
    best_epoch: int | None = None


def build_trainee(config: TrainConfig, model: nn.Module, extra_modules: dict[str, nn.Module] | None,
                  extra_loss: ExtraLoss | None, env: distributed.DistEnv) -> Trainee:
    """Move the detector and extra modules to the device and build their step module, optimiser, scheduler
    and AMP scaler (enabled only for ``config.amp`` on CUDA)."""
    model.to(env.device)
    extras = nn.ModuleDict(extra_modules or {}).to(env.device)
    step_module: nn.Module = TrainStep(model, extras, extra_loss)
    if env.enabled:
        # Parameters may legitimately get no gradient in a step (layer4 feeds only ImPA/LsKD, which skip
        # lesion-free batches; an LsKD projection before distill_start_epoch): let DDP find them.
        step_module = nn.parallel.DistributedDataParallel(step_module, device_ids=None, find_unused_parameters=True)
    parameters = list(model.parameters()) + list(extras.parameters())
    optimizer = build_optimizer(parameters, config.optim)
    scheduler = build_scheduler(optimizer, config.optim, config.epochs)
    use_amp = bool(config.amp and env.device.type == "cuda")
    return Trainee(model=model, extras=extras, step_module=step_module, parameters=parameters, optimizer=optimizer,
                   scheduler=scheduler, scaler=torch.amp.GradScaler("cuda", enabled=use_amp), use_amp=use_amp)


def save_state(run_dir: Path, trainee: Trainee, run: RunState, record: dict, *, is_best: bool, config: TrainConfig,
               env: distributed.DistEnv, metadata: dict | None) -> None:
    """Write ``best.pt`` (when ``is_best``) and ``last.pt`` for the epoch of ``record`` (the last of
    ``run.history``): weights, optimiser, scheduler, AMP scaler, RNG states and the run's history.

    best.pt first, so that last.pt never claims a best that is not on disk."""
    meta = {**(metadata or {}), "epoch": record["epoch"], "epochs": config.epochs, "metrics": record["val"],
            "losses": record["losses"], "best_metric": config.best_metric, "best_value": run.best_value,
            "best_epoch": run.best_epoch, "history": run.history, "train_config": config.model_dump(mode="json"),
            "world_size": env.world_size, GRAD_SCALER_KEY: trainee.scaler.state_dict() if trainee.use_amp else None}
    model, scheduler = trainee.model, trainee.scheduler
    states = {
        "model_state": model.state_dict(), "model_config": model.config,
        "image_size": tuple(model.image_size), "geometry": model.geometry,
        "optimizer_state": trainee.optimizer.state_dict(),
        "scheduler_state": scheduler.state_dict() if scheduler is not None else None,
        "extra_states": {name: module.state_dict() for name, module in trainee.extras.items()},
        "rng_state": capture_rng_state(),
    }
    if is_best:
        save_checkpoint(run_dir / BEST_CHECKPOINT, metadata=meta, **states)
    save_checkpoint(run_dir / LAST_CHECKPOINT, metadata=meta, **states)


def restore_state(trainee: Trainee, config: TrainConfig, path: Path) -> RunState:
    """Load the checkpoint ``path`` (weights_only) into ``trainee`` and the global RNGs, in place, and return
    where its run stopped. Raises :class:`CheckpointError` when it does not fit this run, :class:`UsageError`
    when ``config.epochs`` would stretch or cut its cosine schedule."""
    state = load_checkpoint(path, map_location="cpu")
    meta = state["metadata"]
    planned = meta.get("epochs")
    if config.optim.scheduler == "cosine" and planned is not None and int(planned) != config.epochs:
        # The stored cosine schedule anneals to 0 at its planned end and then climbs again: going on past it,
        # or stopping short of it, would silently train with a learning rate nobody chose.
        raise UsageError(f"cannot resume: this run's cosine learning-rate schedule was planned for {planned} "
                         f"epochs, not {config.epochs}; resume with --epochs {planned}, or start a new run", path=path)
    try:
        trainee.model.load_state_dict(state["model_state"])
        for name, module in trainee.extras.items():
            module.load_state_dict(state["extra_states"][name])
        trainee.optimizer.load_state_dict(state["optimizer_state"])
        if trainee.scheduler is not None and state.get("scheduler_state") is not None:
            trainee.scheduler.load_state_dict(state["scheduler_state"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"cannot resume: checkpoint does not match this run ({exc})".splitlines()[0],
                              path=path) from None
    if meta.get(GRAD_SCALER_KEY):
        trainee.scaler.load_state_dict(meta[GRAD_SCALER_KEY])
    if state.get("rng_state") is not None:
        restore_rng_state(state["rng_state"])
    start_epoch = int(meta["epoch"])
    return RunState(start_epoch=start_epoch, history=list(meta.get("history", []))[:start_epoch],
                    best_value=meta.get("best_value"), best_epoch=meta.get("best_epoch"))


# ------------------------------------------------------------------------------------------------ one epoch
class LossMeter:
    """Sum and count per loss name over one epoch's steps; a term counts only the steps that produced it."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, losses: dict[str, Tensor]) -> None:
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value.detach())
            self.counts[name] = self.counts.get(name, 0) + 1

    def means(self) -> dict[str, float]:
        return {name: self.sums[name] / self.counts[name] for name in self.sums}


def forward_losses(trainee: Trainee, batch: dict, ctx: StepContext) -> tuple[dict[str, Tensor], Tensor]:
    """Every loss term of one step on ``batch`` (``images`` ``(B, 1, H, W)``, ``targets``, ``rows``, on the
    device) as 0-dim tensors (fp16 ones under AMP) and their 0-dim fp32 total; raises when it is not finite."""
    with torch.autocast(device_type=ctx.device.type, dtype=torch.float16, enabled=trainee.use_amp):
        losses = trainee.step_module(batch, ctx)
    total = sum(value.float() for value in losses.values())
    if not torch.isfinite(total):
        raise ComotoError(f"loss is not finite at epoch {ctx.epoch + 1}, step {ctx.step_in_epoch + 1}: "
                          f"{ {k: float(v) for k, v in losses.items()} }; lower optim.lr or set optim.grad_clip")
    return losses, total


def backward_and_step(trainee: Trainee, total: Tensor, grad_clip: float | None) -> None:
    """Backward of the (AMP-scaled) total, optional clipping of the unscaled gradients, optimiser step."""
    optimizer, scaler = trainee.optimizer, trainee.scaler
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    if grad_clip is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trainee.parameters, grad_clip)
    scaler.step(optimizer)
    scaler.update()


def train_one_epoch(trainee: Trainee, loader, *, epoch: int, step: int, config: TrainConfig,
                    env: distributed.DistEnv, progress) -> tuple[LossMeter, int]:
    """One pass over ``loader`` (0-based ``epoch``, global ``step`` of its first batch), one optimiser step per
    batch. Returns this rank's losses and the global step after the epoch."""
    trainee.step_module.train()
    meter = LossMeter()
    steps = len(loader)
    task = progress.add_task(f"epoch {epoch + 1}/{config.epochs}", total=steps, losses="")
    for step_in_epoch, batch in enumerate(loader):
        batch = move_batch(batch, env.device)
        ctx = StepContext(epoch=epoch, step=step, step_in_epoch=step_in_epoch, model=trainee.model,
                          extra_modules=trainee.extras, device=env.device,
                          generator=step_generator(config.seed, env.rank, step), config=config)
        losses, total = forward_losses(trainee, batch, ctx)
        backward_and_step(trainee, total, config.optim.grad_clip)
        meter.add({**losses, "total": total})
        step += 1
        if (step_in_epoch + 1) % config.log_every == 0 or step_in_epoch + 1 == steps:
            progress.update(task, completed=step_in_epoch + 1, losses=_format_losses(meter.means()))
        else:
            progress.advance(task)
    progress.remove_task(task)  # the epoch's summary line replaces its bar
    return meter, step


def step_scheduler(scheduler: torch.optim.lr_scheduler.LRScheduler | None) -> None:
    """The once-per-epoch learning-rate step (none without a scheduler)."""
    if scheduler is None:
        return
    with warnings.catch_warnings():
        # With AMP, GradScaler skips the steps whose fp16 gradients overflowed (routinely the first ones, and a
        # whole epoch when a tiny train set has one step per epoch); the schedule is per epoch, so torch's
        # "scheduler.step() before optimizer.step()" warning is a false alarm here.
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
        scheduler.step()


# ------------------------------------------------------------------------------------------------ validation
def validates_after(epoch: int, epochs: int, val_every: int) -> bool:
    """Whether 0-based ``epoch`` is validated: every ``val_every`` epochs, and always the last one."""
    return (epoch + 1) % val_every == 0 or epoch + 1 == epochs


def validate(model: nn.Module, val_fn: Callable[[nn.Module], dict] | None, run: RunState, *, epoch: int,
             val_every: int, config: TrainConfig, env: distributed.DistEnv) -> tuple[dict, bool]:
    """Rank 0 validates ``model`` (left in eval mode) after 0-based ``epoch`` when the schedule says so; every
    rank gets the metrics and updates ``run``'s best. Returns (metrics as strict JSON, ``{}`` on an epoch
    without validation; whether they are the best so far)."""
    model.eval()
    validates = val_fn is not None and validates_after(epoch, config.epochs, val_every)
    metrics = val_fn(model) if (validates and env.is_main) else {}
    metrics = _jsonable(distributed.broadcast_object(metrics, env))
    if validates and config.best_metric not in metrics:
        raise UsageError(f"best_metric: '{config.best_metric}' is not a validation metric (available: "
                         f"{', '.join(sorted(metrics))})")
    value = metrics.get(config.best_metric)
    is_best = validates and metric_improved(value, run.best_value, config.best_metric)
    if is_best:
        run.best_value, run.best_epoch = value, epoch + 1
    return metrics, is_best


# ------------------------------------------------------------------------------------------------ logging
def _say(env: distributed.DistEnv, console) -> Callable[..., None]:
    """Print on rank 0 (through ``console`` when given); a no-op elsewhere."""
    if not env.is_main:
        return lambda *args, **kwargs: None
    return console.print if console else print


def _open_tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def _progress(enabled: bool, console=None):
    # Imported here, after seed_everything, as before: importing rich.progress draws from Python's `random`, so
    # moving it to the top would change the RNG state stored in checkpoints of a process that had not imported it.
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[losses]}"), console=console, disable=not enabled, transient=False,
    )


def _format_losses(losses: dict[str, float]) -> str:
    # "total" last even when a term (ImPA, LsKD) first appeared after it, e.g. an epoch whose first batch had
    # no lesion point
    ordered = sorted(losses.items(), key=lambda item: item[0] == "total")
    return " ".join(f"{name} {value:.4f}" for name, value in ordered)


def epoch_record(epoch: int, step: int, lr: float, losses: dict, metrics: dict, run: RunState, is_best: bool,
                 config: TrainConfig, seconds: dict[str, float], report: dict | None = None) -> dict:
    """The epoch's metrics.jsonl line (strict JSON), as also kept in every checkpoint's history; ``report``: the
    ``epoch_report`` hook's keys."""
    return _jsonable({
        "epoch": epoch + 1, "step": step, "lr": lr, "losses": losses, "val": metrics,
        "best_metric": config.best_metric, "best_value": run.best_value, "best_epoch": run.best_epoch,
        "is_best": is_best, "time": seconds, **(report or {}),
    })


def log_epoch(run_dir: Path, writer, say: Callable[..., None], record: dict, history: list[dict],
              config: TrainConfig) -> None:
    """Rank 0, after the checkpoints: metrics.jsonl rewritten from ``history``, TensorBoard scalars, the
    epoch line."""
    write_metrics(run_dir, history)
    epoch = record["epoch"]
    if writer is not None:
        for name, loss in record["losses"].items():
            writer.add_scalar(f"loss/{name}", loss, epoch)
        for name, metric in record["val"].items():
            if isinstance(metric, (int, float)):
                writer.add_scalar(f"val/{name}", metric, epoch)
        writer.add_scalar("lr", record["lr"], epoch)
        writer.flush()
    value = record["val"].get(config.best_metric)
    best_text = "" if value is None else f"  {config.best_metric} {value:.4f}{' (best)' if record['is_best'] else ''}"
    say(f"epoch {epoch}/{config.epochs}  {_format_losses(record['losses'])}{best_text}  "
        f"({record['time']['epoch_s']:.1f} s)")


# ------------------------------------------------------------------------------------------------ the loop
def _train_loader(train_set, config: TrainConfig, env: distributed.DistEnv, loader_share: int):
    """This rank's shard of ``train_set``, reshuffled per epoch by ``sampler.set_epoch``: (sampler, loader)."""
    sampler = make_sampler(train_set, seed=config.seed, shuffle=True, rank=env.rank, world_size=env.world_size)
    loader = make_loader(train_set, batch_size=config.batch_size, sampler=sampler,
                         num_workers=loader_workers(config.num_workers, env.device.type, loaders=loader_share),
                         seed=config.seed, pin_memory=env.device.type == "cuda")
    return sampler, loader


def train(
    config: TrainConfig,
    *,
    model: nn.Module,
    train_set,
    val_fn: Callable[[nn.Module], dict] | None,
    run_dir: str | Path,
    extra_loss: ExtraLoss | None = None,
    extra_modules: dict[str, nn.Module] | None = None,
    resume: bool = False,
    metadata: dict | None = None,
    dist_env: distributed.DistEnv | None = None,
    console=None,
    loader_share: int = 1,
    epoch_report: Callable[[int], dict] | None = None,
) -> dict:
    """Train ``model`` on ``train_set`` for ``config.epochs`` epochs (see the module docstring for the hooks).

    ``train_set`` yields the samples of :mod:`comoto_cli.data.datasets` (``set_epoch`` is called when it has
    one). ``loader_share``: how many loaders share the automatic worker count (distill's mammography batches have
    their own). Returns ``{"run_dir", "epochs", "best_metric", "best_value", "best_epoch", "history", "last",
    "best"}``.
    """
    env = dist_env or distributed.init_distributed()
    run_dir, say = Path(run_dir), _say(env, console)
    if env.is_main:
        ensure_writable_dir(run_dir)
    seed_everything(config.seed, config.deterministic)
    if len(train_set) == 0:
        raise ComotoError("the training set is empty")
    trainee = build_trainee(config, model, extra_modules, extra_loss, env)
    last_path, best_path = run_dir / LAST_CHECKPOINT, run_dir / BEST_CHECKPOINT
    run = RunState()
    if resume and last_path.exists():
        run = restore_state(trainee, config, last_path)
    elif resume:
        say(f"no {last_path} to resume from: starting from scratch")
    if env.is_main:
        write_json_atomic(run_dir / CONFIG_FILE, config.model_dump(mode="json"))
        write_metrics(run_dir, run.history)  # drop lines of epochs that never reached last.pt
    distributed.barrier(env)

    sampler, loader = _train_loader(train_set, config, env, loader_share)
    val_every = resolve_val_every(config.val_every, getattr(val_fn, "size", 0))
    writer = _open_tensorboard(run_dir) if env.is_main else None
    step = run.start_epoch * len(loader)
    with _progress(env.is_main, console) as progress:
        for epoch in range(run.start_epoch, config.epochs):
            epoch_start = time.perf_counter()
            sampler.set_epoch(epoch)
            if hasattr(train_set, "set_epoch"):
                train_set.set_epoch(epoch)
            lr = trainee.optimizer.param_groups[0]["lr"]
            meter, step = train_one_epoch(trainee, loader, epoch=epoch, step=step, config=config, env=env,
                                          progress=progress)
            step_scheduler(trainee.scheduler)
            report = epoch_report(epoch) if epoch_report is not None else None
            mean_losses = distributed.reduce_mean(meter.sums, meter.counts, env)
            val_start = time.perf_counter()
            metrics, is_best = validate(model, val_fn, run, epoch=epoch, val_every=val_every, config=config, env=env)
            seconds = {"train_s": val_start - epoch_start, "val_s": time.perf_counter() - val_start,
                       "epoch_s": time.perf_counter() - epoch_start}
            record = epoch_record(epoch, step, lr, mean_losses, metrics, run, is_best, config, seconds, report)
            run.history.append(record)
            if env.is_main:
                save_state(run_dir, trainee, run, record, is_best=is_best, config=config, env=env, metadata=metadata)
                log_epoch(run_dir, writer, say, record, run.history, config)
            distributed.barrier(env)
    if writer is not None:
        writer.close()
    return {
        "run_dir": str(run_dir), "epochs": config.epochs, "best_metric": config.best_metric,
        "best_value": run.best_value, "best_epoch": run.best_epoch, "history": run.history,
        "last": str(last_path), "best": str(best_path) if best_path.exists() else None,
    }

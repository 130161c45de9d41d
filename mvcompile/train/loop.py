"""The training loop: set up a run (fresh or resumed), train epoch by epoch, save each epoch.

One epoch: the multi-scale sampler plans the batches; each step computes the label-smoothed
cross-entropy, takes an AdamW step, advances the per-step lr schedule and the EMA. After the
epoch the model is validated at the base resolution and the run folder is updated:
``last.pt`` (everything ``--resume`` needs), ``last.safetensors``, ``best.safetensors`` (best
validation accuracy so far), ``metrics.csv`` and ``curves.png``. Library code logs; progress
goes to a :class:`Reporter` supplied by the CLI.
"""

from __future__ import annotations

import gc
import logging
import math
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from mvcompile.calibration.data import few_names
from mvcompile.errors import UserError
from mvcompile.graphs.checkpoints import CLASS_NAMES_KEY, format_class_names
from mvcompile.graphs.mobilevit import MobileViTConfig
from mvcompile.interrupts import (
    Terminated,
    deferred_interrupt,
    raise_if_terminated,
    sigterm_immune_children,
    stop_requested,
)
from mvcompile.train import checkpoint, outputs
from mvcompile.train.data import (
    DataSplit,
    ImageSource,
    eval_item,
    load_data,
    train_item,
    unreadable_images,
    unreadable_images_message,
)
from mvcompile.train.distributed import (
    Dist,
    all_sum,
    barrier,
    broadcast_state,
    gather_objects,
    init_distributed,
)
from mvcompile.train.distributed import shutdown as shutdown_distributed
from mvcompile.train.finetune import load_init_weights
from mvcompile.train.model import MobileViT
from mvcompile.train.options import (
    RECIPE_KEYS,
    TrainOptions,
    changed_options,
    check_run_name,
    odd_option_notes,
    resolve,
)
from mvcompile.train.recipe import EMA, Schedule, default_warmup, make_optimizer, make_scheduler
from mvcompile.train.sampler import Item, MultiScaleBatchSampler, eval_batches, scaled_resolutions

log = logging.getLogger(__name__)


class Reporter(Protocol):
    """Progress callbacks, called on rank 0 only.

    ``note`` (a remark for the user about the options or data) and ``images_checked``
    (progress of the image check before training) are optional: without ``note`` the
    remark is logged as a warning, without ``images_checked`` the check runs silently.
    """

    def epoch_start(self, epoch: int, epochs: int, batches: int) -> None: ...
    def batch_end(self, loss: float, lr: float, resolution: int) -> None: ...
    def epoch_end(self, row: dict) -> None: ...
    def note(self, message: str) -> None: ...
    def images_checked(self, done: int, total: int) -> None: ...


class SilentReporter:
    def epoch_start(self, epoch: int, epochs: int, batches: int) -> None: ...
    def batch_end(self, loss: float, lr: float, resolution: int) -> None: ...
    def epoch_end(self, row: dict) -> None: ...
    def note(self, message: str) -> None: ...
    def images_checked(self, done: int, total: int) -> None: ...


def _note(reporter: Reporter, message: str) -> None:
    """Tell the user ``message``: the reporter's note, or a logged warning if it has none."""
    note = getattr(reporter, "note", None)
    if note is not None:
        note(message)
    else:
        log.warning("%s", message)


class ItemDataset(Dataset):
    """Maps a sampler item (index, resolution, seed) to (image [3,r,r] in [0,1], label)."""

    def __init__(self, source: ImageSource, train: bool, min_scale: float, flip: bool) -> None:
        self.source, self.train, self.min_scale, self.flip = source, train, min_scale, flip

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: Item) -> tuple[torch.Tensor, int]:
        i, res, seed = item
        x = (train_item(self.source, i, res, seed, self.min_scale, self.flip) if self.train
             else eval_item(self.source, i, res))
        return torch.from_numpy(x), self.source.labels[i]


@dataclass
class Run:
    """Everything one training run holds."""

    options: TrainOptions
    dist: Dist
    cfg: MobileViTConfig
    data: DataSplit
    model: nn.Module
    net: nn.Module  # the model, wrapped in DDP when distributed
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: EMA | None
    sampler: MultiScaleBatchSampler
    loader: DataLoader
    val_loader: DataLoader
    run_dir: Path
    start_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"epoch": 0, "val_acc": -1.0})
    init: dict | None = None  # where --init-weights came from, for run.json

    @property
    def export_model(self) -> nn.Module:
        """The weights we publish: the EMA when enabled, else the model."""
        return self.ema.module if self.ema else self.model


@dataclass
class TrainResult:
    run_dir: Path
    history: list[dict]
    best: dict
    model: nn.Module  # the exported (EMA or plain) model at the end, in eval mode
    start_epoch: int = 0  # epochs a resumed run had done before; no training if >= epochs


def train(options: TrainOptions, reporter: Reporter | None = None) -> TrainResult:
    """Train (or resume) and return the run's results. Raises UserError on bad input."""
    d = init_distributed()
    reporter = reporter if reporter is not None and d.is_main else SilentReporter()
    run = None
    try:
        run = prepare(options, d, reporter)
        if run.start_epoch >= options.epochs:
            log.info("%s already finished its %d epochs; nothing to train.", run.run_dir,
                     run.start_epoch)
        for epoch in range(run.start_epoch, options.epochs):
            stop_if_requested(run.dist)
            train_loss, seconds = train_epoch(run, epoch, reporter)
            end_epoch(run, epoch, train_loss, seconds, reporter)
        run.export_model.eval()
        return TrainResult(run.run_dir, run.history, run.best, run.export_model,
                           run.start_epoch)
    except BaseException as err:
        if d.enabled:  # the frames below hold the DDP wrapper: let it go (see below)
            traceback.clear_frames(err.__traceback__)
        raise
    finally:
        # Under torchrun, the DistributedDataParallel wrapper and its reducer's gloo work go
        # before the process group, while the interpreter is whole: left to its shutdown (a
        # stopped run's frames and reference cycles keep them), they can abort the process
        # ("terminate called without an active exception") after the run has stopped and
        # written its files.
        if run is not None and d.enabled:
            run.net = run.model
            gc.collect()
        shutdown_distributed(d)


def prepare(options: TrainOptions, d: Dist, reporter: Reporter | None = None) -> Run:
    """Check the options and run folder; data (every image file checked), model (from
    --init-weights, if given), optimizer, schedule, sampler, loaders; the resumed state, if
    any; then start the run folder's files (run.json) when there is work to do."""
    reporter = reporter if reporter is not None else SilentReporter()
    _check_options(options)
    for message in odd_option_notes(options, cuda=d.device.type == "cuda"):
        _note(reporter, message)
    run_dir = _run_dir(options)
    if d.is_main:
        outputs.check_writable(run_dir)  # before hours of data loading and training
    data = _load_data(options, reporter)
    check_images(data, d, reporter)
    cfg = MobileViTConfig.for_size(options.size, resolution=options.resolution,
                                   patch_config=options.patch_config,
                                   num_classes=len(data.train.classes))
    torch.manual_seed(options.seed + d.rank)
    model = MobileViT(cfg, options.dropout, options.classifier_dropout)
    init = _init_weights(model, options, cfg, data.train.classes, reporter)
    model = model.to(d.device)
    ids = [d.device.index] if d.device.type == "cuda" else None
    net = DistributedDataParallel(model, device_ids=ids) if d.enabled else model
    sampler = _train_sampler(options, cfg, len(data.train), d)
    schedule = _schedule(options, sampler)
    optimizer = make_optimizer(model, options.lr, options.weight_decay)
    run = Run(options, d, cfg, data, model, net, optimizer, make_scheduler(optimizer, schedule),
              EMA(model, options.ema_decay) if options.ema_decay else None, sampler,
              *_loaders(options, cfg, data, sampler, d), run_dir, init=init)
    log.info("%s; %d steps, warm-up %d; resolutions %s", data.description,
             schedule.total_steps, schedule.warmup_steps, sampler.resolutions)
    resumed = None
    if options.resume:
        state = checkpoint.load_checkpoint(options.resume, _model_config(run), d.device)
        _restore(run, state)
        resumed = _resume_record(state, options)
    if d.is_main and run.start_epoch < options.epochs:
        _start_run_folder(run, resumed)
    return run


def _load_data(o: TrainOptions, reporter: Reporter) -> DataSplit:
    """The data split, with the training images cut to --subset (a note if it is too big)."""
    data = load_data(o.data, o.val_split)
    if o.subset is not None and o.subset < len(data.train):
        return replace(data, train=_subset(data.train, o.subset, o.seed),
                       subset_of=len(data.train))
    if o.subset is not None and o.subset > len(data.train):
        _note(reporter, f"--subset {o.subset} is more than the {len(data.train)} training "
                        "images; the whole training set is used.")
    return data


def check_images(data: DataSplit, d: Dist, reporter: Reporter) -> None:
    """Open every image file of the run (training and validation) before training; one
    UserError lists those that cannot be read. Under torchrun each process checks its share
    and all raise the same error."""
    files = data.train.files() + data.val.files()
    if not files:
        return
    mine = files[d.rank::d.world_size]
    progress = getattr(reporter, "images_checked", lambda done, total: None)
    progress(0, len(mine))

    def checked(done: int) -> None:
        progress(done, len(mine))
        stop_if_requested(d, collective=False)

    started = time.perf_counter()
    bad = unreadable_images(mine, checked)
    bad = sorted(b for part in gather_objects(d, bad) for b in part)
    log.info("Checked %d image files in %.1f s", len(files), time.perf_counter() - started)
    if bad:
        raise UserError(unreadable_images_message(bad, len(files)))


def _init_weights(model: nn.Module, o: TrainOptions, cfg: MobileViTConfig,
                  class_names: list[str], reporter: Reporter) -> dict | None:
    """Load --init-weights into ``model``; its run.json record, or None without it. A resumed
    run's weights come from its checkpoint, so there it only keeps the record."""
    if o.init_weights is None or o.resume:
        return None
    loaded = load_init_weights(model, o.init_weights, cfg, o.patch_config, class_names)
    for message in loaded.notes:
        _note(reporter, message)
    return loaded.record()


def _check_options(o: TrainOptions) -> None:
    if o.epochs < 1 or o.batch_size < 1:
        raise UserError("--epochs and --batch-size must be at least 1.")
    if o.subset is not None and o.subset < 1:
        raise UserError(f"--subset must be at least 1, got {o.subset}.")
    if not o.lr > 0.0:
        raise UserError(f"--lr must be positive, got {o.lr}.")
    if o.crop_scale is not None and not 0.0 < o.crop_scale <= 1.0:
        raise UserError(f"--crop-scale must be in (0, 1], got {o.crop_scale}.")
    if o.ema_decay is not None and not 0.0 < o.ema_decay < 1.0:
        raise UserError(f"--ema-decay must be in (0, 1), got {o.ema_decay}.")
    check_run_name(o.name, o.runs_dir)
    # --overwrite with --resume under another --name clears that folder (_start_run_folder)
    if o.resume and o.overwrite and _resumes_in_place(o):
        raise UserError(f"--resume and --overwrite contradict each other: --resume continues "
                        f"the run in {o.run_dir()}, --overwrite starts it over. Drop one.")


def _resumes_in_place(o: TrainOptions) -> bool:
    """Whether --resume continues the run in its own folder (not under another --name)."""
    return o.run_dir().resolve() == resolve(o.resume).parent.resolve()


def _subset(source: ImageSource, n: int, seed: int) -> ImageSource:
    g = torch.Generator().manual_seed(seed)
    keep = torch.randperm(len(source), generator=g)[:n].sort().values.tolist()
    return source.subset(keep)


def _run_dir(o: TrainOptions) -> Path:
    """The run folder; UserError if a fresh run would mix its files with an earlier run's."""
    run_dir = o.run_dir()
    continuing = o.resume and _resumes_in_place(o)
    if continuing or o.overwrite:
        return run_dir
    earlier = outputs.earlier_outputs(run_dir)
    if checkpoint.LAST in earlier:
        raise UserError(f"{run_dir} already holds a run. Continue it with --resume {run_dir}, "
                        "start over with --overwrite, or choose another --name.")
    if earlier:
        raise UserError(f"{run_dir} holds files of an earlier run ({', '.join(earlier)}). "
                        "Start over with --overwrite (which deletes them), or choose another "
                        "--name.")
    return run_dir


def _start_run_folder(run: Run, resumed: dict | None) -> None:
    """Write run.json for the options in force: a fresh run records no resumes, a resumed one
    adds itself to the earlier ones. With --overwrite, a folder that does not hold the run
    being resumed is cleared first; a run resumed under another --name starts with the
    earlier run's best weights (its best epoch so far)."""
    earlier = resolve(run.options.resume).parent if resumed is not None else None
    moved = earlier is not None and not _resumes_in_place(run.options)
    if run.options.overwrite and (earlier is None or moved):
        outputs.clear_run_files(run.run_dir)
    init, resumes = run.init, []
    if earlier is not None:
        resumes = [*outputs.read_resumes(earlier), resumed]
        init = outputs.read_init_weights(earlier)
        if moved:
            outputs.copy_best(earlier, run.run_dir)
    outputs.write_run_info(run.run_dir, run.options, run.cfg, run.data, resumes, init)


def _resume_record(state: dict, options: TrainOptions) -> dict:
    """For run.json: where the run was resumed from, after which epoch, what changed."""
    return {"from": str(resolve(options.resume)), "after_epoch": state["epoch"],
            "changed": changed_options(state["options"], options)}


def _train_sampler(o: TrainOptions, cfg: MobileViTConfig, n: int, d: Dist
                   ) -> MultiScaleBatchSampler:
    sizes = scaled_resolutions(o.resolution, cfg.patch_sizes) if o.multiscale else (
        o.resolution,)
    if n < d.world_size:
        raise UserError(f"{n} training images cannot be shared by {d.world_size} processes.")
    return MultiScaleBatchSampler(n, o.batch_size, o.resolution, sizes, seed=o.seed,
                                  rank=d.rank, world_size=d.world_size)


def _schedule(o: TrainOptions, sampler: MultiScaleBatchSampler) -> Schedule:
    """T = Σ_epochs batches per epoch (exact: the sampler's plan is deterministic)."""
    total = sum(sampler.num_batches(e) for e in range(o.epochs))
    warmup = o.warmup_steps if o.warmup_steps is not None else default_warmup(total)
    return Schedule(total, min(warmup, total), o.lr, o.lr_init, o.lr_min)


def stop_if_requested(d: Dist, collective: bool = True) -> None:
    """Raise :class:`Terminated` if a SIGTERM asked this process to stop
    (:func:`mvcompile.interrupts.sigterm_as_stop_request`). Under torchrun, ``collective``
    checks make the ranks agree (one all-reduce: stop if any rank was asked), so that none is
    left waiting in a collective for a rank that stopped; call them where every rank passes
    the same number of times. Other checks do nothing under torchrun."""
    if not d.enabled:
        raise_if_terminated()
    elif collective and all_sum(d, torch.tensor([float(stop_requested())]))[0]:
        raise Terminated


class WorkersKeepRunning(DataLoader):
    """A DataLoader whose worker processes start with SIGTERM blocked
    (:func:`mvcompile.interrupts.sigterm_immune_children`): a SIGTERM to the process group
    stops the main process, which then shuts the workers down, instead of killing them under
    it. A SIGTERM never cuts the start of an iterator in half, and workers left running at
    exit are killed."""

    def __iter__(self):  # noqa: ANN204 - DataLoader's iterator type is private
        with sigterm_immune_children():
            return super().__iter__()


def _loaders(o: TrainOptions, cfg: MobileViTConfig, data: DataSplit,
             sampler: MultiScaleBatchSampler, d: Dist) -> tuple[DataLoader, DataLoader]:
    scale = o.crop_scale if o.crop_scale is not None else data.train.crop_scale
    flip = o.flip if o.flip is not None else data.train.flip
    pin = d.device.type == "cuda"
    train = WorkersKeepRunning(ItemDataset(data.train, True, scale, flip),
                               batch_sampler=sampler, num_workers=o.workers, pin_memory=pin)
    val_batches = eval_batches(len(data.val), o.batch_size, cfg.resolution, rank=d.rank,
                               world_size=d.world_size)
    val = WorkersKeepRunning(ItemDataset(data.val, False, 1.0, False),
                             batch_sampler=val_batches, num_workers=o.workers, pin_memory=pin)
    return train, val


def _model_config(run: Run) -> dict:
    return {"size": run.cfg.size, "patch_config": run.options.patch_config,
            "num_classes": run.cfg.num_classes}


def train_epoch(run: Run, epoch: int, reporter: Reporter) -> tuple[float, float]:
    """One pass over the training set; returns (mean training loss over ranks, seconds)."""
    o, d = run.options, run.dist
    run.sampler.set_epoch(epoch)
    run.net.train()
    reporter.epoch_start(epoch + 1, o.epochs, len(run.sampler))
    sums = torch.zeros(2, dtype=torch.float64)
    start = time.perf_counter()
    for x, y in run.loader:
        x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
        with torch.autocast(d.device.type, torch.bfloat16, enabled=o.amp and x.is_cuda):
            loss = F.cross_entropy(run.net(x), y, label_smoothing=o.label_smoothing)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        lr = run.optimizer.param_groups[0]["lr"]
        run.scheduler.step()
        if run.ema:
            run.ema.update(run.model)
        value = loss.item()
        sums += torch.tensor([value * len(y), len(y)], dtype=torch.float64)
        reporter.batch_end(value, lr, x.shape[-1])
        stop_if_requested(d)  # a SIGTERM stops the run here (mvcompile.interrupts)
    broadcast_state(d, run.model, buffers_only=True)
    if run.ema:
        broadcast_state(d, run.ema.module)
    total = all_sum(d, sums)
    return float(total[0] / total[1]), time.perf_counter() - start


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, d: Dist) -> tuple[float, float]:
    """(mean cross-entropy, top-1 accuracy) over the whole validation set, all ranks."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)
    for x, y in loader:
        stop_if_requested(d, collective=False)
        logits = model(x.to(d.device)).float()
        y = y.to(d.device)
        sums += torch.tensor([F.cross_entropy(logits, y, reduction="sum").item(),
                              (logits.argmax(1) == y).sum().item(), len(y)], dtype=torch.float64)
    total = all_sum(d, sums)
    return float(total[0] / total[2]), float(total[1] / total[2])


def end_epoch(run: Run, epoch: int, train_loss: float, seconds: float,
              reporter: Reporter) -> None:
    """Validate, update best, write the run folder (rank 0), keep ranks in step. A training
    loss that is not finite (the same on every rank) stops the run before anything of this
    epoch is written, so the run folder keeps the last good epoch."""
    if not math.isfinite(train_loss):
        raise UserError(_diverged_message(run, epoch, train_loss))
    val_loss, val_acc = evaluate(run.model, run.val_loader, run.dist)
    ema_acc = evaluate(run.ema.module, run.val_loader, run.dist)[1] if run.ema else None
    row = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss,
           "val_acc": val_acc, "ema_val_acc": ema_acc,
           "lr": run.optimizer.param_groups[0]["lr"], "seconds": seconds}
    run.history.append(row)
    score = ema_acc if ema_acc is not None else val_acc
    improved = score > run.best["val_acc"]
    if improved:
        run.best = {"epoch": epoch + 1, "val_acc": score}
    rng = gather_objects(run.dist, _rng_state())
    if run.dist.is_main:
        # A Ctrl-C or SIGTERM waits for the epoch's files: between last.safetensors and last.pt
        # it left the weights and metrics one epoch ahead of the checkpoint.
        with deferred_interrupt(), outputs.writing(run.run_dir):  # OSError: a clean error
            outputs.write_epoch(run.run_dir, run.export_model, _metadata(run), improved,
                                run.history)
            checkpoint.save_checkpoint(run.run_dir / checkpoint.LAST, _state(run, epoch, rng))
    barrier(run.dist)
    reporter.epoch_end(row)


def _diverged_message(run: Run, epoch: int, train_loss: float) -> str:
    saved = (f" Epoch {epoch} is saved in {run.run_dir}; `--resume {run.run_dir} --lr ...` "
             "continues from it with a lower rate." if epoch > 0 else
             " No epoch was saved.")
    amp = " or without --amp" if run.options.amp else ""
    return (f"Training diverged: the mean training loss of epoch {epoch + 1} is {train_loss}. "
            f"The learning rate (--lr {run.options.lr:g}) may be too high; try a lower one"
            f"{amp}.{saved}")


def _metadata(run: Run) -> dict[str, str]:
    """The .safetensors header entries that ``mvcompile build --weights`` reads back; the class
    names as a JSON list, since folder names may contain commas."""
    return {"mvcompile.size": run.cfg.size, "mvcompile.patch_config": run.options.patch_config,
            "mvcompile.num_classes": str(run.cfg.num_classes),
            "mvcompile.resolution": str(run.cfg.resolution),
            CLASS_NAMES_KEY: format_class_names(run.data.train.classes)}


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _state(run: Run, epoch: int, rng: list[dict]) -> dict:
    return {"model_config": _model_config(run), "options": asdict(run.options),
            "classes": list(run.data.train.classes),
            "epoch": epoch + 1, "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
            "ema": run.ema.state_dict() if run.ema else None, "rng": rng,
            "history": run.history, "best": run.best}


def _use_options_rates(run: Run) -> None:
    """Give the optimizer the learning rates and weight decay of the options in force, which
    ``--resume`` may have changed: the checkpoint's optimizer and scheduler states bring back
    the old weight decay and peak rate, which LambdaLR would multiply by the new schedule's
    factor. At step t, lr = lr_max · factor(t) = the new schedule's lr(t)."""
    lr_max, step = run.options.lr, run.scheduler.last_epoch
    run.scheduler.base_lrs = [lr_max] * len(run.optimizer.param_groups)
    for group, factor in zip(run.optimizer.param_groups, run.scheduler.lr_lambdas, strict=True):
        group.update(initial_lr=lr_max, lr=lr_max * factor(step),
                     weight_decay=run.options.weight_decay)


def _restore(run: Run, state: dict) -> None:
    """Continue exactly where the checkpoint stopped; warn if the recipe changed."""
    saved_classes = state.get("classes")  # absent from checkpoints before 2026-11-22
    if saved_classes is not None and saved_classes != list(run.data.train.classes):
        raise UserError(f"The run in {run.options.resume} was trained on the classes "
                        f"{few_names(saved_classes)}, and --data {run.options.data} has "
                        f"{few_names(run.data.train.classes)}: pass the run's own data "
                        "folder, or start a new run from its weights with --init-weights.")
    changed = changed_options(state["options"], run.options)
    recipe = [k for k in RECIPE_KEYS if k in changed]
    if recipe and state["epoch"] < run.options.epochs:  # else nothing is trained
        log.warning("Resuming with changed options (%s): the run will not reproduce an "
                    "uninterrupted one.", ", ".join(
                        f"{k} {changed[k][0]!r} -> {changed[k][1]!r}" for k in recipe))
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    _use_options_rates(run)
    if run.ema and state["ema"]:
        run.ema.load_state_dict(state["ema"])
    rng = state["rng"]
    if len(rng) == run.dist.world_size:
        torch.set_rng_state(rng[run.dist.rank]["torch"].cpu())
        if "cuda" in rng[run.dist.rank] and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng[run.dist.rank]["cuda"].cpu())
    else:
        log.warning("The checkpoint comes from %d processes, this run has %d: random "
                    "streams restart.", len(rng), run.dist.world_size)
    run.start_epoch, run.history, run.best = state["epoch"], state["history"], state["best"]
    log.info("Resumed %s after epoch %d of %d.", run.run_dir, run.start_epoch,
             run.options.epochs)

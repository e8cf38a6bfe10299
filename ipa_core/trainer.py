"""One training loop for every model in the toolkit (VAE, IPA partial encoder, AVP classifier).

A model plugs in as a :class:`TrainTask`; :func:`fit` does the rest:

- AdamW with linear warmup, EMA weights, gradient clipping, and update skipping on non-finite or
  huge gradient norms with a rule that cannot deadlock (:mod:`ipa_core.skip_rule`);
- ``run_dir/metrics.jsonl`` (+ tqdm and ``run_dir/train.log``), sample grids in
  ``run_dir/samples/``, test metrics in ``run_dir/eval.json``, the final (EMA) model in
  ``run_dir/model/``;
- atomic, ``weights_only``-loadable checkpoints in ``run_dir/checkpoints/`` (:mod:`ipa_core.checkpoint`)
  holding model, EMA, optimizer, step, every RNG state and the provenance of the run: rerunning
  the same command resumes exactly where it stopped (the data order is a pure function of the
  step, :mod:`ipa_core.batch_order`); a rerun whose seed, batch size, learning rate, data, world
  size or task settings differ is refused with the first differing field, and
  ``TrainConfig(restart=True)`` (``--restart``) moves the old run aside and starts over;
- multi-process data parallel training when started by ``torchrun`` (gloo on CPU, NCCL on CUDA):
  rank 0 reads the checkpoint and broadcasts it, rank 0 writes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from xray.errors import UserError
from xray.io import atomic_write_json, ensure_writable_dir, remove_temp_files, run_lock
from xray.provenance import check_same, move_aside

from . import distributed as dist_utils
from .batch_order import BatchOrder, check_batch, data_order_key, fetch_batch, iterate_batches
from .checkpoint import (CKPT_DIR, CKPT_FORMAT, KEEP_CKPTS, checkpoint_paths, config_dict, load_latest_checkpoint,
                         merge_model_config, read_provenance, rng_state, save_checkpoint, set_rng_state, train_provenance)
from .ema import EMA, ema_copy
from .memory import release_freed_memory
from .image_grid import save_image_grid
from .metric_log import MetricLog, log_file, truncate_metrics
from .skip_rule import SkipRule
from .train_config import RESULT_FIELDS, TrainConfig, TrainTask, add_train_args, train_config_from_args, warmup_lr

__all__ = ["fit", "TrainConfig", "TrainTask", "RESULT_FIELDS", "add_train_args", "train_config_from_args", "warmup_lr",
           "make_optimizer", "train_step", "SkipRule", "BatchOrder", "fetch_batch", "iterate_batches", "check_batch", "EMA", "ema_copy", "save_image_grid",
           "checkpoint_paths", "load_latest_checkpoint", "check_resume_settings", "save_checkpoint", "read_provenance", "train_provenance",
           "CKPT_DIR", "CKPT_FORMAT", "KEEP_CKPTS"]

log = logging.getLogger(__name__)


def fit(task: TrainTask, train_set, cfg: TrainConfig, run_dir: str | os.PathLike, test_set=None) -> nn.Module:
    """Train ``task.model`` on ``train_set``; resume from ``run_dir`` if it holds checkpoints.

    Returns the EMA model (the raw model when ``cfg.ema_rate`` is None). Under ``torchrun`` every
    process calls this unchanged; rank 0 writes the files.
    """
    run_dir = Path(run_dir)
    if len(train_set) == 0:
        raise UserError("the training set is empty; check --data/--data-root")
    with dist_utils.process_group(cfg.device) as ctx, contextlib.ExitStack() as held:
        # validated before anything is moved or created
        order = BatchOrder(len(train_set), cfg.batch_size, cfg.seed, ctx.rank, ctx.world, data_order_key(train_set))
        if ctx.rank == 0:  # one training per run folder: a second one is refused before it writes anything
            if cfg.restart and run_dir.exists():
                held.enter_context(run_lock(run_dir))  # never move aside a folder another training is writing
                moved = move_aside(run_dir)  # the held lock moves with it; the new folder gets its own below
                log.warning("--restart: moved the old run %s aside to %s", run_dir, moved)
            held.enter_context(run_lock(run_dir))  # held for the whole training, released on exit or kill
        dist_utils.barrier()
        if ctx.rank != 0:
            return _fit(task, train_set, cfg, run_dir, test_set, order, ctx)
        ensure_writable_dir(run_dir)
        with log_file(run_dir):
            return _fit(task, train_set, cfg, run_dir, test_set, order, ctx)


def _fit(task, train_set, cfg: TrainConfig, run_dir: Path, test_set, order: BatchOrder, ctx) -> nn.Module:
    rank, world, device = ctx.rank, ctx.world, ctx.device
    model: nn.Module = task.model
    generator = torch.Generator(device=device)
    generator.manual_seed(cfg.seed * 1_000_003 + rank)
    torch.manual_seed(cfg.seed)  # identical initialisation of anything a task draws globally
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)

    # resume (the checkpoint must have been made the same way) or start fresh
    state = _load_on_rank0(run_dir, rank, state_check(model, task, cfg))
    if state is not None:
        merge_model_config(model, state.get("model_config"))
    elif hasattr(task, "prepare"):
        task.prepare(train_set, torch.Generator().manual_seed(cfg.seed))
    provenance = train_provenance(cfg, world, train_set, task)
    if state is not None:
        check_same(f"checkpoint {state['path']}", state["provenance"], provenance, flags=TRAIN_FLAGS,
                   hint=f"resume with the same settings and data, or pass --restart to move {run_dir} aside and start over")

    if device.type == "cpu" and any(getattr(m, "checkpointing", False) for m in model.modules()):
        release_freed_memory()  # memory-bound runs: peak RSS follows the live tensors (see ipa_core.memory)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    params = list(task.trainable_parameters())
    if not params:
        raise UserError("the task has no trainable parameters")
    # DDP broadcasts rank 0's weights when it wraps the model: wrap before the EMA copy is taken
    train_model = dist_utils.wrap_ddp(model, device, getattr(task, "find_unused_parameters", False)) if world > 1 else model
    ema = ema_copy(model, params) if cfg.ema_rate is not None else None
    opt = make_optimizer(params, cfg)
    skip = SkipRule.from_config(cfg)
    step, readable = 0, []  # readable: steps of the checkpoints known to load (pruning keeps the newest)
    metrics_path = run_dir / "metrics.jsonl"

    if state is not None and int(state["step"]) > cfg.steps:  # before anything is written: train_config.json stays true
        raise UserError(f"{run_dir} is already trained to step {int(state['step'])}, more than --steps {cfg.steps}; pass "
                        f"--steps {int(state['step'])} or more to keep it (or train on), or --restart to start over")
    if state is not None:
        step = _restore(state, model, ema, opt, skip, order, generator, rank)
        readable = [step]
        if rank == 0:
            log.info("resumed from %s at step %d", state["path"], step)
            truncate_metrics(metrics_path, step)
        del state
    elif rank == 0:
        truncate_metrics(metrics_path, 0)  # a fresh start in a used folder: no rows of an unreadable run
    if rank == 0:
        remove_killed_writes(run_dir)

    model.train()
    out_model = ema if ema is not None else model
    ema_updater = EMA(ema, model, cfg.ema_rate) if ema is not None else None

    def checkpoint() -> None:
        rng = dist_utils.gather_objects(rng_state(generator))
        if rank == 0:
            epoch, pos = order.position(step)  # where the next batch comes from
            path = save_checkpoint(run_dir, {
                "format": CKPT_FORMAT, "step": step, "world": world, "provenance": provenance,
                "model": model.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                "optimizer": opt.state_dict(), "skip": skip.state_dict(), "data": {"epoch": epoch, "pos": pos, "batch": step},
                "rng": rng, "model_config": config_dict(model), "train_config": cfg.to_dict(),
            }, readable)
            log.debug("wrote %s", path)
        dist_utils.barrier()

    def sample(step_: int) -> None:
        if rank == 0:
            with torch.no_grad():
                was = out_model.training
                out_model.eval()
                task.on_sample(out_model, step_, run_dir / "samples" / f"step-{step_:08d}.png")
                out_model.train(was)
        dist_utils.barrier()

    if rank == 0:  # only after the provenance check: the record never contradicts the checkpoints
        atomic_write_json(run_dir / "train_config.json", {k: v for k, v in cfg.to_dict().items() if k != "restart"})
        log.info("training %s: %d trainable parameters, %d %s, %d process(es) x batch %d, device %s, steps %d -> %d",
                 type(model).__name__, sum(p.numel() for p in params), len(train_set), getattr(train_set, "item_name", "images"),
                 world, cfg.batch_size, device, step, cfg.steps)
    mlog = MetricLog(metrics_path if rank == 0 else None)
    bar = tqdm(total=cfg.steps, initial=step, disable=None if rank == 0 else True, desc="train", dynamic_ncols=True)
    t_last, imgs, start_step = time.perf_counter(), 0, step
    try:
        # global batch k is a pure function of k: batch `step` is the next one, with or without workers
        for images, labels, idx in iterate_batches(train_set, order, step, cfg.steps - step, cfg.num_workers):
            check_batch(images, labels, np.asarray(idx))
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            lr = warmup_lr(step, cfg)
            loss, metrics, norm, threshold, skipped = train_step(task, train_model, params, opt, (images, labels), generator,
                                                                 lr, cfg, skip, ema_updater, world)
            if skipped and rank == 0 and (skip.skipped <= 10 or skip.skipped % 100 == 0):
                log.warning("step %d: update skipped (gradient norm %.4g, threshold %.4g; %d skipped so far)",
                            step + 1, norm, threshold, skip.skipped)
            epoch = order.position(step)[0]  # the epoch of the batch just used
            step += 1
            imgs += len(images)
            mlog.add({"loss": loss.detach(), "grad_norm": norm if math.isfinite(norm) else 0.0, **metrics})
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                row = mlog.flush({"step": step, "lr": lr, "skipped": skip.skipped, "epoch": epoch,
                                  "images_per_s": imgs * world / max(now - t_last, 1e-9), "time": time.time()})
                t_last, imgs = now, 0
                bar.set_postfix(loss=f"{row['loss']:.4f}", gnorm=f"{row['grad_norm']:.1f}", skip=skip.skipped)
                if rank == 0:
                    log.info("step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in row.items() if k not in ("step", "time")))
            if step % cfg.sample_every == 0:
                sample(step)
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                checkpoint()
    finally:
        bar.close()
    if step % cfg.sample_every and step > start_step:
        sample(step)  # the final model's samples too

    if rank == 0:
        check_finite_weights(out_model, f"the model after step {step}")  # a NaN model is never saved as the result
        task.save_pretrained(out_model, run_dir / "model")
        if test_set is not None and len(test_set):
            with torch.no_grad():
                results = task.evaluate(out_model, test_set)
            atomic_write_json(run_dir / "eval.json", {"step": step, **results})
            log.info("test metrics at step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in results.items()))
    dist_utils.barrier()
    return out_model


# The flag that sets each provenance field a resume compares (the refusal names the flag).
TRAIN_FLAGS = {"train.seed": "--seed", "train.batch_size": "--batch-size", "train.lr": "--lr", "train.warmup": "--warmup",
               "train.weight_decay": "--weight-decay", "train.ema_rate": "--ema-rate", "train.grad_clip": "--grad-clip",
               "train.skip_threshold": "--skip-threshold", "train.amp": "--amp",
               "world": "the number of processes (torchrun --nproc-per-node)"}


def check_resume_settings(run_dir: str | os.PathLike, cfg: TrainConfig, world: int = 1) -> None:
    """Before any data is opened or model built: a rerun into a run folder whose checkpoints were
    made with other training settings or another number of processes is refused in one line naming
    the flag (from ``provenance.json``), so a refused resume prepares no data cache. :func:`fit`
    checks everything again (data, task, model) against the checkpoint itself."""
    old = read_provenance(Path(run_dir))
    if old is None or cfg.restart:
        return
    check_same(f"the run in {run_dir}", {"train": old.get("train", {}), "world": old.get("world")},
               {"train": cfg.provenance(), "world": world}, flags=TRAIN_FLAGS,
               hint=f"resume with the same settings, or pass --restart to move {run_dir} aside and start over")


DIVERGED = "training diverged: {what} has non-finite weights ({name}); nothing was saved as the model; lower --lr (or set --grad-clip) and rerun with --restart"
DAMAGED = "{what} has non-finite weights ({name}): the weights file is damaged; copy it again or retrain the model"


def check_finite_weights(model: nn.Module, what: str, message: str = DIVERGED) -> None:
    """One-line :class:`UserError` (``message`` with ``{what}`` and the first bad tensor's ``{name}``)
    when a parameter or buffer of ``model`` holds NaN or infinity: a diverged training run
    (:data:`DIVERGED`) or a loaded weights file with flipped bytes (:data:`DAMAGED`)."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UserError(message.format(what=what, name=name))


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The trainer's AdamW. foreach: one kernel per op over all tensors (PyTorch only picks it
    itself on CUDA); its temporaries come after the backward, below the step's memory peak."""
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, foreach=True)


def train_step(task, model: nn.Module, params: list[nn.Parameter], opt: torch.optim.Optimizer, batch: tuple, generator,
               lr: float, cfg: TrainConfig, skip: SkipRule, ema_updater: EMA | None, world: int = 1) -> tuple:
    """One optimiser step of :func:`fit` (also what ``benchmarks/bench_vae.py --memory`` measures):
    loss, backward, clipping, the skip rule, AdamW, EMA. Returns ``(loss, metrics, norm,
    threshold, skipped)``; ``norm`` is the pre-clip gradient norm (NaN when the loss is not finite).

    Memory: the last step's gradients are dropped before the forward, so they never sit beside
    its activations; the new ones live until the next call."""
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    device = batch[0].device
    with _autocast(device, cfg.amp):
        loss, metrics = task.loss(model, batch, generator)
    loss.backward()  # even when non-finite: under DDP every rank must join the all-reduce
    norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf, foreach=True))
    if not math.isfinite(float(loss.detach())):
        norm = math.nan
    norm = dist_utils.max_scalar(norm) if world > 1 else norm  # same skip decision on every rank
    threshold = skip.current_threshold()
    skipped = skip(norm)
    if not skipped:
        opt.step()
        if ema_updater is not None:
            ema_updater.update()
    return loss.detach(), metrics, norm, threshold, skipped


def remove_killed_writes(run_dir: Path) -> None:
    """Temp files and folders a kill during a write left in a run folder (``.*.tmp`` beside the
    records, in ``checkpoints/`` and ``samples/``; ``.model.*`` of an interrupted model save). Only
    the training holding the run lock calls it, so no live write is touched; the model is saved
    again at the end of the run."""
    for folder in (run_dir, run_dir / CKPT_DIR, run_dir / "samples"):
        remove_temp_files(folder)
    for d in run_dir.glob(".model.*"):
        if d.is_dir():
            shutil.rmtree(d, ignore_errors=True)


_STATE_KEYS = ("step", "world", "provenance", "model", "ema", "optimizer", "skip", "data", "rng", "model_config")
_ADAMW_STATE = {"step", "exp_avg", "exp_avg_sq"}
_RNG_KEYS = {"torch": None, "generator": None, "cuda": None, "numpy": {"keys", "pos", "has_gauss", "gauss"},
             "python": {"version", "internal", "gauss_next"}}


def _same_keys(what: str, have, want) -> None:
    if not isinstance(have, dict):
        raise ValueError(f"{what} is a {type(have).__name__}, not a dict")
    if set(have) != set(want):
        odd = sorted(map(str, set(have) ^ set(want)))
        raise ValueError(f"{what} has other entries than the trainer writes ({', '.join(odd[:2])})")


def state_check(model: nn.Module, task, cfg: TrainConfig):
    """``check(state)`` for :func:`load_latest_checkpoint`: raise ``ValueError`` when a checkpoint
    (one without a digest) holds other entries, key names or tensor shapes than this training
    writes and reads, so a damaged name is a fallback, not a ``load_state_dict`` traceback. A
    different model config is left to :func:`merge_model_config` (a refusal, not damage)."""
    current = config_dict(model)
    tensors = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    skip_keys = SkipRule.from_config(cfg).state_dict().keys()
    task_keys = task.provenance().keys() if callable(getattr(task, "provenance", None)) else None

    def check(state: dict) -> None:
        try:
            _check(state)
        except (KeyError, TypeError, AttributeError, IndexError) as e:
            raise ValueError(f"unexpected contents ({type(e).__name__}: {str(e)[:80]})") from None

    def _check(state: dict) -> None:
        _same_keys("the checkpoint", {k: 0 for k in state if k in _STATE_KEYS or k in ("format", "train_config")},
                   {k: 0 for k in (*_STATE_KEYS, "format", "train_config")})
        _same_keys("its data position", state["data"], ("epoch", "pos", "batch"))
        _same_keys("its skip rule", state["skip"], skip_keys)
        prov = state["provenance"]
        _same_keys("its provenance", prov, ("train", "world", "data", "task"))
        _same_keys("its provenance's training settings", prov["train"], cfg.provenance())
        _same_keys("its provenance's data", prov["data"], ("fingerprint", "size"))
        if task_keys is not None and prov["task"] is not None:
            _same_keys("its provenance's task", prov["task"], task_keys)
        if not isinstance(state["rng"], list) or not state["rng"]:
            raise ValueError("its RNG states are not a list")
        for r in state["rng"]:
            _same_keys("its RNG state", r, _RNG_KEYS)
            for k, want in _RNG_KEYS.items():
                if want is not None:
                    _same_keys(f"its {k} RNG state", r[k], want)
        opt = state["optimizer"]
        _same_keys("its optimizer state", opt, ("state", "param_groups"))
        for entry in opt["state"].values():
            _same_keys("its optimizer state of a parameter", entry, _ADAMW_STATE)
        saved = state["model_config"]
        if current is None or saved is None:
            return
        _same_keys("its model config", saved, current)
        if any(v is not None and v != saved[k] and not (isinstance(v, (list, tuple)) and list(v) == list(saved[k] or []))
               for k, v in current.items()):
            return  # another model: merge_model_config refuses it with the differing field
        for name in ("model", "ema"):
            if state[name] is None and name == "ema":
                continue
            _same_keys(f"its {name} weights", state[name], tensors)
            bad = next((k for k, v in state[name].items() if not isinstance(v, torch.Tensor) or tuple(v.shape) != tensors[k]), None)
            if bad is not None:
                raise ValueError(f"its {name} weights' {bad} has another shape than the model's")

    return check


def _load_on_rank0(run_dir: Path, rank: int, check=None) -> dict | None:
    """Rank 0 reads the newest readable checkpoint and broadcasts it (or its refusal) to every rank."""
    result = ("ok", None)
    if rank == 0 and run_dir.is_dir():
        try:
            result = ("ok", load_latest_checkpoint(run_dir, check))
        except UserError as e:
            result = ("error", str(e))
    kind, value = dist_utils.broadcast_object(result)
    if kind == "error":
        raise UserError(value)
    return value


def _restore(state: dict, model, ema, opt, skip: SkipRule, order: BatchOrder, generator, rank: int) -> int:
    """Load a checkpoint's model, EMA, optimizer, skip rule and RNG states; returns its step."""
    step = int(state["step"])
    if order.position(step) != (int(state["data"]["epoch"]), int(state["data"]["pos"])):
        raise UserError(f"checkpoint {state['path']} at step {step} stored data position {state['data']}, which does not match "
                        f"{order.per_epoch} batches per epoch; pass --restart to start over")
    model.load_state_dict(state["model"])
    if ema is not None:
        ema.load_state_dict(state["ema"] if state.get("ema") is not None else state["model"])
    opt.load_state_dict(state["optimizer"])
    skip.load_state_dict(state["skip"])
    set_rng_state(state["rng"][rank], generator)
    return step


def _autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

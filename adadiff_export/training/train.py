"""Training: the joint AdaDiff loss (or the plain one), AdamW, EMA, clipping, resume, DDP.

Run as `python -m adadiff_export train ...`, or under `torchrun --nproc_per_node N` for
data-parallel training (gloo on CPU, nccl on GPUs).
"""
from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
import torch.distributed as dist

from ..data import check_shape, load_dataset, sample_batch
from ..model import checkpoint as ckpt
from ..model.config import ModelConfig, preset
from ..model.schedule import VPSchedule
from ..model.uvit import UViT
from ..sampling.images import save_grid
from ..sampling.samplers import guided, sample_dpm_solver_pp
from .losses import AllLayers, LossConfig, diffusion_loss


# ModelConfig fields a run may set from the command line (over a preset, or to check an --init's shape).
SHAPE_FIELDS = ("img_size", "in_chans", "patch_size", "embed_dim", "depth", "num_heads", "num_classes")


@dataclass
class TrainConfig:
    out: Path = Path("runs/train")
    config: Optional[str] = None  # a preset name; None: the --init checkpoint's shape, else "small"
    shape: Dict[str, int] = field(default_factory=dict)  # SHAPE_FIELDS set over the preset (a custom shape)
    data: str = "fashion-mnist"
    steps: int = 10000
    batch_size: int = 128
    lr: float = 2e-4
    weight_decay: float = 0.03
    warmup: int = 200
    ema_decay: float = 0.9995
    grad_clip: float = 1.0
    p_uncond: float = 0.1
    loss: LossConfig = field(default_factory=LossConfig)
    init: Optional[Path] = None
    resume: bool = False
    reset_uems: bool = False  # re-initialise the uncertainty modules after loading (see reset_uems)
    seed: int = 0
    log_every: int = 50
    sample_every: int = 1000
    save_every: int = 500
    guidance: float = 2.0
    threads: int = 0
    max_minutes: float = 0.0  # stop (and save) after this much wall time; 0 = no limit


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed() -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    return _Dist(dist.get_rank(), dist.get_world_size())


@torch.no_grad()
def _ema_update(ema: UViT, model: UViT, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.mul_(decay).add_(pm.detach(), alpha=1 - decay)


def _lr_at(step: int, cfg: TrainConfig) -> float:
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))


@torch.no_grad()
def sample_grid(model: UViT, schedule: VPSchedule, path: Path, guidance: float, seed: int = 0, steps: int = 20) -> Path:
    """8 samples of each class (or 64 unconditional) with DPM-Solver++, as a PNG grid."""
    c = model.config
    g = torch.Generator().manual_seed(seed)
    if c.num_classes > 0:
        y = torch.arange(c.num_classes).repeat_interleave(8)
    else:
        y = None
    n = y.shape[0] if y is not None else 64
    x = torch.randn(n, c.in_chans, c.img_size, c.img_size, generator=g)
    den = model if y is None else guided(model, guidance, c.num_classes)
    imgs = sample_dpm_solver_pp(den, x, schedule, steps, y=y)
    return save_grid(imgs, path, nrow=8)


def model_config(cfg: TrainConfig, init: Optional[ModelConfig] = None, saved: Optional[ModelConfig] = None) -> ModelConfig:
    """The shape a run trains: a preset (`config`, default "small") with `shape` set over it; with an --init
    checkpoint (`init`) or a run to resume (`saved`), that one's config, which a preset or shape given too must
    match (the first difference is named)."""
    unknown = set(cfg.shape) - set(SHAPE_FIELDS)
    if unknown:
        raise ValueError(f"unknown shape fields {sorted(unknown)} (known: {', '.join(SHAPE_FIELDS)})")
    have = saved or init
    if have is None:
        base = preset(cfg.config or "small")
        return ModelConfig.from_dict({**base.to_dict(), **cfg.shape})
    what = f"{cfg.out / 'ckpt.pt'} (resumed)" if saved is not None else f"--init {cfg.init}"
    want = {**(preset(cfg.config).to_dict() if cfg.config else {}), **cfg.shape}
    for key, value in want.items():
        if getattr(have, key) != value:
            raise ValueError(f"{what} has {key} {getattr(have, key)}, but {value} was asked for "
                             f"({'--config ' + cfg.config if cfg.config else 'a shape flag'}); leave it out to "
                             "train that checkpoint's shape")
    if init is not None and saved is not None and init != saved:
        raise ValueError(f"--init {cfg.init} and the run to resume ({cfg.out / 'ckpt.pt'}) have different configs")
    return have


def reset_uems(model: UViT, ema: UViT, opt: torch.optim.Optimizer) -> None:
    """Fresh UEMs in the model and its EMA, and no optimizer moments for them.

    L_u is a squared error on a sigmoid: where a layer's error was large its target tanh|err| is ~1 and the
    logits grow until the sigmoid saturates (experiments/layer_errors.py counts such pixels), after which no gradient can bring them
    back when the error falls. The UEMs read detached features, so re-fitting them leaves the backbone alone.
    """
    for uem in model.uems:
        uem.proj.reset_parameters()
        for p in uem.parameters():
            opt.state.pop(p, None)
    ema.uems.load_state_dict(model.uems.state_dict())


def train(cfg: TrainConfig, log_line: Callable[[str], None] = print) -> Path:
    """Train and return the path of the latest checkpoint; `log_line` gets what was detected in an --init file."""
    from tqdm import tqdm

    dd = _init_distributed()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed + dd.rank)
    out = Path(cfg.out)
    latest = out / "ckpt.pt"
    raw = ckpt.read_raw(latest) if cfg.resume and latest.exists() else None
    init = ckpt.load(cfg.init) if cfg.init is not None else None
    if init is not None and init.note and dd.main:
        log_line(init.note)
    saved = ModelConfig.from_dict(raw["config"]) if raw is not None else None
    mcfg = model_config(cfg, init.model.config if init is not None else None, saved)
    data = load_dataset(cfg.data, mcfg.img_size, mcfg.in_chans, "train")
    check_shape(data, mcfg.img_size, mcfg.in_chans)
    if mcfg.num_classes and int(data.labels.max()) >= mcfg.num_classes:
        raise ValueError(f"data has label {int(data.labels.max())}, the model has {mcfg.num_classes} classes")
    schedule = (VPSchedule.from_dict(raw["schedule"]) if raw is not None and "schedule" in raw
                else init.schedule if init is not None else VPSchedule())
    model = UViT(mcfg)
    if init is not None:
        model.load_state_dict(init.model.state_dict())
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step = 0
    if raw is not None:
        model.load_state_dict(raw["model"])
        ema.load_state_dict(raw["ema"])
        opt.load_state_dict(raw["optimizer"])
        step = int(raw["step"])
    if cfg.reset_uems:
        reset_uems(model, ema, opt)
    callee: torch.nn.Module = AllLayers(model) if cfg.loss.kind == "joint" else model
    if dd.world > 1:
        callee = torch.nn.parallel.DistributedDataParallel(
            callee, find_unused_parameters=cfg.loss.kind == "simple")
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + dd.rank + step)
    if dd.main:
        out.mkdir(parents=True, exist_ok=True)
    log = open(out / "log.jsonl", "a") if dd.main else None
    start = time.time()

    def save() -> None:
        if dd.main:
            ckpt.save({
                "config": mcfg.to_dict(), "schedule": schedule.to_dict(),
                "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                "step": step, "train": _jsonable(cfg),
                "defaults": {"guidance": cfg.guidance if mcfg.num_classes else 1.0},
            }, latest)

    bar = tqdm(total=cfg.steps, initial=step, disable=not dd.main, dynamic_ncols=True, desc="train")
    model.train()
    while step < cfg.steps:
        x0, y = sample_batch(data, cfg.batch_size, gen)
        if mcfg.num_classes > 0:
            drop = torch.rand(y.shape, generator=gen) < cfg.p_uncond
            y = torch.where(drop, torch.full_like(y, mcfg.num_classes), y)
        else:
            y = None
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        terms = diffusion_loss(callee, model, schedule, x0, y, cfg.loss, gen)
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        _ema_update(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
        bar.update(1)
        if dd.main and (step % cfg.log_every == 0 or step == cfg.steps):
            rec = {k: round(float(v.detach()), 5) for k, v in terms.items()}
            bar.set_postfix(rec)
            rec.update(step=step, grad_norm=round(float(gnorm), 4), minutes=round((time.time() - start) / 60, 2))
            log.write(json.dumps(rec) + "\n")
            log.flush()
        if step % cfg.save_every == 0:
            save()
        if dd.main and cfg.sample_every and step % cfg.sample_every == 0:
            sample_grid(ema, schedule, out / f"samples_{step:06d}.png", cfg.guidance)
        if cfg.max_minutes and (time.time() - start) / 60 > cfg.max_minutes:
            break
    save()
    bar.close()
    if log:
        log.close()
    if dd.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return latest


def _jsonable(cfg: TrainConfig) -> Dict[str, Any]:
    d = asdict(cfg)
    return json.loads(json.dumps(d, default=str))

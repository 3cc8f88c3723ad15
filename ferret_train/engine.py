"""The training loop: one code path for CPU, one GPU and ``torchrun`` (DDP, gloo or NCCL).

Determinism: the sampler is seeded by (seed, epoch), each sample's augmentation by (seed, epoch,
index), and torch's RNG (dropout) by (seed, epoch) at every epoch start, so ``--resume`` from an
epoch's checkpoint reproduces the uninterrupted run bit for bit on the same machine.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

from ferret_runtime.errors import CheckpointError, ConfigError, FerretError
from ferret_runtime.fileio import atomic_write, remove_stale_temps
from ferret_runtime.preprocess import Preprocess

from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from .config import TrainConfig, config_from_dict
from .data import ForenSynthsDataset, find_samples, find_subsets
from .dist import Dist, pick_device
from .evaluate import compute_metrics, format_table, summarize
from .registry import create_model

# The run directory's files written with atomic_write: a kill mid-write leaves '.NAME.<random>.tmp'
RUN_FILES: tuple[str, ...] = ("last.pt", "best.pt", "metrics.jsonl")


def next_run_dir(base: str | Path) -> Path:
    """``runs/train``, then ``runs/train2``, ``runs/train3``...: an earlier run is never overwritten."""
    base = Path(base)
    if not base.exists():
        return base
    n = 2
    while Path(f"{base}{n}").exists():
        n += 1
    return Path(f"{base}{n}")


def _strip_worker_trace(e: FerretError) -> FerretError:
    """A DataLoader worker re-raises our error with its traceback inside the message; keep the last line."""
    msg = str(e).strip().splitlines()[-1]
    return type(e)(msg.split(": ", 1)[1] if msg.startswith("ferret_runtime.errors.") else msg)


class Trainer:
    def __init__(self, cfg: TrainConfig, *, resume: str | Path | None = None, log=print):
        self.log = log
        self.ckpt: dict[str, Any] | None = None
        if resume is not None:
            resume = Path(resume)
            self.ckpt = read_checkpoint(resume)
            if "optimizer" not in self.ckpt:
                raise CheckpointError(f"{resume}: not a training checkpoint (no optimizer state); "
                                      "use --init to fine-tune")
        self.cfg = cfg
        self.d = Dist.setup("cuda" if cfg.trainer.device.startswith("cuda") or
                            (cfg.trainer.device == "auto" and torch.cuda.is_available()) else "cpu")
        self.device = pick_device(cfg.trainer.device, self.d)
        self.amp = cfg.trainer.amp and self.device.type == "cuda"
        if cfg.trainer.batch_size % self.d.world:
            raise ConfigError(f"trainer.batch_size={cfg.trainer.batch_size} "
                              f"is not divisible by {self.d.world} processes")

        run_dir = (Path(resume).parent if resume is not None
                   else (next_run_dir(cfg.logger.dir) if self.d.master else None))
        self.run_dir = Path(self.d.broadcast(str(run_dir) if run_dir else None))
        self.pre = Preprocess(crop=cfg.data.test_crop, mean=tuple(cfg.data.mean), std=tuple(cfg.data.std))

        torch.manual_seed(cfg.seed)  # the initial weights: same seed, same run
        model = create_model(cfg.model.name, lpd_func=cfg.model.lpd_func, window_size=cfg.model.window_size)
        if cfg.model.init and self.ckpt is None:
            init = load_checkpoint(cfg.model.init).model
            try:
                model.load_state_dict(init.state_dict(), strict=True)
            except RuntimeError:
                raise CheckpointError(f"{cfg.model.init}: its shape ({init.cfg.arch}) does not match model.name="
                                      f"{cfg.model.name!r}") from None
        self.model = model.to(self.device)
        self.net = DistributedDataParallel(self.model,
                                           device_ids=[self.device.index] if self.device.type == "cuda" else None) \
            if self.d.world > 1 else self.model
        self.opt = self._optimizer()
        self.sched = self._scheduler()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.loss_fn = torch.nn.BCEWithLogitsLoss()

        train_samples = find_samples(cfg.data.train_root, cfg.data.class_to_idx)
        self.train_ds = ForenSynthsDataset(train_samples, cfg.data, train=True, seed=cfg.seed)
        self.sampler = DistributedSampler(self.train_ds, num_replicas=self.d.world, rank=self.d.rank, shuffle=True,
                                          seed=cfg.seed, drop_last=False)
        self.loader = DataLoader(self.train_ds, batch_size=cfg.trainer.batch_size // self.d.world, sampler=self.sampler,
                                 num_workers=cfg.data.workers, pin_memory=self.device.type == "cuda", drop_last=True)
        if len(self.loader) == 0:
            raise ConfigError(f"{cfg.data.train_root}: {len(train_samples)} images make no full batch of "
                              f"{cfg.trainer.batch_size // self.d.world}; lower trainer.batch_size")
        self.val_subsets = find_subsets(cfg.data.val_root, cfg.data.class_to_idx) if cfg.data.val_root else {}

        self.start_epoch, self.best_acc, self.history = 0, -1.0, []
        if self.ckpt is not None:
            self.model.load_state_dict(self.ckpt["model"])
            self.opt.load_state_dict(self.ckpt["optimizer"])
            self.scaler.load_state_dict(self.ckpt["scaler"])
            if self.sched is not None and self.ckpt.get("scheduler"):
                self.sched.load_state_dict(self.ckpt["scheduler"])
            self.start_epoch = int(self.ckpt["epoch"]) + 1
            self.best_acc = float(self.ckpt.get("best_acc", -1.0))
            self.history = list(self.ckpt.get("history", []))

    def _optimizer(self) -> torch.optim.Optimizer:
        o, params = self.cfg.optim, self.model.parameters()
        if o.name == "adam":
            return torch.optim.Adam(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
        if o.name == "adamw":
            return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
        if o.name == "sgd":
            return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        raise ConfigError(f"Received optim.name={o.name!r}; expected adam, adamw or sgd")

    def _scheduler(self):
        o, total = self.cfg.optim, self.cfg.total_epochs
        if o.scheduler is None:
            return None
        if o.scheduler != "cosine":
            raise ConfigError(f"Received optim.scheduler={o.scheduler!r}; expected cosine or none")

        def factor(epoch: int) -> float:
            if epoch < o.warmup_epochs:
                return (epoch + 1) / (o.warmup_epochs + 1)
            t = (epoch - o.warmup_epochs) / max(1, total - o.warmup_epochs)
            return 0.5 * (1 + math.cos(math.pi * t))

        return torch.optim.lr_scheduler.LambdaLR(self.opt, factor)

    # ----------------------------------------------------------------------------------- loop
    def fit(self) -> Path:
        cfg = self.cfg
        writer = self._tensorboard() if self.d.master else None
        if self.d.master:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            import yaml

            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            removed = remove_stale_temps(self.run_dir, RUN_FILES)  # no save of this run is in progress yet
            if removed:
                self.log(f"[train] removed {len(removed)} temporary file(s) left by an interrupted save: "
                         f"{', '.join(p.name for p in removed)}")
            if self.ckpt is not None:
                self._rewind_metrics(int(self.ckpt["epoch"]) + 1)
            self.log(f"[train] {cfg.model.name} ({sum(p.numel() for p in self.model.parameters()):,} params) on "
                     f"{self.device}{f' x {self.d.world} processes' if self.d.world > 1 else ''}, "
                     f"{len(self.train_ds)} training images, run dir {self.run_dir}")
        try:
            for epoch in range(self.start_epoch, cfg.total_epochs):
                record = self._train_epoch(epoch)
                if (self.val_subsets and (epoch + 1) % cfg.trainer.val_freq == 0
                        and epoch + 1 >= cfg.trainer.test_start_epoch):
                    per_subset = self.validate()
                    if self.d.master:
                        record["val"] = {"subsets": per_subset, "mean": summarize(per_subset)}
                        self.log(format_table(per_subset))
                if self.sched is not None:
                    self.sched.step()
                if self.d.master:
                    self._end_epoch(epoch, record, writer)
        finally:
            if writer is not None:
                writer.close()
        if self.d.master:
            self._plot_curves()
        self.d.close()
        return self.run_dir

    def _train_epoch(self, epoch: int) -> dict[str, Any]:
        cfg = self.cfg
        self.sampler.set_epoch(epoch)
        self.train_ds.set_epoch(epoch)
        torch.manual_seed(cfg.seed * 100_003 + epoch)  # dropout; independent of where a run resumed
        self.net.train()
        steps = len(self.loader) if cfg.trainer.max_steps_per_epoch is None else \
            min(len(self.loader), cfg.trainer.max_steps_per_epoch)
        bar = self._bar(steps, f"epoch {epoch + 1}/{cfg.total_epochs}")
        total, count, t0 = 0.0, 0, time.perf_counter()
        it = iter(self.loader)
        for step in range(steps):
            try:
                x, y, _ = next(it)
            except FerretError as e:
                raise _strip_worker_trace(e) from None
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                loss = self.loss_fn(self.net(x).squeeze(1).float(), y)
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
            total, count = total + loss.item() * len(y), count + len(y)
            ips = count * self.d.world / (time.perf_counter() - t0)
            if bar is not None:
                bar.set_postfix(loss=f"{total / count:.4f}", img_s=f"{ips:.0f}")
                bar.update(1)
            if self.d.master and cfg.logger.log_freq and (step + 1) % cfg.logger.log_freq == 0:
                self._jsonl({"type": "step", "epoch": epoch + 1, "step": step + 1, "loss": loss.item(),
                             "lr": self.opt.param_groups[0]["lr"], "img_s": ips})
        if bar is not None:
            bar.close()
        sums = torch.tensor([total, count], dtype=torch.float64)
        if self.d.world > 1:
            dist.all_reduce(sums)
        return {"type": "epoch", "epoch": epoch + 1, "loss": float(sums[0] / max(sums[1], 1)),
                "lr": self.opt.param_groups[0]["lr"], "img_s": float(sums[1]) / (time.perf_counter() - t0),
                "seconds": time.perf_counter() - t0}

    @torch.no_grad()
    def validate(self) -> dict[str, dict[str, float]]:
        """Every rank predicts its share of each subset; rank 0 merges and scores (others get {})."""
        self.net.eval()
        per_subset = {}
        for name, samples in self.val_subsets.items():
            ds = ForenSynthsDataset(samples, self.cfg.data, train=False)
            mine = Subset(ds, list(range(self.d.rank, len(ds), self.d.world)))
            loader = DataLoader(mine, batch_size=self.cfg.trainer.batch_size_test, num_workers=self.cfg.data.workers)
            local = []
            try:
                for x, y, idx in loader:
                    with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                        prob = torch.sigmoid(self.model(x.to(self.device)).float()).squeeze(1).cpu()
                    local += list(zip(idx.tolist(), y.tolist(), prob.tolist()))
            except FerretError as e:
                raise _strip_worker_trace(e) from None
            merged = sorted(sum(self.d.gather(local), []))
            if self.d.master:
                per_subset[name] = compute_metrics(np.array([m[1] for m in merged]), np.array([m[2] for m in merged]))
        return per_subset

    # ----------------------------------------------------------------------------- bookkeeping
    def _end_epoch(self, epoch: int, record: dict[str, Any], writer) -> None:
        cfg = self.cfg
        self.history.append({k: v for k, v in record.items() if k != "type"})
        if writer is not None:
            writer.add_scalar("train/loss", record["loss"], epoch + 1)
            writer.add_scalar("train/lr", record["lr"], epoch + 1)
            writer.add_scalar("train/img_s", record["img_s"], epoch + 1)
            if "val" in record:
                writer.add_scalar("val/acc", record["val"]["mean"]["acc"], epoch + 1)
                writer.add_scalar("val/ap", record["val"]["mean"]["ap"], epoch + 1)
        val_acc = record.get("val", {}).get("mean", {}).get("acc")
        improved = val_acc is not None and val_acc > self.best_acc
        if improved:
            self.best_acc = val_acc
        last = epoch + 1 == cfg.total_epochs
        if improved or last or (epoch + 1) % cfg.trainer.save_freq == 0:
            extra = {"epoch": epoch, "optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict(),
                     "scheduler": self.sched.state_dict() if self.sched is not None else None,
                     "best_acc": self.best_acc, "history": self.history}
            meta = {"epoch": epoch + 1, "val": record.get("val")}
            save_checkpoint(self.run_dir / "last.pt", self.model, preprocess=self.pre, train_config=cfg.to_dict(),
                            meta=meta, extra=extra)
            if improved:
                save_checkpoint(self.run_dir / "best.pt", self.model, preprocess=self.pre, train_config=cfg.to_dict(),
                                meta=meta, extra=extra)
        self._jsonl(record)  # after the checkpoint: a logged epoch is always a resumable one
        self.log(f"[train] epoch {epoch + 1}/{cfg.total_epochs} loss {record['loss']:.4f} "
                 f"{record['img_s']:.0f} img/s" + (f" val ACC {val_acc:.2f}" if val_acc is not None else "")
                 + (" (best)" if improved else ""))

    def _rewind_metrics(self, epoch: int) -> None:
        """On resume, keep metrics.jsonl's records up to ``epoch`` (1-based, the checkpoint's), so every
        step the resumed run logs again appears once.

        By content, not by a byte offset stored in the checkpoint: the epoch's record is logged after
        its checkpoint (so an offset taken at save time would cut it), and records carry their epoch,
        which also holds for checkpoints written before this rule, for best.pt, and for a file that
        was copied, edited or rewound by an earlier resume. A line torn by the kill is dropped.
        """
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        kept, dropped, have_epoch = [], 0, False
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if isinstance(rec, dict) and isinstance(rec.get("epoch"), int) and rec["epoch"] <= epoch:
                kept.append(line)
                have_epoch |= rec.get("type") == "epoch" and rec["epoch"] == epoch
            else:
                dropped += 1
        # a kill between the checkpoint and its record loses the record; the checkpoint's history has it
        restored = not have_epoch and bool(self.history) and self.history[-1].get("epoch") == epoch
        if restored:
            kept.append(json.dumps({"type": "epoch", **self.history[-1]}))
        if dropped or restored:
            text = "".join(line + "\n" for line in kept)
            atomic_write(path, lambda f: f.write(text.encode("utf-8")))
            self.log(f"[train] resuming after epoch {epoch}: metrics.jsonl rewound to its records up to epoch {epoch} "
                     f"({dropped} later or torn record(s) dropped{', the epoch record restored' if restored else ''})")

    def _jsonl(self, record: dict[str, Any]) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _bar(self, total: int, desc: str):
        if not self.d.master:
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, disable=None, leave=False)

    def _tensorboard(self):
        if not self.cfg.logger.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.log("[train] tensorboard is not installed: scalars go to metrics.jsonl only (pip install tensorboard)")
            return None
        return SummaryWriter(str(self.run_dir))

    def _plot_curves(self) -> None:
        if not self.history:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [h["epoch"] for h in self.history]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(epochs, [h["loss"] for h in self.history], "o-", label="train loss")
        ax.set(xlabel="epoch", ylabel="BCE loss")
        val = [(h["epoch"], h["val"]["mean"]["acc"]) for h in self.history if h.get("val")]
        if val:
            ax2 = ax.twinx()
            ax2.plot(*zip(*val), "s-", color="tab:green", label="val ACC (%)")
            ax2.set(ylabel="val ACC (%)", ylim=(0, 101))
            ax2.legend(loc="center right")
        ax.legend(loc="upper right")
        ax.set_title(f"{self.cfg.model.name}: training")
        fig.tight_layout()
        fig.savefig(self.run_dir / "curves.png", dpi=100)
        plt.close(fig)


def train(cfg: TrainConfig, *, resume: str | Path | None = None, log=print) -> Path:
    """Train (or resume) and return the run directory."""
    return Trainer(cfg, resume=resume, log=log).fit()


def resume_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """The training config stored in a checkpoint, with overrides (e.g. total_epochs=200)."""
    from .config import apply_overrides

    ckpt = read_checkpoint(Path(path))
    if not ckpt.get("train_config"):
        raise CheckpointError(f"{path}: records no training config (not written by ferret train); "
                              "use --init to fine-tune")
    cfg = config_from_dict(ckpt["train_config"])
    return apply_overrides(cfg, overrides)

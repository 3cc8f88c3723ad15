"""``--explain``: per image, a panel of the image, its LPD reconstruction, the residual and Grad-CAM."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ferret_runtime.preprocess import Preprocess, normalize

from .models import FerretNet


def grad_cam(model: FerretNet, x: torch.Tensor) -> tuple[np.ndarray, float]:
    """Grad-CAM of the logit over the last DSBlock stage, upsampled to x's size, in [0, 1]."""
    layer = model.feature[-2]
    store: dict[str, torch.Tensor] = {}
    h = layer.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    try:
        with torch.enable_grad():
            x = x.detach().requires_grad_(False)
            logit = model(x)[0, 0]
            acts = store["a"]
            (grads,) = torch.autograd.grad(logit, acts)
    finally:
        h.remove()
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * acts).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    cam = cam - cam.min()
    cam = cam / cam.max() if cam.max() > 0 else cam
    return cam.detach().cpu().numpy(), float(logit.detach())


def _stretch(a: np.ndarray) -> np.ndarray:
    """Contrast-stretch a CHW float map to HWC [0, 1] by its 1st/99th percentiles (per image)."""
    lo, hi = np.percentile(a, [1, 99])
    return np.clip((a.transpose(1, 2, 0) - lo) / max(hi - lo, 1e-8), 0, 1)


class Explainer:
    """Writes ``OUT_DIR/<image stem>.png`` panels; names are made unique when stems repeat."""

    def __init__(self, model: FerretNet, pre: Preprocess, out_dir: Path):
        self.model, self.pre, self.out_dir = model, pre, Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._used: set[str] = set()

    def _target(self, path: str) -> Path:
        stem, n = Path(path).stem or "image", 1
        name = stem
        while name in self._used:
            n += 1
            name = f"{stem}-{n}"
        self._used.add(name)
        return self.out_dir / f"{name}.png"

    def __call__(self, image: np.ndarray, result: Any) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        device = next(self.model.parameters()).device
        x = torch.from_numpy(normalize(image[None], self.pre.mean, self.pre.std)).to(device)
        with torch.no_grad():
            rec = self.model.lpd(x)
        rec = torch.zeros_like(x) if rec is None else rec
        residual = (x - rec)[0].cpu().numpy()
        cam, _ = grad_cam(self.model, x)
        panels = [
            ("image", image, {}),
            (f"LPD reconstruction ({self.model.cfg.lpd_func}, "
             f"{self.model.cfg.window_size}x{self.model.cfg.window_size})",
             _stretch(rec[0].cpu().numpy()), {}),
            ("LPD residual (contrast-stretched)", _stretch(residual), {}),
            ("Grad-CAM, last feature stage", image, {"cam": cam}),
        ]
        fig, axes = plt.subplots(1, 4, figsize=(16, 4.6))
        for ax, (title, arr, kw) in zip(axes, panels):
            ax.imshow(arr)
            if "cam" in kw:
                ax.imshow(kw["cam"], cmap="jet", alpha=0.5, vmin=0, vmax=1)
            ax.set_title(title, fontsize=10)
            ax.axis("off")
        fig.suptitle(f"{Path(result.path).name}: P(fake) = {result.prob_fake:.3f} -> {result.label}", fontsize=13)
        fig.tight_layout()
        target = self._target(result.path)
        fig.savefig(target, dpi=80)
        plt.close(fig)
        return target

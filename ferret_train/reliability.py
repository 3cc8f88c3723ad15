"""The reliability diagram ``ferret calibrate`` writes, rendered to PNG bytes in memory: the command
renders it before it writes anything, so a plotting failure leaves no half-written set of outputs,
and the file itself is then written atomically like the model and the report."""

from __future__ import annotations

import io

import numpy as np

from .calibration import ECE_BINS, ece


def reliability_png(y: np.ndarray, probs: dict[str, np.ndarray], title: str) -> bytes:
    """Reliability diagram (sklearn's calibration_curve, 15 uniform bins) with the ECE in the legend,
    and the histogram of prob_fake below it, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.calibration import calibration_curve

    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5.5, 7), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    try:
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfectly calibrated")
        for name, p in probs.items():
            frac, mean = calibration_curve(y, p, n_bins=ECE_BINS, strategy="uniform")
            ax.plot(mean, frac, marker="o", label=f"{name} (ECE {ece(y, p):.3f})")
            hist.hist(p, bins=np.linspace(0, 1, ECE_BINS + 1), alpha=0.5, label=name)
        ax.set(ylabel="fraction fake", xlim=(0, 1), ylim=(0, 1), title=title)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
        hist.set(xlabel="prob_fake", ylabel="images")
        hist.set_yscale("log")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        return buf.getvalue()
    finally:
        plt.close(fig)

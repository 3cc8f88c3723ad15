"""``ferret bench``'s outputs: the paper-shaped table, the sweep, the plots and the JSON record."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def paper_table(record: dict[str, Any]) -> str:
    """Shaped like the paper's: Method, Ref, Image size, Params, FLOPs, FPS (paper | ours), ACC/AP (paper)."""
    best: dict[str, tuple[float, str]] = {}
    for c in record["cells"]:
        if c["status"] == "ok" and c["batch"] == 1 and c["backend"] != "pipeline":
            if c["img_s_median"] > best.get(c["model"], (0.0, ""))[0]:
                best[c["model"]] = (c["img_s_median"], c["backend"])
    head = (f"{'Method':<13} {'Ref':<13} {'Size':>5} {'Params':>8} {'FLOPs':>8} {'paper FLOPs':>11} "
            f"{'paper FPS':>9} {'FPS b=1 (ours)':>22} {'ACC / AP (paper)':>17}")
    lines = [head, "-" * len(head)]
    for m in record["models"]:
        p = m["paper"]
        fps, how = best.get(m["model"], (None, ""))
        acc = f"{p['acc']:.1f} / {p['ap']:.1f}" if "acc" in p else "-"
        lines.append(f"{m['model']:<13} {p.get('ref', '-'):<13} {str(m['image_size']) + '²':>5} "
                     f"{m['params'] / 1e6:>7.2f}M {m['gflops_paper_convention']:>7.2f}G "
                     f"{_fmt(p.get('gflops'), '.2f') + 'G' if 'gflops' in p else '-':>11} "
                     f"{_fmt(p.get('fps'), '.1f'):>9} {(_fmt(fps, '.1f') + ' ' + how) if fps else '-':>22} {acc:>17}")
    lines.append("FLOPs: multiply-adds (the paper's unit, thop MACs) from FlopCounterMode / 2, convolutions and linear "
                 "layers only (BatchNorm, pooling, FFTs not counted; see ferret_train.models.peers). "
                 "Paper FPS: its GPU; ours: fastest backend at batch 1 on this machine.")
    return "\n".join(lines)


def sweep_table(record: dict[str, Any]) -> str:
    streams = record.get("onnxruntime_cpu_streams")
    lines = [] if streams is None or record["device"] != "cpu" else [
        f"ONNX Runtime on the CPU (onnxruntime, pipeline rows): {streams} stream(s), batches in flight concurrently "
        "(--streams)"]
    lines += [f"{'model':<13} {'backend':<16} {'batch':>5} {'img/s':>10} {'IQR':>8} {'p50 ms':>9} {'p99 ms':>9}  note"]
    for c in record["cells"]:
        if c["status"] == "ok":
            lines.append(f"{c['model']:<13} {c['backend']:<16} {c['batch']:>5} {c['img_s_median']:>10.1f} "
                         f"{c['img_s_iqr']:>8.1f} {c['latency_ms_p50']:>9.2f} {c['latency_ms_p99']:>9.2f}")
        else:
            lines.append(f"{c['model']:<13} {c['backend']:<16} {c['batch']:>5} {'-':>10} {'-':>8} {'-':>9} {'-':>9}"
                         f"  skipped: {c['reason']}")
    return "\n".join(lines)


def _log_axis(axis, values: list[float]) -> None:
    """Label a log axis with plain numbers (1, 2, 5 x 10^k; the batch sizes themselves on x), no minor labels:
    matplotlib's default labels minor ticks as '2x10^0' when the range spans less than a decade, and they collide."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    axis.set_major_locator(FixedLocator(values) if values else LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(plain)
    axis.set_minor_formatter(NullFormatter())


def figure(record: dict[str, Any], key: str, ylabel: str):
    """One panel per model of ``key`` against the batch size; each backend has one colour in every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m["model"] for m in record["models"]]
    backends = list(dict.fromkeys(c["backend"] for c in record["cells"]))
    colour = {b: plt.get_cmap("tab10")(i % 10) for i, b in enumerate(backends)}
    batches = sorted({c["batch"] for c in record["cells"]})
    fig, axes = plt.subplots(1, len(models), figsize=(3.6 * len(models), 3.6), squeeze=False)
    drawn = {}
    for ax, model in zip(axes[0], models):
        for backend in backends:
            pts = [(c["batch"], c[key]) for c in record["cells"]
                   if c["model"] == model and c["backend"] == backend and c["status"] == "ok"]
            if pts:
                (drawn[backend],) = ax.plot(*zip(*pts), "o-", color=colour[backend], label=backend)
        ax.set(title=model, xlabel="batch size", xscale="log", yscale="log")
        _log_axis(ax.xaxis, batches)
        _log_axis(ax.yaxis, [])
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel(ylabel)
    hw = record["hardware"]
    fig.suptitle(f"{hw.get('gpu') or hw['cpu']} ({record['device']})", fontsize=9)
    order = [b for b in backends if b in drawn]
    fig.legend([drawn[b] for b in order], order, loc="lower center", ncol=len(order), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def plot(record: dict[str, Any], out_dir: Path) -> list[Path]:
    """throughput.png (img/s vs batch) and latency.png (ms per batch vs batch), one panel per model."""
    import matplotlib.pyplot as plt

    paths = []
    for key, ylabel, fname in (("img_s_median", "images / s (median)", "throughput.png"),
                               ("latency_ms_p50", "latency per batch, p50 (ms)", "latency.png")):
        fig = figure(record, key, ylabel)
        path = out_dir / fname
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def write_outputs(record: dict[str, Any], out_dir: Path) -> list[Path]:
    from ferret_runtime.fileio import atomic_write

    out_dir.mkdir(parents=True, exist_ok=True)
    text = paper_table(record) + "\n\n" + sweep_table(record) + "\n"
    atomic_write(out_dir / "table.txt", lambda f: f.write(text.encode()))
    atomic_write(out_dir / "bench.json", lambda f: f.write(json.dumps(record, indent=2).encode()))
    return [out_dir / "table.txt", out_dir / "bench.json", *plot(record, out_dir)]


def default_out_dir(base: str | Path = "runs/bench") -> Path:
    from ferret_train.engine import next_run_dir

    return next_run_dir(base)


def main_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------- ferret bench --workload
STAGE_LABELS = {"read": "read bytes", "decode_crop": "decode + crop", "preprocess": "preprocess (normalise)",
                "model": "model (1 thread)"}


def realworld_table(record: dict[str, Any]) -> str:
    """Per model and workload: e2e img/s per decode mode, the model alone, the split in core-ms, the goals."""
    lines = [f"{record['machine']}; " + (record["fma_peak"] or {}).get("describe", "FMA peak: unknown")]
    lines += [f"decoders: {fmt}: {why}" for fmt, why in record["decoders"].items()]
    modes = list(record["config"]["modes"])
    head = (f"{'model':<12} {'workload':<11} {'files':>5} {'MB/img':>7} "
            + "".join(f"{'e2e ' + m:>11}" for m in modes)
            + f" {'model':>8} {'e2e/model':>9} | core-ms/img: {'read':>5} {'dec(reg)':>8} {'dec(full)':>9} "
              f"{'prep':>5} {'model':>6} {'sum':>6} {'serial':>6} | {'wall-ms':>7}")
    lines += ["", "img/s: end to end through the Detector (best of repeats) and the model alone; core-ms per image: "
              f"each stage alone on one thread (on up to {record['config'].get('split_files', 'all')} files per "
              "workload); "
              "wall-ms: the pipeline's, per image", head, "-" * len(head)]
    for r in record["results"]:
        s, first = r["split_ms"], modes[0] if modes else "region"
        e2e = r["e2e"].get(first)
        lines.append(
            f"{r['model']:<12} {r['workload']:<11} {r['images']:>5} {r['mb_per_image']:>7.2f} "
            + "".join(f"{r['e2e'][m]['img_s']:>11.1f}" for m in modes)
            + f" {r['model_alone']['img_s']:>8.1f} {(e2e['img_s'] / r['model_alone']['img_s']) if e2e else 0:>9.2f} |"
              f"              {s['read']:>5.2f} {s['decode_crop_region']:>8.2f} {s['decode_crop_full']:>9.2f} "
              f"{s['preprocess']:>5.2f} {s['model']:>6.2f} "
              f"{s['read'] + s['decode_crop_' + first] + s['preprocess'] + s['model']:>6.2f} "
              f"{r['serial_ms'][first]:>6.2f} | {e2e['wall_ms_per_image'] if e2e else 0:>7.2f}")
    lines.append("")
    for m in record["models"]:
        frac = m.get("fraction_of_fma_peak")
        lines.append(f"{m['model']}: {m['macs_per_image'] / 1e9:.3f} GMAC per {m['image_size']}² image; model alone "
                     f"{m['model_alone_img_s']:.1f} img/s" + (f" = {100 * frac:.1f}% of the FMA peak" if frac else ""))
        if m.get("backend"):
            lines.append(f"{m['model']}: ran on {m['backend']}, {m['streams']} stream(s), Detector batch {m['batch']}"
                         + (f"; {m['auto']}" if m.get("auto") else ""))
    for g in record["goals"]:
        lines.append(f"goal {g['model']:<12} {g['mode']:<7} {g['goal']:<30} {g['ratio']:>6.2f} (>= {g['least']:.2f}): "
                     + ("met" if g["met"] else "NOT met"))
    return "\n".join(lines)


def realworld_figure(record: dict[str, Any]):
    """Per model: stacked core-ms by stage per (workload, decode mode) with the e2e wall-ms marked, and img/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m["model"] for m in record["models"]]
    modes = list(record["config"]["modes"])
    colour = {s: plt.get_cmap("tab10")(i) for i, s in enumerate(STAGE_LABELS)}
    fig, axes = plt.subplots(len(models), 2, figsize=(13, 4.2 * len(models)), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2]})
    for row, model in zip(axes, models):
        rs = [r for r in record["results"] if r["model"] == model]
        ax = row[0]
        x, labels = 0.0, []
        ticks = []
        for r in rs:
            ax.text(x + (len(modes) - 1) / 2, -0.13, r["workload"], transform=ax.get_xaxis_transform(), ha="center",
                    fontsize=8)
            for m in modes:
                bottom = 0.0
                for stage in STAGE_LABELS:
                    key = f"decode_crop_{m}" if stage == "decode_crop" else stage
                    v = r["split_ms"][key]
                    ax.bar(x, v, 0.8, bottom=bottom, color=colour[stage], label=STAGE_LABELS[stage])
                    bottom += v
                wall = r["e2e"][m]["wall_ms_per_image"]
                ax.hlines(wall, x - 0.45, x + 0.45, colors="black", linewidth=2.5, label="e2e wall-ms per image")
                ticks.append(x)
                labels.append(m)
                x += 1
            x += 0.6
        ax.set_xticks(ticks, labels, fontsize=7)
        ax.set(title=f"{model}: per-image core-ms by stage (one thread each)", ylabel="ms per image")
        ax.grid(axis="y", alpha=0.3)
        handles, names = ax.get_legend_handles_labels()
        uniq = dict(zip(names, handles))
        ax.legend(uniq.values(), uniq.keys(), fontsize=7, frameon=False)
        ax = row[1]
        width = 0.8 / (len(modes) + 1)
        kinds = [(f"e2e, {m} decode", lambda r, m=m: r["e2e"][m]["img_s"]) for m in modes]
        kinds.append(("model alone", lambda r: r["model_alone"]["img_s"]))
        for k, (name, get) in enumerate(kinds):
            ax.bar([i + (k - len(modes) / 2) * width for i in range(len(rs))], [get(r) for r in rs], width,
                   color=plt.get_cmap("Set2")(k), label=name)
        ax.set_xticks(range(len(rs)), [r["workload"] for r in rs], fontsize=8)
        ax.set(title=f"{model}: images / s", ylabel="images / s")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, frameon=False)
    fig.suptitle(record["machine"], fontsize=9)
    fig.tight_layout()
    return fig


def write_realworld(record: dict[str, Any], out_dir: Path) -> list[Path]:
    """realworld.json, realworld.txt and (with matplotlib) realworld.png in ``out_dir``."""
    import importlib.util

    from ferret_runtime.fileio import atomic_write

    out_dir.mkdir(parents=True, exist_ok=True)
    text = realworld_table(record) + "\n"
    atomic_write(out_dir / "realworld.txt", lambda f: f.write(text.encode()))
    atomic_write(out_dir / "realworld.json", lambda f: f.write(json.dumps(record, indent=2).encode()))
    files = [out_dir / "realworld.txt", out_dir / "realworld.json"]
    if importlib.util.find_spec("matplotlib") is None:
        main_log("[bench] no plot: matplotlib is not installed (pip install 'ferretnet-deploy[train]')")
        return files
    import matplotlib.pyplot as plt

    fig = realworld_figure(record)
    fig.savefig(out_dir / "realworld.png", dpi=100)
    plt.close(fig)
    return [*files, out_dir / "realworld.png"]

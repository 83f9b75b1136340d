"""What a run directory shows about its fit: curves, model summary, gating analysis.

- ``curves.png``: training loss, training accuracy and validation EER per dim against epoch;
- ``model_summary.json`` / ``model_summary.txt``: parameters per module (trainable or not);
- ``gating.json`` / ``gating.png`` (gating fusion only): the gate of each encoder on the
  validation utterances (mean over frames per utterance), overall and per speaker.

Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_curves(history: list[dict], dims, path: Path) -> Path:
    """Loss, accuracy and (when validated) EER per dim against epoch, one PNG with three panels."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    epochs = [h["epoch"] + 1 for h in history]
    for d in dims:
        key = str(d)
        axes[0].plot(epochs, [h["loss"][key] for h in history], marker=".", label=f"{d}")
        axes[1].plot(epochs, [h["accuracy"][key] for h in history], marker=".", label=f"{d}")
        val = [(h["epoch"] + 1, 100 * h["val_eer"][key]) for h in history if "val_eer" in h]
        if val:
            axes[2].plot(*zip(*val), marker=".", label=f"{d}")
    for ax, title in zip(axes, ("training loss", "training accuracy", "validation EER %")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(title="dim", fontsize=8)
        else:
            ax.text(0.5, 0.5, "no validation", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def count_parameters(modules: dict, depth: int = 2) -> dict:
    """{"total", "trainable", "modules": {dotted name: parameters}} down to ``depth`` levels."""
    rows = {}
    for name, module in modules.items():
        rows[name] = sum(p.numel() for p in module.parameters())
        stack = [(name, module, 1)]
        while stack:
            prefix, mod, level = stack.pop(0)
            if level > depth:
                continue
            for child_name, child in mod.named_children():
                n = sum(p.numel() for p in child.parameters())
                if n:
                    rows[f"{prefix}.{child_name}"] = n
                    stack.append((f"{prefix}.{child_name}", child, level + 1))
    total = sum(sum(p.numel() for p in m.parameters()) for m in modules.values())
    trainable = sum(sum(p.numel() for p in m.parameters() if p.requires_grad) for m in modules.values())
    return {"total": total, "trainable": trainable, "modules": rows}


def write_model_summary(modules: dict, out: Path) -> dict:
    """``model_summary.json`` and a readable ``model_summary.txt``; returns the summary."""
    summary = count_parameters(modules)
    head = modules.get("head")
    if head is not None and hasattr(head, "spec"):
        summary["spec"] = head.spec()
    out = Path(out)
    (out / "model_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    width = max(len(k) for k in summary["modules"]) if summary["modules"] else 10
    lines = [f"{'module':<{width}}  parameters"]
    lines += [f"{k:<{width}}  {v:>12,}" for k, v in summary["modules"].items()]
    lines += [f"{'total':<{width}}  {summary['total']:>12,}", f"{'trainable':<{width}}  {summary['trainable']:>12,}"]
    (out / "model_summary.txt").write_text("\n".join(lines) + "\n")
    return summary


@torch.no_grad()
def gate_values(model, inputs: dict, batch: int = 64) -> np.ndarray:
    """The gates (N, n encoders) of a gating StreamModel on ``inputs`` {stream: (N, ...)}, rows summing to one."""
    from mrlcache.fit.data import batch_slices
    from mrlcache.fit.stream_data import num_rows, take, to_device

    model.eval()
    device = next(model.parameters()).device
    n = num_rows(inputs)
    ragged = any(isinstance(v, list) for v in inputs.values())
    slices = [slice(i, i + 1) for i in range(n)] if ragged else batch_slices(n, batch)
    return torch.cat([model.gates(to_device(take(inputs, sl), device)).float().cpu() for sl in slices]).numpy()


def _stats(values: np.ndarray) -> dict:
    q = np.quantile(values, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {"mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()),
            "max": float(values.max()), "quantiles": dict(zip(("5", "25", "50", "75", "95"), map(float, q)))}


def write_gating(model, inputs: dict, speakers, out: Path, source: str) -> dict:
    """``gating.json`` and ``gating.png``: each encoder's gate on ``inputs``, overall and per speaker."""
    gates = gate_values(model, inputs)  # (N, n)
    names = [g["name"] for g in model.groups]
    speakers = np.asarray(speakers, dtype=str)
    report = {"source": source, "utterances": int(len(gates)), "encoders": names,
              "per_frame": bool(getattr(model.fusion, "per_frame", False)),
              "overall": {name: _stats(gates[:, i]) for i, name in enumerate(names)},
              "per_speaker": {str(s): {name: float(gates[speakers == s, i].mean()) for i, name in enumerate(names)}
                              for s in sorted(set(speakers.tolist()))}}
    out = Path(out)
    (out / "gating.json").write_text(json.dumps(report, indent=2) + "\n")

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    bins = np.linspace(0, 1, 41)
    for i, name in enumerate(names):
        axes[0].hist(gates[:, i], bins=bins, alpha=0.6, label=name)
    axes[0].set_title(f"gate per utterance ({source})")
    axes[0].set_xlabel("gate value")
    axes[0].legend(fontsize=8)
    spk = list(report["per_speaker"])
    bottom = np.zeros(len(spk))
    for name in names:
        vals = np.array([report["per_speaker"][s][name] for s in spk])
        axes[1].bar(range(len(spk)), vals, bottom=bottom, label=name)
        bottom += vals
    axes[1].set_title("mean gate per speaker")
    axes[1].set_xticks(range(len(spk)), spk, rotation=90, fontsize=6)
    axes[1].set_ylim(0, 1)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "gating.png", dpi=90)
    plt.close(fig)
    return report


def run_record(run) -> dict:
    """One run directory as a row: inputs, fusion, head, dims, best validation EER / minDCF per dim,
    epochs, seconds. ValueError naming the file when it is not a finished fit."""
    import yaml

    run = Path(run)
    for name in ("config.yaml", "summary.json", "history.jsonl"):
        if not (run / name).is_file():
            raise ValueError(f"{run}: no {name}; give run directories of finished 'mrlcache fit' runs")
    try:
        from mrlcache.fit.config import flat_options

        row = _row(run, flat_options(yaml.safe_load((run / "config.yaml").read_text())),
                   json.loads((run / "summary.json").read_text()),
                   [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines() if x.strip()])
    except (ValueError, TypeError, KeyError, AttributeError, yaml.YAMLError, UnicodeDecodeError) as err:
        what = f"missing {err}" if isinstance(err, KeyError) else str(err).splitlines()[0][:160]
        raise ValueError(f"{run}: its config.yaml, summary.json or history.jsonl is not what 'mrlcache fit' "
                         f"writes ({type(err).__name__}: {what}); give run directories of finished fits") from None
    for key, value in row.items():  # sortable: every measure a number (or absent)
        if key not in ("run", "inputs", "fusion", "head", "dims") and value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{run}: {key} is {value!r}, not a number; give run directories of finished fits")
    return row


def _row(run: Path, cfg: dict, summary: dict, history: list) -> dict:
    best = summary.get("best") or {}
    row = {"run": str(run), "inputs": ",".join(cfg.get("inputs") or ["pooled"]), "fusion": cfg.get("fusion") or "-",
           "head": cfg.get("head", "mrl"), "dims": ",".join(map(str, cfg["dims"])),
           "mean_eer": best.get("mean_eer"), "epochs": summary.get("epochs_run", len(history)),
           "best_epoch": None if summary.get("best_epoch") is None else summary["best_epoch"] + 1,
           "seconds": round(sum(h.get("seconds", 0.0) for h in history), 1), "raw_eer": summary.get("raw_eer")}
    for d, e in (best.get("eer") or {}).items():
        row[f"eer@{d}"] = e
    for d, c in (best.get("min_dcf") or {}).items():
        row[f"mindcf@{d}"] = c
    if not all(str(d).isdigit() for d in (best.get("eer") or {})):
        raise ValueError(f"dims {list(best['eer'])} are not sizes")
    return row


def runs_table(runs, sort: str = "mean_eer") -> tuple[list[str], list[dict]]:
    """Rows of :func:`run_record` sorted by column ``sort`` (missing values last) and the columns."""
    rows = [run_record(r) for r in runs]
    fixed = ["run", "inputs", "fusion", "head", "dims", "mean_eer"]
    dims = sorted({int(k.split("@")[1]) for r in rows for k in r if "@" in k})
    columns = fixed + [f"eer@{d}" for d in dims] + [f"mindcf@{d}" for d in dims] + \
        ["raw_eer", "epochs", "best_epoch", "seconds"]
    if sort not in columns:
        raise ValueError(f"--sort {sort}: choose a column of {', '.join(columns)}")
    present = [r for r in rows if r.get(sort) is not None]
    absent = [r for r in rows if r.get(sort) is None]
    return columns, sorted(present, key=lambda r: r[sort]) + absent

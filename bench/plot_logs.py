"""Plot training curves of train_gpt.py logs: val_bpb and train loss against training time, one line per run.

Usage: python bench/plot_logs.py LOG [LOG ...] [--out curves.png] [--title TEXT]

Reads `step:N val_loss:X val_bpb:Y train_time:Ts ...` (left panel) and `step:N/M train_loss:X ... train_time:Ts`
(right panel) lines; each run is labelled by its run_id (the `run_id:` line, else the hyperparameters' run_id),
else its file name. Needs matplotlib (pip install -r bench/requirements.txt); draws with the Agg backend, no display.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_bench import parse_log  # noqa: E402


def load_curves(path: str) -> dict:
    """{'label', 'val': [(seconds, val_bpb)], 'train': [(seconds, train_loss)]} of one log."""
    with open(path, encoding="utf-8", errors="replace") as f:
        p = parse_log(f.read())
    label = p.get("run_id") or (p.get("hparams") or {}).get("run_id") or os.path.basename(path)
    val = [(pt["train_time"], pt["val_bpb"]) for pt in p.get("val_points", [])
           if pt["train_time"] is not None and pt["val_bpb"] is not None]
    train = [(pt["train_time"], pt["train_loss"]) for pt in p.get("train_points", [])
             if pt["train_time"] is not None and pt["train_loss"] is not None]
    return {"label": str(label), "path": path, "val": val, "train": train}


def unique_labels(curves: list[dict]) -> None:
    """Runs sharing a run_id get their file name appended."""
    labels = [c["label"] for c in curves]
    for c in curves:
        if labels.count(c["label"]) > 1:
            c["label"] = f"{c['label']} ({os.path.basename(c['path'])})"


def plot(curves: list[dict], out: str, title: str | None = None) -> None:
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (ax_val, ax_train) = plt.subplots(1, 2, figsize=(13, 4.8))
    for c in curves:
        if c["val"]:
            xs, ys = zip(*c["val"])
            ax_val.plot(xs, ys, marker="o", markersize=3, label=c["label"])
        if c["train"]:
            xs, ys = zip(*c["train"])
            ax_train.plot(xs, ys, linewidth=1, label=c["label"])
    ax_val.set(xlabel="training time (s)", ylabel="val_bpb", title="validation bits per byte")
    ax_train.set(xlabel="training time (s)", ylabel="train loss (nats/token)", title="training loss")
    for ax in (ax_val, ax_train):
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("logs", nargs="+", metavar="LOG")
    ap.add_argument("--out", default="curves.png")
    ap.add_argument("--title", default=None)
    args = ap.parse_args(argv)
    try:
        import matplotlib  # noqa: F401, PLC0415
    except ImportError:
        print("plot_logs: matplotlib is not installed; install the bench extras with "
              "`python3 -m pip install -r bench/requirements.txt`", file=sys.stderr)
        return 3
    curves = []
    for path in args.logs:
        try:
            c = load_curves(path)
        except OSError as e:
            print(f"plot_logs: {e}", file=sys.stderr)
            return 2
        if not c["val"] and not c["train"]:
            print(f"plot_logs: warning: {path} has no step lines with train_time", file=sys.stderr)
        curves.append(c)
    if not any(c["val"] or c["train"] for c in curves):
        print("plot_logs: no `step:` lines with train_time in any log: nothing to plot", file=sys.stderr)
        return 1
    unique_labels(curves)
    plot(curves, args.out, args.title)
    print(f"plot_logs: wrote {args.out} ({len(curves)} run(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())

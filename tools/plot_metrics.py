"""Plot a run's metrics.csv: loss, learning rate, throughput and kNN accuracy, one panel each.

    python tools/plot_metrics.py runs/simclr-1234                 # writes runs/simclr-1234/metrics.png
    python tools/plot_metrics.py runs/simclr-1234 runs/byol-1235 --out compare.png   # several runs

matplotlib is imported here only (pip install matplotlib); it draws to a file, so it works on a
node without a display.
"""
import argparse
import csv
from pathlib import Path


def fail(msg):
    raise SystemExit(f"error: {msg}")


def read(folder):
    path = Path(folder) / "metrics.csv"
    if not path.is_file():
        fail(f"{folder} has no metrics.csv: give the --output-dir of a run (e.g. runs/simclr-1234)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    steps = [r for r in rows if r["kind"] == "step"]
    knn = [(int(r["epoch"]) + 1, float(r["knn_top1"])) for r in rows if r["kind"] == "epoch" and r["knn_top1"]]
    return steps, knn


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="output folders of runs (each holds metrics.csv)")
    parser.add_argument("--out", default=None, help="image file (default: <first run>/metrics.png)")
    args = parser.parse_args(argv)
    data = {Path(r).resolve().name: read(r) for r in args.runs}
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        fail("matplotlib is not installed: pip install matplotlib (only this tool needs it)")
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    panels = [("loss", "loss"), ("lr", "learning rate"), ("img_per_s", "images / s")]
    for name, (steps, knn) in data.items():
        x = [int(r["step"]) for r in steps]
        for ax, (key, title) in zip(axes.flat, panels):
            ax.plot(x, [float(r[key]) for r in steps], label=name)
            ax.set(title=title, xlabel="step")
        if knn:
            axes[1, 1].plot(*zip(*knn), marker="o", label=name)
    axes[1, 1].set(title="kNN top-1 (%)", xlabel="epoch")
    axes[0, 0].legend()
    fig.tight_layout()
    out = Path(args.out or Path(args.runs[0]) / "metrics.png")
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

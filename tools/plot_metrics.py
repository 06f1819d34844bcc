"""Plot a run's metrics.csv: loss, learning rate, throughput, kNN accuracy and a method's own
metrics (dino.py: the teacher entropy), one panel each.

    python tools/plot_metrics.py runs/simclr-1234                 # writes runs/simclr-1234/metrics.png
    python tools/plot_metrics.py runs/simclr-1234 runs/byol-1235 --out compare.png   # several runs

matplotlib is imported here only (pip install matplotlib); it draws to a file, so it works on a
node without a display, and on the metrics.csv of a job still running.
"""
import argparse
import csv
import io
import sys
from pathlib import Path


def fail(msg):
    raise SystemExit(f"error: {msg}")


COLUMNS = ("kind", "epoch", "step", "loss", "lr", "img_per_s", "peak_mem_mb", "knn_top1", "time_s")


def read(folder):
    """(step rows, [(epoch, kNN top-1)], the method's own columns) of a run's metrics.csv. Only
    whole lines are read: a job still writing, or killed while writing, leaves half a row."""
    path = Path(folder) / "metrics.csv"
    if not path.is_file():
        fail(f"{folder} has no metrics.csv: give the --output-dir of a run (e.g. runs/simclr-1234)")
    text = path.read_text()
    rows = list(csv.DictReader(io.StringIO(text[: text.rfind("\n") + 1])))
    header = text.split("\n", 1)[0].split(",")
    if header[: len(COLUMNS)] != list(COLUMNS):
        fail(f"{path} is not a metrics.csv of these scripts (its columns: {header[:len(COLUMNS)]})")
    rows = [r for r in rows if None not in r.values() and r["step"].isdigit()]
    steps = [r for r in rows if r["kind"] == "step"]
    twice = len(steps) - len({r["step"] for r in steps})
    if twice:  # one step logged twice: two runs wrote to this folder at once (one stopped at its next save)
        print(f"warning: {path} holds {twice} steps logged twice: two runs wrote to this folder at once, and "
              "their rows are mixed in the plot; last.pt is the run that went on", file=sys.stderr)
    knn = [(int(r["epoch"]) + 1, float(r["knn_top1"])) for r in rows if r["kind"] == "epoch" and r["knn_top1"]]
    return steps, knn, header[len(COLUMNS):]


def main(argv=None):
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("runs", nargs="+", help="output folders of runs (each holds metrics.csv)")
    parser.add_argument("--out", default=None, help="image file (default: <first run>/metrics.png)")
    args = parser.parse_args(argv)
    paths = [Path(r).resolve() for r in args.runs]
    depth = 1  # labels: the folder names, with as many parent folders as it takes to tell them apart
    while depth < max(len(p.parts) for p in paths) and len({p.parts[-depth:] for p in paths}) < len(set(paths)):
        depth += 1
    data = {"/".join(p.parts[-depth:]): read(r) for p, r in zip(paths, args.runs)}
    out = Path(args.out or Path(args.runs[0]) / "metrics.png")
    out = out / "metrics.png" if out.is_dir() else out
    if not out.parent.is_dir():
        fail(f"--out {out}: the folder {out.parent} does not exist")
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        fail("matplotlib is not installed: pip install matplotlib (only this tool needs it)")
    panels = [("loss", "loss"), ("lr", "learning rate"), ("img_per_s", "images / s")]
    panels += [(k, k.replace("_", " ")) for k in dict.fromkeys(k for _, _, own in data.values() for k in own)]
    fig, axes = plt.subplots(2, (len(panels) + 2) // 2, figsize=(5.5 * ((len(panels) + 2) // 2), 7), squeeze=False)
    if out.suffix[1:].lower() not in fig.canvas.get_supported_filetypes():
        fail(f"--out {out}: matplotlib cannot write {out.suffix or 'a file without extension'}; use .png, .pdf or .svg")
    knn_ax = axes.flat[len(panels)]
    for i, (name, (steps, knn, _)) in enumerate(data.items()):
        x, color = [int(r["step"]) for r in steps], f"C{i}"  # one colour per run in every panel (the legend's)
        for ax, (key, title) in zip(axes.flat, panels):
            if steps and key in steps[0]:
                ax.plot(x, [float(r[key] or "nan") for r in steps], label=name, color=color,  # empty: a row from before
                        marker="o" if len(x) == 1 else None)  # one point: a line of it would not show
            ax.set(title=title, xlabel="step")
        if knn:
            knn_ax.plot(*zip(*knn), marker="o", label=name, color=color)
    knn_ax.set(title="kNN top-1 (%)", xlabel="epochs trained")  # metrics.csv's epoch + 1
    for ax in axes.flat[len(panels) + 1:]:
        ax.axis("off")
    axes[0, 0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"wrote {out}: {', '.join(title for _, title in panels)}, kNN top-1")


if __name__ == "__main__":
    main()

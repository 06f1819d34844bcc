"""Replay a run's args.json and metrics.csv into a Weights & Biases run, later, from a machine with
internet (a login node): compute nodes often have none, so the scripts only write CSV.

    python tools/wandb_sync.py runs/simclr-1234                       # online: needs `wandb login`
    python tools/wandb_sync.py runs/simclr-1234 --mode offline        # then `wandb sync wandb/offline-run-*`
    python tools/wandb_sync.py runs/simclr-1234 --project ssl --entity my-team --name simclr-c10

The wandb run id is stored in <run>/wandb_sync.json with the last step sent, so running the tool
again (after a requeue, or while the job is still training) adds the new rows to the same wandb run
instead of creating another. While the run trains, the last step of the file waits for the next
sync (its epoch row, with the kNN accuracy, may still be coming; wandb takes each step once).
Step rows are logged at their step (loss, lr, img_per_s, peak_mem_mb,
time_s and a method's own columns, such as dino.py's teacher_entropy); epoch rows as epoch/loss,
epoch/knn_top1, epoch/<own column>. wandb is imported here only: pip install wandb.
"""
import argparse
import csv
import io
import json
import secrets
import sys
from pathlib import Path

NUMBERS = ("loss", "lr", "img_per_s", "peak_mem_mb", "time_s")
COLUMNS = ("kind", "epoch", "step", "knn_top1", *NUMBERS)  # every script's; the others are a method's own


def fail(msg):
    raise SystemExit(f"error: {msg}")


def read_run(folder):
    folder = Path(folder)
    if not (folder / "metrics.csv").is_file():
        fail(f"{folder} has no metrics.csv: give the --output-dir of a run (e.g. runs/simclr-1234)")
    config = read_json(folder / "args.json") if (folder / "args.json").is_file() else {}
    # Whole lines only: a job still writing, or killed while writing, leaves half a row at the end.
    text = (folder / "metrics.csv").read_text()
    rows = list(csv.DictReader(io.StringIO(text[: text.rfind("\n") + 1])))
    if rows and not set(COLUMNS) <= set(rows[0]):
        fail(f"{folder / 'metrics.csv'} is not a metrics.csv of these scripts (columns {sorted(rows[0])})")
    rows = [r for r in rows if None not in r.values() and r["step"].isdigit()]
    warn_if_two_runs(folder / "metrics.csv", rows)
    return config, rows


def warn_if_two_runs(path, rows):
    """Two rows of one kind at one step: two runs wrote to the folder at once (one of them stopped at
    its next save). Their rows are mixed, and nothing tells which are whose."""
    seen, twice = set(), []
    for r in rows:
        key = (r["kind"], r["step"])
        if key in seen:
            twice.append(r["step"])
        seen.add(key)
    if twice:
        print(f"warning: {path} holds two rows for step {twice[0]} ({len(twice)} such rows): two runs wrote to "
              "this folder at once, and their rows are mixed; last.pt is the run that went on", file=sys.stderr)


def read_json(path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        fail(f"{path} is not valid JSON ({e}); repair or delete it")


def wandb_rows(rows, after_step):
    """(step, dict) for wandb.log, in step order, for the rows past `after_step`; the epoch row of a
    step goes into the same dict as its step row (wandb wants one log call per step)."""
    out = {}
    for r in rows:
        step = int(r["step"])
        if step <= after_step:
            continue
        d = out.setdefault(step, {"epoch": int(r["epoch"])})
        own = [k for k in r if k not in COLUMNS]
        if r["kind"] == "step":
            d.update({k: float(r[k]) for k in (*NUMBERS, *own) if r.get(k)})
        else:
            d.update({f"epoch/{k}": float(r[k]) for k in ("loss", "knn_top1", *own) if r.get(k)})
    return sorted(out.items())


def main(argv=None):
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("run", help="the run's output folder (holds metrics.csv and args.json)")
    parser.add_argument("--project", default="ssl-single-file", help="wandb project")
    parser.add_argument("--entity", default=None, help="wandb entity (user or team)")
    parser.add_argument("--name", default=None,
                        help="run name (default: the folder name; a probe's: RUN/linear_eval, say)")
    parser.add_argument("--mode", default="online", choices=["online", "offline"], help="wandb mode")
    args = parser.parse_args(argv)
    config, rows = read_run(args.run)
    try:
        import wandb
    except ImportError:
        fail("wandb is not installed: pip install wandb (only this tool needs it)")
    if not rows:
        fail(f"{Path(args.run) / 'metrics.csv'} has no rows yet: sync it once the run has logged a step")
    state_file = Path(args.run) / "wandb_sync.json"
    # A new run's id: 8 characters, as wandb's own (whose generator moved between wandb releases)
    state = read_json(state_file) if state_file.is_file() else {"id": secrets.token_hex(4), "step": 0}
    if not (isinstance(state, dict) and isinstance(state.get("id"), str) and isinstance(state.get("step"), int)):
        fail(f"{state_file} does not hold this tool's {{\"id\": ..., \"step\": ...}}; repair or delete it (deleting "
             "it sends the whole run again, as a new wandb run)")
    todo = wandb_rows(rows, state["step"])
    backbone, metrics = Path(args.run) / "backbone.pt", Path(args.run) / "metrics.csv"
    finished = backbone.is_file() and backbone.stat().st_mtime >= metrics.stat().st_mtime
    if todo and rows[-1]["kind"] == "step" and not finished:  # its epoch row (kNN) may still come: next time
        todo = [(step, values) for step, values in todo if step != int(rows[-1]["step"])]
    folder = Path(args.run).resolve()  # a probe's folder is named after its mode: with its run's name too
    name = f"{folder.parent.name}/{folder.name}" if folder.name.startswith("linear_eval") else folder.name
    run = wandb.init(project=args.project, entity=args.entity, name=args.name or name,
                     id=state["id"], resume="allow", config=config, mode=args.mode)
    for step, values in todo:
        run.log(values, step=step)
    run.finish()
    if todo:
        state["step"] = todo[-1][0]
    state_file.write_text(json.dumps(state))
    print(f"{len(todo)} steps of {args.run} sent to wandb run {state['id']} ({args.mode}); "
          f"last step {state['step']}", file=sys.stderr)


if __name__ == "__main__":
    main()

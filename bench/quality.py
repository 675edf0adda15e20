"""Quality figures of the demo, written as markdown result files with the command that produced them.

``report``: the demo preset on one or more synthetic worlds (seeds), scored on a split (``test`` for reported
figures): every method row of the evaluate table, and the gain of each clips4 row over the strongest MaskCLIP row of
the same teacher, per metric.
``ablate``: on one world's ``val`` split (where choices are made), the demo and variants that each put back one
piece of the paper's method (``--variant NAME=key=value,key=value``; the defaults are the demo's departures).

Runs go through the ``clips4`` CLI into one store, so stages shared between runs are computed once.
Run: python bench/quality.py report --seeds 0 --split test --out docs/results/demo.md
     python bench/quality.py ablate --seed 0 --out docs/results/ablations.md
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from clips4.config import resolve_config
from clips4.harness import summary_table
from clips4.storage import Store
from clips4.tasks.common import plan_keys

PRESET = "demo"
# Each departure of the demo from the paper (docs/method.md §9), put back to the paper's form.
ABLATIONS: dict[str, list[str]] = {
    "paper L_contrast (region positives)": ["train.contrast_targets=regions"],
    "paper L_emb (segments, image space)": ["train.emb_pooling=segments", "train.emb_space=image"],
    "patch_norm_power 1": ["train.patch_norm_power=1"],
    "grayscale views 0.2": ["train.grayscale=0.2"],
    "paper crops 0.5-1.5": ["train.crop_scale=[0.5,1.5]"],
    "no test-time steps": ["evaluate.test_scales=[1]", "evaluate.new_class_floor=0", "evaluate.recentre_gap=false"],
}
COLUMNS = [("language", "mIoU_known"), ("language", "mIoU_unknown"), ("language", "hIoU"),
           ("unsupervised", "mIoU"), ("probe", "mIoU")]


def run(store: Path, overrides: list[str]) -> pd.DataFrame:
    """Run the demo with ``overrides`` (reusing whatever the store holds) and return its evaluate metrics."""
    cmd = [sys.executable, "-m", "clips4.flows.cli", "run", "--preset", PRESET, "--store", str(store)]
    cmd += [arg for o in overrides for arg in ("--set", o)]
    print("$", shlex.join(["clips4", *cmd[3:]]), flush=True)
    start = time.time()
    subprocess.run(cmd, check=True)
    print(f"  {time.time() - start:.0f} s", flush=True)
    key = plan_keys(resolve_config(PRESET, overrides=overrides), ["evaluate"])["evaluate"]
    return Store(store).open(key).read_table("metrics")


def wide(metrics: pd.DataFrame) -> pd.DataFrame:
    """Methods as rows, the reported (task, metric) pairs as columns."""
    cells = metrics.set_index(["method", "task", "metric"])["value"]
    table = pd.DataFrame({f"{t} {m}": cells.xs((t, m), level=("task", "metric"))
                          for t, m in COLUMNS if (t, m) in cells.droplevel(0).index})
    return table.reindex(pd.unique(metrics["method"])).round(3)


def gains(metrics: pd.DataFrame) -> pd.DataFrame:
    """Each clips4 row's gain in points over the strongest MaskCLIP row, on the reported columns."""
    summary = summary_table(metrics).set_index(["task", "metric"])
    rows = {}
    for column in [c for c in summary.columns if c.endswith("_gain")]:
        rows[column.removesuffix("_gain")] = {
            f"{t} {m}": round(summary.loc[(t, m), column], 1) for t, m in COLUMNS if (t, m) in summary.index
        }
    best = {f"{t} {m}": summary.loc[(t, m), "maskclip_best"] for t, m in COLUMNS if (t, m) in summary.index}
    return pd.DataFrame({"strongest MaskCLIP row": best, **rows}).T


def report(args: argparse.Namespace) -> str:
    parts = []
    for seed in args.seeds:
        overrides = [f"data.synthetic.seed={seed}", f"evaluate.split={args.split}", *args.set]
        metrics = run(args.store, overrides)
        command = shlex.join(["clips4", "run", "--preset", PRESET, *[a for o in overrides for a in ("--set", o)]])
        parts += [f"### World seed {seed}, split `{args.split}`", "", f"`{command}`", "",
                  wide(metrics).to_markdown(), "", "Gain over the strongest MaskCLIP row (points):", "",
                  gains(metrics).to_markdown(), ""]
    return "\n".join(parts)


def ablate(args: argparse.Namespace) -> str:
    base = [f"data.synthetic.seed={args.seed}", "evaluate.split=val", *args.set]
    variants = {"demo": []} | (dict(_parse(v) for v in args.variant) if args.variant else ABLATIONS)
    rows = {}
    for name, extra in variants.items():
        metrics = run(args.store, [*base, *extra])
        row = "clips4+tta" if "clips4+tta" in set(metrics["method"]) else "clips4"
        cells = metrics[metrics["method"] == row].set_index(["task", "metric"])["value"]
        rows[name] = {"overrides": " ".join(extra) or "(the demo)", "row": row,
                      **{f"{t} {m}": round(cells.get((t, m), float("nan")), 3) for t, m in COLUMNS}}
    command = shlex.join(["clips4", "run", "--preset", PRESET, *[a for o in base for a in ("--set", o)]])
    return "\n".join([f"World seed {args.seed}, split `val`; each row adds its overrides to `{command}`.", "",
                      pd.DataFrame(rows).T.to_markdown(), ""])


def _parse(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition("=")
    return name, [o for o in overrides.split(",") if o]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("report", "ablate"):
        p = sub.add_parser(name)
        p.add_argument("--store", type=Path, default=Path("store-quality"), help="store shared by the runs")
        p.add_argument("--out", type=Path, help="markdown file to write (printed as well)")
        p.add_argument("--set", action="append", default=[], help="extra override for every run")
    sub.choices["report"].add_argument("--seeds", type=int, nargs="+", default=[0])
    sub.choices["report"].add_argument("--split", default="test")
    sub.choices["ablate"].add_argument("--seed", type=int, default=0)
    sub.choices["ablate"].add_argument("--variant", action="append", help="NAME=key=value,key=value (repeatable)")
    args = parser.parse_args()
    text = report(args) if args.command == "report" else ablate(args)
    invocation = shlex.join(["python", "bench/quality.py", *sys.argv[1:]])
    text = f"<!-- generated by: {invocation} -->\n\n{text}"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()

"""The demo on several synthetic worlds, scored on a split never used for a choice (``test``): every method row of
the evaluate table per world, their mean ± std over worlds, each world's gain of the best clips4 row over the
strongest MaskCLIP row of the same teacher, the checks that gain must pass, and a plot.

Writes ``worlds.md`` (tables), ``worlds.csv`` (every figure, tidy) and ``worlds.png`` into ``--out``.
Run: python bench/worlds.py --seeds 1 2 3 4 5            (worlds never used for a choice; seed 0 is the demo's)
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from demo_runs import COLUMNS, best_of, cli, command, held_out_pair, run, wide, world_overrides, write  # noqa: E402

KNOWN, HELD = "language mIoU_known", "language mIoU_unknown"
# What the default demo has to show on worlds it was not tuned on (points of mIoU, test split).
MIN_MEAN_KNOWN_GAIN, MIN_MEAN_HELD_GAIN, MIN_WORST_HELD_GAIN = 10.0, 5.0, -2.0


def gains(tables: dict[int, pd.DataFrame]) -> pd.DataFrame:
    """Per world: the best clips4 row minus the strongest MaskCLIP row, and plain clips4 minus plain maskclip."""
    rows = []
    for seed, t in tables.items():
        best, base = best_of(t, "clips4"), best_of(t, "maskclip")
        rows.append({"seed": seed, "held out": ", ".join(held_out_pair(seed)),
                     "best clips4 - best maskclip, known": round(best[KNOWN] - base[KNOWN], 1),
                     "best clips4 - best maskclip, held out": round(best[HELD] - base[HELD], 1),
                     "clips4 - maskclip, known": round(t.loc["clips4", KNOWN] - t.loc["maskclip", KNOWN], 1),
                     "clips4 - maskclip, held out": round(t.loc["clips4", HELD] - t.loc["maskclip", HELD], 1)})
    return pd.DataFrame(rows)


def checks(g: pd.DataFrame) -> pd.DataFrame:
    known, held = g["best clips4 - best maskclip, known"], g["best clips4 - best maskclip, held out"]
    plain = (g["clips4 - maskclip, known"] + g["clips4 - maskclip, held out"]) / 2
    rows = [("mean gain on known classes", f"≥ {MIN_MEAN_KNOWN_GAIN:+.0f}", known.mean(), known.mean() >= MIN_MEAN_KNOWN_GAIN),
            ("mean gain on held-out classes", f"≥ {MIN_MEAN_HELD_GAIN:+.0f}", held.mean(), held.mean() >= MIN_MEAN_HELD_GAIN),
            ("worst world, held-out classes", f"≥ {MIN_WORST_HELD_GAIN:+.0f}", held.min(), held.min() >= MIN_WORST_HELD_GAIN),
            ("plain clips4 - plain maskclip (mean of known, held out)", "> 0", plain.mean(), plain.mean() > 0)]
    return pd.DataFrame(rows, columns=["check", "goal", "value", "passes"]).round({"value": 1})


def plot(tables: dict[int, pd.DataFrame], path) -> None:
    """Known and held-out mIoU per method row: bars at the mean over worlds, one dot per world."""
    methods = list(next(iter(tables.values())).index)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, column, title in zip(axes, (KNOWN, HELD), ("known classes", "held-out classes")):
        values = pd.DataFrame({seed: t[column] for seed, t in tables.items()}).reindex(methods)
        ax.bar(range(len(methods)), values.mean(axis=1), color="#9db4d6")
        for j, method in enumerate(methods):
            ax.scatter([j] * values.shape[1], values.loc[method], color="#1f3b66", s=12, zorder=3)
        ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
        ax.set_title(f"language mIoU, {title}")
    axes[0].set_ylabel("mIoU (points)")
    fig.suptitle(f"{len(tables)} synthetic worlds (seeds {', '.join(map(str, tables))}): mean (bar) and each world (dot)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = cli(__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--split", default="test")
    args = parser.parse_args()
    tables, tidy, parts = {}, [], []
    for seed in args.seeds:
        overrides = [*world_overrides(seed, args.split), *args.set]
        metrics = run(args.store, overrides)
        tables[seed] = wide(metrics)
        tidy.append(metrics.assign(seed=seed, held_out=",".join(held_out_pair(seed)), split=args.split))
        parts += [f"### World {seed} (held out: {', '.join(held_out_pair(seed))})", "", f"`{command(overrides)}`", "",
                  tables[seed].to_markdown(), ""]
    stacked = pd.concat(tables, names=["seed", "method"])
    mean, std = stacked.groupby(level="method", sort=False).mean(), stacked.groupby(level="method", sort=False).std()
    summary = mean.round(1).astype(str) + " ± " + std.fillna(0).round(1).astype(str)
    g = gains(tables)
    columns = ", ".join(f"{t} {m}" for t, m in COLUMNS)
    head = [f"## The demo on {len(args.seeds)} worlds, split `{args.split}`", "",
            f"mIoU in points ({columns}). Mean ± std over worlds:", "", summary.to_markdown(), "",
            "Gains per world (points):", "", g.to_markdown(index=False), "", checks(g).to_markdown(index=False), "",
            "![worlds](worlds.png)", ""]
    args.out.mkdir(parents=True, exist_ok=True)
    plot(tables, args.out / "worlds.png")
    write(args.out, "worlds", "\n".join(head + parts), pd.concat(tidy, ignore_index=True))


if __name__ == "__main__":
    main()

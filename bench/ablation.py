"""Each part of the demo switched, on the same worlds: every loss toggled (off when the demo uses it, on at weight 1
when it does not), each test-time step off, and optionally each departure from the paper put back. For each variant,
the best clips4 row's figures as the mean over worlds and the change from the demo.

Writes ``ablation.md`` and ``ablation.csv`` into ``--out``. Choices are made with ``--split val``; the reported table
uses the worlds and split of bench/worlds.py.
Run: python bench/ablation.py --seeds 1 2 3 4 5 --split test
     python bench/ablation.py --seeds 1 2 --variants "with L_sem" "no share floor"     (some variants)
     python bench/ablation.py --seeds 0 --split val --departures        (the departures, where choices are made)
     python bench/ablation.py --seeds 0 --split val --labelling --out docs/results/lsem-val    (L_sem's labels)
"""

from __future__ import annotations

import pandas as pd

from clips4.config import resolve_config
from demo_runs import PRESET, best_of, cli, command, run, wide, world_overrides, write

LOSSES = ("contrast", "emb", "sem")
TEST_TIME = {
    "no test scales": ["evaluate.test_scales=[1]"],
    "no gap re-centring": ["evaluate.recentre_gap=false"],
    "no share floor": ["evaluate.new_class_floor=0"],
}
# Each departure of the demo from the paper (docs/method.md §9), put back to the paper's form.
DEPARTURES = {
    "paper L_contrast (region positives)": ["train.contrast_targets=regions"],
    "paper L_emb (segments, image space)": ["train.emb_pooling=segments", "train.emb_space=image"],
    "patch_norm_power 1": ["train.patch_norm_power=1"],
    "grayscale views 0.2": ["train.grayscale=0.2"],
    "paper crops 0.5-1.5": ["train.crop_scale=[0.5,1.5]"],
}

# L_sem's labelling rule, floor and weight (docs/method.md §4), each set in full, where that design is chosen (val).
# With L_sem off the floor trains nothing; 0.1 is the library default.
LABELLING = {
    "without L_sem, floor at 0.1": ["train.lambda_sem=0", "cluster.labels=known_first", "cluster.known_quantile=0.1"],
    "L_sem 1, known_first, floor at 0.3": ["train.lambda_sem=1", "cluster.labels=known_first",
                                           "cluster.known_quantile=0.3"],
    "L_sem 1, known_first, floor at 0.1": ["train.lambda_sem=1", "cluster.labels=known_first",
                                           "cluster.known_quantile=0.1"],
    "L_sem 1, named clusters": ["train.lambda_sem=1", "cluster.labels=named_clusters", "cluster.known_quantile=0.1"],
    "L_sem 0.1, named clusters": ["train.lambda_sem=0.1", "cluster.labels=named_clusters",
                                  "cluster.known_quantile=0.1"],
}


def loss_variants() -> dict[str, list[str]]:
    train = resolve_config(PRESET).train
    variants = {}
    for loss in LOSSES:
        on = getattr(train, f"lambda_{loss}") > 0
        variants[f"{'without' if on else 'with'} L_{loss}"] = [f"train.lambda_{loss}={0 if on else 1}"]
    return variants


def report(args, variants: dict[str, list[str]], rows: dict[str, pd.Series], tidy: list[pd.DataFrame]) -> None:
    """Write the table of the variants measured so far (called after each, so a long sweep shows its progress)."""
    table = pd.DataFrame(rows).T
    delta = (table - table.loc["demo"]).round(1).add_prefix("Δ ")
    overrides = pd.Series({name: " ".join(variants[name]) or "(the demo)" for name in rows}, name="overrides")
    markdown = "\n".join([
        f"## Ablation over worlds {', '.join(map(str, args.seeds))}, split `{args.split}`", "",
        f"Each variant adds its overrides to `{command(world_overrides(args.seeds[0], args.split))}` (per world: its "
        "seed and held-out pair). Figures: the best clips4 row (clips4 or clips4+tta), mIoU in points, mean over "
        "worlds; Δ: change from the demo.", "",
        pd.concat([overrides, table, delta[[c for c in delta.columns if "language" in c]]], axis=1).to_markdown(), ""])
    write(args.out, "ablation", markdown, pd.concat(tidy, ignore_index=True))


def main() -> None:
    parser = cli(__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--split", default="test")
    parser.add_argument("--departures", action="store_true", help="also put back each departure from the paper")
    parser.add_argument("--labelling", action="store_true", help="also L_sem on with each labelling rule")
    parser.add_argument("--variants", nargs="+", help="only these variants (names as in the table), in this order")
    args = parser.parse_args()
    variants = {**loss_variants(), **TEST_TIME, **(DEPARTURES if args.departures else {}),
                **(LABELLING if args.labelling else {})}
    unknown = set(args.variants or []) - variants.keys()
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {sorted(variants)}")
    variants = {"demo": [], **{name: variants[name] for name in (args.variants or variants)}}
    rows, tidy = {}, []
    for name, extra in variants.items():
        per_world = []
        for seed in args.seeds:
            metrics = run(args.store, [*world_overrides(seed, args.split), *extra, *args.set])
            per_world.append(best_of(wide(metrics), "clips4"))
            tidy.append(metrics.assign(variant=name, seed=seed, split=args.split))
        rows[name] = pd.concat(per_world, axis=1).mean(axis=1).round(1)
        report(args, variants, rows, tidy)


if __name__ == "__main__":
    main()

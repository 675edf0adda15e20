"""Peak memory of data -> teacher -> features -> evaluate (language and probe) at 1x and 10x the images.

Each run is a fresh ``clips4 run`` process on the synthetic world (demo preset, an untrained clips4-vit-tiny teacher,
no student) in its own store; its peak RSS is the kernel's high-water mark of its largest process (``wait4``), and
the peak of the summed RSS of its process tree (superpixel workers included) is sampled from /proc. Both runs talk to
one Prefect server started here, so the server's memory is in neither. Every stage streams its images, so the goal
is a ratio (10x images / 1x) <= 1.3, printed last.

    python bench/memory.py [--train 80] [--test 16] [--factor 10]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from prefect.settings import PREFECT_API_URL

from clips4.flows.server import prefect_api
from clips4.storage import human_bytes

POLL_S = 0.05
STAGES = "data,teacher,features,evaluate"
OVERRIDES = [
    "teacher.train=none",  # memory does not depend on the teacher's weights
    "data.splits=[train,test]",  # the demo evaluates on test; val would only add time
    "evaluate.tasks=[language,probe]",
    "evaluate.test_scales=[1]",  # the test-time scales re-embed every image three times over on 2 CPU cores
]


def _tree_rss(pid: int) -> int:
    """Summed resident bytes of ``pid`` and its descendants (0 once it is gone)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")) * 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration, ValueError):
            continue  # the process ended while it was read (or is a zombie without memory)
    return total


def measure(images: dict[str, int], env: dict[str, str]) -> tuple[int, int, float]:
    """(peak RSS of the largest process, sampled peak of the tree's summed RSS, seconds) of one pipeline run."""
    counts = [f"data.synthetic.num_{split}={n}" for split, n in images.items()]
    with tempfile.TemporaryDirectory(prefix="clips4-memory-") as store:
        cmd = [sys.executable, "-m", "clips4.flows.cli", "run", "--preset", "demo", "--store", store,
               "--stages", STAGES, *(a for o in [*OVERRIDES, *counts] for a in ("--set", o))]
        log = Path(store) / "run.log"
        start = time.perf_counter()
        with log.open("w") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        tree_peak, done = 0, threading.Event()

        def sample() -> None:
            nonlocal tree_peak
            while not done.is_set():
                tree_peak = max(tree_peak, _tree_rss(proc.pid))
                done.wait(POLL_S)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own high-water mark, not every child's so far
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"error: the pipeline run on {images} images failed (exit {proc.returncode}):\n"
                     f"{log.read_text()[-3000:]}")
    return usage.ru_maxrss * 1024, tree_peak, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=80, help="train images at 1x")
    parser.add_argument("--test", type=int, default=16, help="test images at 1x")
    parser.add_argument("--factor", type=int, default=10, help="image count of the second run, as a multiple")
    args = parser.parse_args()
    peaks = {}
    with prefect_api(lambda line: None):
        env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
        for factor in (1, args.factor):
            images = {"train": args.train * factor, "test": args.test * factor}
            peaks[factor] = measure(images, env)
            largest, tree, seconds = peaks[factor]
            print(f"{factor}x ({sum(images.values())} images): peak RSS {human_bytes(largest)} (largest process), "
                  f"{human_bytes(tree)} (process tree, sampled), {seconds:.0f} s", flush=True)
    print(f"process tree peak RSS ratio ({args.factor}x images / 1x): {peaks[args.factor][1] / peaks[1][1]:.3f}")
    print(f"peak RSS ratio ({args.factor}x images / 1x): {peaks[args.factor][0] / peaks[1][0]:.3f}")


if __name__ == "__main__":
    main()

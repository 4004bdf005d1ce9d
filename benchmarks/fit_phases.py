"""Where the default merge's time goes: `uncurl prune` of the `fit` part's 470 MB Mixtral, timed by phase.

    PYTHONPATH=$PWD python -m benchmarks.fit_phases [--rounds 2] [--threads 1]

Each round prunes with ``--merge select`` and with the default (auto: the fit, layer by layer),
each in a fresh process (``benchmarks.run``'s options: 32 corpus texts of 256 tokens, K=4), and
prints one JSON line per prune: wall and CPU seconds, the pipeline's stages, and the fit's phases
(wall seconds inside ``fit._Layer``: ``route``, ``residual``: the merged experts' intermediates and
outputs, e = y - y'_0; ``accumulate``: A and C from those intermediates; ``solve``; ``measure``: the
step's sweep), with the RSS peak of each phase over the process's baseline. ``--threads 1`` keeps
other work on a shared machine from multiplying each op's cost (torch's thread team waits at every
op's barrier for threads the scheduler has parked). The floor of the default, if the intermediates
and the step's sweep cost nothing: its wall less ``residual`` and ``measure``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import torch

from benchmarks import run as bench


def child(merge: str, folder: str) -> None:
    from uncurl import fit
    from uncurl.pipeline import PruneOptions, prune

    seconds, peaks, current = {}, {}, ["other"]

    def timed(name):
        f = getattr(fit._Layer, name)

        @functools.wraps(f)
        def g(*a, **k):
            start, before, current[0] = time.perf_counter(), current[0], name
            try:
                return f(*a, **k)
            finally:
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
                current[0] = before
        setattr(fit._Layer, name, g)

    for name in ("route", "residual", "accumulate", "solve", "measure"):
        timed(name)
    base = bench.warm_up()
    seconds.clear()
    stop = threading.Event()

    def sample():
        while not stop.wait(0.005):
            peaks[current[0]] = max(peaks.get(current[0], 0.0), bench.rss_mb())

    threading.Thread(target=sample, daemon=True).start()
    with tempfile.TemporaryDirectory(dir=os.path.dirname(folder)) as d:
        start, cpu = time.perf_counter(), time.process_time()
        result = prune(PruneOptions(model=folder, out=os.path.join(d, "out"), data_dir=str(bench.DATA),
                                    **{**bench.PRUNE_ARGS, "merge": merge}))
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    stop.set()
    print(json.dumps({"merge": merge, "threads": torch.get_num_threads(), "seconds": round(wall, 2),
                      "cpu_seconds": round(cpu, 2), "stages": result.report["timings_s"],
                      "fit_phases": {k: round(v, 2) for k, v in seconds.items()},
                      "peak_mb": {k: round(v - base, 1) for k, v in peaks.items()},
                      "load_average": round(os.getloadavg()[0], 2)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        return child(*args.child)
    with bench.mixtral_on_disk(768) as (folder, *_):
        for _ in range(args.rounds):
            for merge in ("select", "auto"):
                out = subprocess.run([sys.executable, "-m", "benchmarks.fit_phases", "--threads", str(args.threads),
                                      "--child", merge, str(folder)], capture_output=True, text=True, check=True,
                                     cwd=bench.ROOT).stdout
                print(out.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()

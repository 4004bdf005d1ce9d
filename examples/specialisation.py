"""Do the experts specialise? Router usage per corpus file and per task, against sampling noise.

    .venv/bin/python examples/specialisation.py      # the model examples/train_smoe.py trains
    .venv/bin/python examples/specialisation.py --model /tmp/smoke/model --samples 16 --out /tmp/spec/specialisation.json

Sources: each corpus file's held-out tail (``corpus:<file>``, the passages of the ``corpus`` task
that train_smoe.py never trains on) and the calibration split of six tasks, up to --samples texts
each (``load_examples(..., limit=N, seed=0)``). uncurl's router profiler gives, per source and MoE
layer, the expert usage distribution (``RouterStats.frequency``: each expert's share of top-k
slots). Sources are compared by Jensen-Shannon divergence (base 2: 0 same usage, 1 disjoint).

The noise floor is a split-half baseline: each source's texts in two random halves, profiled
separately (their counts add up to the whole source's, so it costs no extra pass), and the JS
between the halves. Headline: mean between-source JS / mean split-half JS; near 1, routing differs
between sources no more than resampling one source does; >> 1, experts specialise. A half has
half the texts, so the baseline overstates a whole source's noise (conservative);
``ratio_same_size`` compares halves of different sources instead. Routers see tokens, so sources
with other vocabularies or prompt formats differ even in a barely trained model: compare with the
same command on an early checkpoint (same --samples), not with 1 alone.

Writes --out (JSON: per-layer JS matrices, split-half JS, usage, entropies, top experts, versions)
and a heatmap PNG beside it (sources x sources, mean JS over layers), and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
from dataclasses import replace
from pathlib import Path

import torch

from uncurl.adapters import find_moe_layers
from uncurl.load import load_model
from uncurl.profile import profile_model
from uncurl.report import versions
from uncurl.tasks import SPLITS, get_task, load_examples

log = logging.getLogger("specialisation")
DEFAULT_MODEL = Path(os.environ.get("UNCURL_CACHE", Path.home() / ".cache" / "uncurl")) / "smoe-mixtral-8x" / "model"
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data"
TASKS = ("superglue-rte", "superglue-cb", "superglue-copa", "superglue-boolq", "arc-easy", "piqa")
TOP = 3  # experts listed per source and layer


def source_texts(data_dir: Path, samples: int) -> dict[str, list[str]]:
    """Up to ``samples`` texts per source: the corpus task one file at a time, then each task."""
    corpus = get_task("corpus")
    tasks = [replace(corpus, name=f"corpus:{path.stem}", local_files=dict.fromkeys(SPLITS, f"corpus/{path.name}"))
             for path in sorted((data_dir / "corpus").glob("*.txt"))] + [get_task(name) for name in TASKS]
    return {t.name: [e.text for e in load_examples(t, "calibration", data_dir, limit=samples, seed=0)] for t in tasks}


def split_halves(texts: list[str], seed: int = 0) -> tuple[list[str], list[str]]:
    """Two random halves of ``texts`` (the second gets the odd one out)."""
    order = random.Random(seed).sample(range(len(texts)), len(texts))
    return [texts[i] for i in order[: len(texts) // 2]], [texts[i] for i in order[len(texts) // 2:]]


def half_counts(loaded, texts: list[str], max_length: int) -> tuple[torch.Tensor, int]:
    """Top-k selection counts [2 halves, MoE layers, experts] over ``texts``, and its token count."""
    counts, tokens = [], 0
    for half in split_halves(texts):
        profile = profile_model(loaded.model, loaded.tokenizer, loaded.adapter, half, max_length=max_length)
        counts.append(torch.stack([stats.counts for stats in profile.layers.values()]))
        tokens += profile.tokens
    return torch.stack(counts), tokens


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence in bits (in [0, 1]) between distributions on the last axis."""
    m = (p + q) / 2
    kl_m = lambda a: (torch.xlogy(a, a) - torch.xlogy(a, m)).sum(-1)  # noqa: E731
    return ((kl_m(p) + kl_m(q)) / (2 * math.log(2))).clamp(0, 1)


def analyse(counts: dict[str, torch.Tensor]) -> dict:
    """Usage, pairwise JS, split-half JS, entropies and top experts from each source's half counts."""
    names = list(counts)
    halves = torch.stack([counts[n] for n in names]).double()  # [S, 2, L, E]
    half_usage = halves / halves.sum(-1, keepdim=True)
    usage = halves.sum(1) / halves.sum((1, -1)).unsqueeze(-1)  # [S, L, E]: RouterStats.frequency of the whole
    pair = js_divergence(usage[:, None], usage[None, :])  # [S, S, L]
    split = js_divergence(half_usage[:, 0], half_usage[:, 1])  # [S, L]
    cross = js_divergence(half_usage[:, None, 0], half_usage[None, :, 1])  # [S, S, L]: half A of i vs half B of j
    off = ~torch.eye(len(names), dtype=torch.bool)
    between, same_size, noise = pair[off].mean(0), cross[off].mean(0), split.mean(0)  # [L] each
    top = usage.topk(min(TOP, usage.shape[-1]), dim=-1)
    entropy = -torch.xlogy(usage, usage).sum(-1) / math.log(2)  # [S, L], bits (at most log2 E)
    return {
        "sources": {n: {"usage": _r(usage[s]), "entropy_bits": _r(entropy[s]), "split_half_js": _r(split[s]),
                        "split_half_js_mean": round(float(split[s].mean()), 6),
                        "top_experts": [[[int(e), round(float(f), 4)] for e, f in zip(i, v)]
                                        for i, v in zip(top.indices[s], top.values[s])]}
                    for s, n in enumerate(names)},
        "js_per_layer": _r(pair.permute(2, 0, 1)),
        "js_mean": _r(pair.mean(-1)),
        "per_layer": {"between_js": _r(between), "split_half_js": _r(noise), "ratio": _r(between / noise)},
        "between_js": round(float(between.mean()), 6), "split_half_js": round(float(noise.mean()), 6),
        "ratio": round(float(between.mean() / noise.mean()), 4),  # the headline
        "ratio_same_size": round(float(same_size.mean() / noise.mean()), 4),
    }


def _r(t: torch.Tensor) -> list:
    return t.double().round(decimals=6).tolist()


def save_heatmap(result: dict, path: Path) -> Path:
    """Sources x sources mean JS over layers, split-half JS on the diagonal."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    names = list(result["sources"])
    matrix = torch.tensor(result["js_mean"])
    matrix.diagonal().copy_(torch.tensor([s["split_half_js_mean"] for s in result["sources"].values()]))
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(names), 0.6 * len(names)))
    im = ax.imshow(matrix, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for i in range(len(names)):
        for j in range(len(names)):
            light = matrix[i, j] > 0.6 * matrix.max()
            ax.text(j, i, f"{matrix[i, j]:.3f}", ha="center", va="center", fontsize=6, color="k" if light else "w")
    model = "/".join(Path(result["model"]).parts[-2:])
    ax.set_title(f"expert usage JS (bits), mean over layers; diagonal: split-half\n"
                 f"between / split-half = {result['ratio']:.2f}  ({model})", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def print_table(result: dict) -> None:
    """The mean JS matrix (split-half JS on its diagonal), per-layer summary and the headline ratio."""
    from rich.console import Console
    from rich.table import Table

    names = list(result["sources"])
    console = Console(width=max(Console().width, 30 + 5 * len(names)))  # a pipe's 80 columns squash the matrix
    matrix = Table(title="1000 x JS (bits) of expert usage, mean over layers; diagonal (italic): split-half JS",
                   title_justify="left", padding=(0, 1, 0, 0))
    matrix.add_column("source")
    for j in range(len(names)):
        matrix.add_column(str(j + 1), justify="right")
    for i, name in enumerate(names):
        noise = result["sources"][name]["split_half_js_mean"]
        matrix.add_row(f"{i + 1} {name}", *(f"[italic]{1000 * noise:.0f}[/]" if i == j else f"{1000 * v:.0f}"
                                          for j, v in enumerate(result["js_mean"][i])))
    layers = Table("MoE layer", "between-source JS", "split-half JS", "ratio", title="per layer", title_justify="left")
    per = result["per_layer"]
    for name, b, s, r in zip(result["layers"], per["between_js"], per["split_half_js"], per["ratio"]):
        layers.add_row(name, f"{b:.4f}", f"{s:.4f}", f"{r:.2f}")
    console.print(matrix, layers)
    console.print(f"[bold]between-source JS / split-half JS = {result['ratio']:.2f}[/] (same-size halves: "
                  f"{result['ratio_same_size']:.2f}; >> 1: routing differs between sources beyond sampling noise)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="a transformers folder (default: train_smoe.py's)")
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--samples", type=int, default=64, help="texts per source (split in two halves for the baseline)")
    ap.add_argument("--max-length", type=int, default=256, help="tokens per text (train_smoe.py's sequence length)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "specialisation.json")
    args = ap.parse_args()
    if args.samples < 4:
        ap.error(f"--samples {args.samples}: need at least 4 texts per source (two halves of 2)")
    if not (args.model / "config.json").is_file():
        ap.error(f"--model {args.model}: no transformers folder there; train one with examples/train_smoe.py")
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    loaded = load_model(str(args.model), device="auto")
    texts = source_texts(args.data_dir, args.samples)
    counts, tokens = {}, {}
    for name, source in texts.items():
        log.info("profiling %s: %d texts", name, len(source))
        counts[name], tokens[name] = half_counts(loaded, source, args.max_length)
    result = {"model": str(args.model.resolve()), "data_dir": str(args.data_dir.resolve()), "samples": args.samples,
              "max_length": args.max_length, "seed": 0, "versions": versions(),
              "layers": [layer.name for layer in find_moe_layers(loaded.model, loaded.adapter)],
              "texts": {n: len(t) for n, t in texts.items()}, "tokens": tokens, **analyse(counts)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    save_heatmap(result, args.out.with_suffix(".png"))
    print_table(result)


if __name__ == "__main__":
    main()

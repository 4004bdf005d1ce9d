"""MTP (next-token-prediction) blocks pruned with the model (uncurl/mtp.py).

Tiny deepseek_v3 (61 layers, so the MTP block is ``model.layers.61`` as in DeepSeek-V3/R1 and transformers ignores it
on load) and glm4_moe (46 layers: GLM-4.5-Air's ``model.layers.46``) are saved by transformers, then given a random
MTP block named as the Hub repos name it (``tests/mtp_util.py``). Checked on the written files: the block keeps
exactly K experts under the parent's names and shapes, the count stays 1, transformers loads the output with no
missing or unexpected key; ``--keep E`` gives the block's tensors bit for bit; the block's profile equals a direct
computation through transformers' own ``MtpModel`` layer on the same inputs; a family uncurl does not run (and a
config announcing a block the files lack) gets its count set to 0 and no MTP tensor.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mtp_util import add_mtp_blocks
from uncurl.load import build_tiny, load_model
from uncurl.pipeline import ProfileOptions, PruneOptions, prune, run_profile

FAMILIES = {"deepseek_v3": 61, "glm4_moe": 46}  # the layer count of DeepSeek-V3 / GLM-4.5-Air
E = 8


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


@pytest.fixture(scope="module")
def mtp_dirs(tmp_path_factory):
    """family -> a saved tiny model with one Hub-style MTP block."""
    cache = {}

    def get(family):
        if family not in cache:
            folder = tmp_path_factory.mktemp(f"mtp-{family}")
            model, tok = build_tiny(family, num_hidden_layers=FAMILIES[family])
            model.save_pretrained(folder)
            tok.save_pretrained(folder)
            add_mtp_blocks(folder)
            cache[family] = folder
        return cache[family]

    return get


def run(model, out, data_dir, **kw):
    opts = dict(task="superglue-rte", data_dir=str(data_dir), samples=4, max_length=24, batch_size=4, plots=False,
                device="cpu", keep=4)
    return prune(PruneOptions(model=str(model), out=str(out), **{**opts, **kw})).report


def mtp_names(state: dict, index: int) -> dict[str, torch.Tensor]:
    prefix = f"model.layers.{index}."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_mtp_block_pruned_to_k_under_its_own_names(family, mtp_dirs, data_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    src = mtp_dirs(family)
    n = FAMILIES[family]
    report = run(src, tmp_path / "out", data_dir, merge="aligned", pipeline="whole")
    out = tmp_path / "out"
    parent, child = read_all(src), read_all(out)
    before, after = mtp_names(parent, n), mtp_names(child, n)
    experts = {int(m.group(1)) for k in after if (m := re.match(r"mlp\.experts\.(\d+)\.", k))}
    assert experts == set(range(4))
    # the parent's names, the experts renumbered 0..K-1; shapes as the parent's but for the expert axis
    assert set(after) == {k for k in before if not re.match(r"mlp\.experts\.([4-9])\.", k)}
    for k, t in after.items():
        want = list(before[k].shape)
        if k in ("mlp.gate.weight", "mlp.gate.e_score_correction_bias"):
            want[0] = 4
        assert list(t.shape) == want and t.dtype == before[k].dtype, k
    # what the merge leaves alone is the parent's, bit for bit
    for k in ("eh_proj.weight", "enorm.weight", "shared_head.head.weight", "embed_tokens.weight",
              "self_attn.o_proj.weight", "mlp.shared_experts.down_proj.weight"):
        assert torch.equal(after[k], before[k]), k
    config = json.loads((out / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1 and config["n_routed_experts"] == 4
    assert report["mtp"] == {"announced": 1, "count_key": "num_nextn_predict_layers", "kept": 1,
                             "layers": [f"model.layers.{n}.mlp"], "experts": 4, "merge": "aligned"}
    assert report["layers"][-1]["name"] == f"model.layers.{n}.mlp" and len(report["layers"][-1]["groups"]) == 4
    assert "pruned to 4 experts alike" in (out / "README.md").read_text()
    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))


def test_keep_all_reproduces_the_block_bit_for_bit(mtp_dirs, data_dir, tmp_path):
    """--keep E, layer by layer with the default merge: the block's tensors and so its output are the parent's."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_layers import MtpModel

    src = mtp_dirs("deepseek_v3")
    report = run(src, tmp_path / "out", data_dir, keep=E)
    assert report["pipeline"]["layer_by_layer"] and report["mtp"]["kept"] == 1
    before, after = mtp_names(read_all(src), 61), mtp_names(read_all(tmp_path / "out"), 61)
    assert set(before) == set(after)
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    ids = torch.tensor([[5, 17, 99, 3, 250, 7]])
    outputs = []
    for folder in (src, tmp_path / "out"):
        main = AutoModelForCausalLM.from_pretrained(folder)
        hidden = main(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        ref = MtpModel.from_pretrained(main)
        with torch.no_grad():
            outputs.append(ref.forward_layer(0, hidden[:, :-1], torch.arange(5)[None], None, input_ids=ids[:, 1:]))
    assert torch.equal(*outputs)


@pytest.mark.parametrize("pipeline", ["whole", "sequential"])
def test_mtp_profile_is_a_direct_computation_on_its_inputs(pipeline, mtp_dirs, data_dir):
    """The block's router statistics in the profile equal those computed here, independently: the last decoder
    layer's output (a hook), the block's own embedding of the next token (read from the file, zeroed at position 0),
    and transformers' MtpModel layer (its enorm/hnorm/eh_proj and decoder layer) run on them."""
    from transformers.masking_utils import create_causal_mask
    from transformers.modeling_layers import MtpModel

    from uncurl.profile import indexed_batches

    src = mtp_dirs("glm4_moe")
    n = FAMILIES["glm4_moe"]
    opts = ProfileOptions(model=str(src), task="superglue-rte", data_dir=str(data_dir), samples=6, max_length=20,
                          batch_size=3, device="cpu", pipeline=pipeline, out="unused")
    loaded = load_model(str(src), device="cpu")
    profile = run_profile(loaded, opts)
    stats = profile.layers[f"model.layers.{n}.mlp"]

    loaded = load_model(str(src), device="cpu")
    model = loaded.model
    ref = MtpModel.from_pretrained(model)
    embed = read_all(src)[f"model.layers.{n}.embed_tokens.weight"]
    last, seen = {}, {}
    model.model.layers[-1].register_forward_hook(lambda m, a, o: last.update(h=o[0] if isinstance(o, tuple) else o))
    ref.layers[0].mtp_block.mlp.gate.register_forward_hook(lambda m, a, o: seen.update(out=o))
    from uncurl.pipeline import calibration_texts

    texts, _ = calibration_texts(opts, 0, loaded.tokenizer)
    counts, logit_sum, tokens = torch.zeros(E), torch.zeros(E, dtype=torch.float64), 0
    with torch.no_grad():
        for _, batch in indexed_batches(loaded.tokenizer, texts, batch_size=3, max_length=20):
            model(**batch)
            ids, mask = batch["input_ids"][:, 1:], batch["attention_mask"][:, 1:]
            e = torch.nn.functional.embedding(ids, embed)
            e[:, 0] = 0
            pos = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
            causal = create_causal_mask(config=ref.config, inputs_embeds=e, attention_mask=mask, past_key_values=None,
                                        position_ids=pos)
            ref.layers[0](e, last["h"][:, :-1], position_embeddings=ref.rotary_emb(e, position_ids=pos),
                          attention_mask=causal, position_ids=pos, past_key_values=None)
            logits, _, index = seen["out"]
            valid = mask.reshape(-1).bool()
            counts += torch.bincount(index.reshape(-1, index.shape[-1])[valid].reshape(-1), minlength=E)
            logit_sum += logits.reshape(-1, E)[valid].double().sum(0)
            tokens += int(valid.sum())
    assert stats.tokens == tokens
    assert torch.equal(stats.counts.to(counts.dtype), counts)
    torch.testing.assert_close(stats.logit_sum, logit_sum, rtol=1e-5, atol=1e-4)


def test_announced_but_absent_block_is_dropped_with_count_zero(data_dir, tmp_path):
    """transformers' tiny deepseek_v3 announces one MTP block it has no tensors for: the output announces none."""
    report = run("builtin:deepseek_v3", tmp_path / "out", data_dir, merge="aligned")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 0
    assert report["mtp"]["kept"] == 0 and "the checkpoint holds none" in report["mtp"]["why_dropped"]
    assert "**dropped**" in (tmp_path / "out" / "README.md").read_text()


def test_family_uncurl_does_not_run_drops_its_blocks(data_dir, tmp_path):
    """ERNIE-4.5 keeps its MTP tensors as model.mtp_* (transformers ignores 'mtp'): dropped, count 0, said why."""
    from safetensors.torch import save_file

    model, tok = build_tiny("ernie4_5_moe")
    src = tmp_path / "ernie"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    state = read_all(src)
    h = model.config.hidden_size
    state.update({"model.mtp_emb_norm.0.weight": torch.ones(h), "model.mtp_linear_proj.0.weight": torch.randn(h, 2 * h)})
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    (src / "config.json").write_text(json.dumps(config))
    report = run(src, tmp_path / "out", data_dir, merge="aligned")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_nextn_predict_layers"] == 0
    assert not [k for k in read_all(tmp_path / "out") if "mtp" in k]
    assert report["mtp"]["kept"] == 0 and "ernie4_5_moe" in report["mtp"]["why_dropped"]


def test_fp8_input_keeps_its_mtp_block_in_fp8(mtp_dirs, data_dir, tmp_path):
    """DeepSeek-V3's FP8 layout, MTP block included: a pruning criterion keeps K of the block's experts, byte for
    byte with their scales, renumbered; the block's other quantized tensors are the input's bytes too."""
    from test_quant import blockwise_fp8, write_folder

    src = mtp_dirs("deepseek_v3")
    state, fp8 = read_all(src), {}
    for name, t in state.items():
        if name.endswith("proj.weight") and t.dim() == 2 and "eh_proj" not in name:
            q, s = blockwise_fp8(t, [8, 8])
            fp8[name], fp8[name.removesuffix("weight") + "weight_scale_inv"] = q, s
        else:
            fp8[name] = t
    qc = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [8, 8],
          "modules_to_not_convert": ["lm_head"]}
    folder = write_folder(src, tmp_path / "fp8", fp8, qc)
    report = run(folder, tmp_path / "out", data_dir, method="frequency")
    assert report["mtp"]["kept"] == 1
    out = mtp_names(read_all(tmp_path / "out"), 61)
    src61 = mtp_names(fp8, 61)
    kept = report["layers"][-1]["groups"]
    assert report["layers"][-1]["name"] == "model.layers.61.mlp" and all(len(g) == 1 for g in kept)
    for k, (j,) in enumerate(kept):
        for part in ("gate_proj.weight", "gate_proj.weight_scale_inv", "down_proj.weight", "down_proj.weight_scale_inv"):
            assert torch.equal(out[f"mlp.experts.{k}.{part}"].view(torch.uint8) if "scale" not in part
                               else out[f"mlp.experts.{k}.{part}"], src61[f"mlp.experts.{j}.{part}"].view(torch.uint8)
                               if "scale" not in part else src61[f"mlp.experts.{j}.{part}"])
    assert out["self_attn.o_proj.weight"].dtype == torch.float8_e4m3fn
    assert torch.equal(out["self_attn.o_proj.weight"].view(torch.uint8), src61["self_attn.o_proj.weight"].view(torch.uint8))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_nextn_predict_layers"] == 1

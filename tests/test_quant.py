"""Quantized checkpoints in, the same format out (uncurl/quant.py).

Tiny qwen3_moe and deepseek_v3 models are saved by transformers and rewritten here, in-process, into
DeepSeek-V3's FP8 layout (``float8_e4m3fn`` weights of every linear transformers converts, each
with a float32 ``weight_scale_inv`` per block, ``quantization_config.quant_method = "fp8"``; blocks
of 16x16 / 8x8, which the format allows, for the tiny shapes), and a tiny gpt_oss into gpt-oss's
MXFP4 layout (``experts.*_blocks`` / ``_scales``, ``quant_method = "mxfp4"``), each by an
independent quantizer below. Their *dequantized twins* hold the same weights dequantized in float32
and no quantization_config. Checked: kept experts and every untouched tensor are the input's bytes,
merges are quantized again within the format's rounding, the output reloads cleanly with
transformers and runs as the twin pruned the same way, and bad inputs exit 2 with nothing written.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import pretrained
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from uncurl.adapters import ADAPTERS, expert_count
from uncurl.cli import app
from uncurl.errors import CheckpointCheckError
from uncurl.load import build_tiny
from uncurl.pipeline import PruneOptions, prune
from uncurl.quant import CODECS
from uncurl.save import verify_checkpoint

FAMILIES = {"qwen3_moe": [16, 16], "deepseek_v3": [8, 8]}  # FP8's weight_block_size (every shape divides)
CASES = [*FAMILIES, "gpt_oss"]  # gpt_oss: MXFP4, its published format
FORMATS = {"qwen3_moe": "fp8 (e4m3, 16x16 blocks)", "deepseek_v3": "fp8 (e4m3, 8x8 blocks)",
           "gpt_oss": "mxfp4 (e2m1, 32-value blocks, e8m0 scales)"}
E4M3_MAX = 448.0
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
runner = CliRunner()


def blockwise_fp8(w: torch.Tensor, block) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's weight_quant, written out: scale = amax/448 per block, q = w/scale in e4m3."""
    (bo, bi), (o, i) = block, w.shape
    tiles = w.float().reshape(o // bo, bo, i // bi, bi)
    scale = tiles.abs().amax(dim=(1, 3)) / E4M3_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (tiles / scale[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).reshape(o, i)
    return q, scale


def blockwise_dequant(q: torch.Tensor, scale: torch.Tensor, block) -> torch.Tensor:
    (bo, bi), (o, i) = block, q.shape
    return (q.float().reshape(o // bo, bo, i // bi, bi) * scale.float()[:, None, :, None]).reshape(o, i)


def mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-oss's layout of a fused expert tensor [E, A, B]: blocks uint8 [E, B, A/32, 16] (even value in
    the low nibble), scales uint8 [E, B, A/32] (2^(s-127), the least power of two putting the block's
    largest value within 6); each value the nearest E2M1 one."""
    g = w.float().transpose(1, 2).unflatten(-1, (-1, 32))
    exp = torch.ceil(torch.log2(g.abs().amax(-1) / 6.0))
    x = g / torch.exp2(exp).unsqueeze(-1)
    nibble = (x.unsqueeze(-1) - E2M1).abs().argmin(-1).to(torch.uint8)  # the nearest grid value (ties: the first)
    return (nibble[..., 0::2] | (nibble[..., 1::2] << 4)), (exp + 127).to(torch.uint8)


def mxfp4_dequant(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    values = torch.stack([E2M1[(blocks & 15).long()], E2M1[(blocks >> 4).long()]], -1).flatten(-2)
    return (values * torch.exp2(scales.float() - 127).unsqueeze(-1)).flatten(-2).transpose(-1, -2)


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


def write_folder(src: Path, dst: Path, tensors: dict, quantization_config: dict | None) -> Path:
    dst.mkdir(parents=True)
    for p in src.iterdir():
        if p.name != "model.safetensors":
            shutil.copyfile(p, dst / p.name)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


@pytest.fixture(scope="module")
def fp8_dirs(tmp_path_factory):
    """family -> (the quantized folder, its dequantized twin, FP8 block size or None for MXFP4)."""
    cache = {}

    def get(family):
        if family not in cache:
            root = tmp_path_factory.mktemp(f"quantized-{family}")
            model, tok = build_tiny(family, seed=0)
            model.save_pretrained(root / "plain")
            tok.save_pretrained(root / "plain")
            linears = {f"{n}.weight" for n, m in model.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"}
            block = FAMILIES.get(family)
            fp8, twin = {}, {}
            for name, t in read_all(root / "plain").items():
                if block is None and name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # MXFP4
                    fp8[name + "_blocks"], fp8[name + "_scales"] = b, sc = mxfp4(t)
                    twin[name] = mxfp4_dequant(b, sc).contiguous()
                elif block is not None and (name in linears or re.search(r"\.experts\.\d+\.\w+\.weight$", name)):
                    q, s = blockwise_fp8(t, block)
                    fp8[name], fp8[name.removesuffix("weight") + "weight_scale_inv"] = q, s
                    twin[name] = blockwise_dequant(q, s, block)
                else:
                    fp8[name] = twin[name] = t
            qc = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": block,
                  "modules_to_not_convert": ["lm_head"]}
            if block is None:  # gpt-oss's own
                qc = {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                 "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"}
            cache[family] = (write_folder(root / "plain", root / "fp8", fp8, qc),
                             write_folder(root / "plain", root / "twin", twin, None), block)
        return cache[family]

    return get


def run_prune(model: Path, out: Path, data_dir, **kw):
    opts = dict(task="superglue-rte", data_dir=str(data_dir), samples=8, max_length=64, plots=False, device="cpu")
    return prune(PruneOptions(model=str(model), out=str(out), **{**opts, **kw})).report


def experts_of(names, family):
    return {n for n in names if ".experts." in n}


@pytest.mark.parametrize("family", CASES)
def test_keep_all_reproduces_the_input_tensors_byte_for_byte(family, fp8_dirs, data_dir, tmp_path):
    fp8, _, _ = fp8_dirs(family)
    e = expert_count(pretrained(fp8).config, ADAPTERS[family])  # transformers dequantizes on CPU
    report = run_prune(fp8, tmp_path / "out", data_dir, keep=e, method="reap")
    src, got = read_all(fp8), read_all(tmp_path / "out")
    assert got.keys() == src.keys()
    for name in src:
        assert got[name].dtype == src[name].dtype and raw(got[name]) == raw(src[name]), name
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"] == json.loads((fp8 / "config.json").read_text())["quantization_config"]
    assert report["model"]["format"] == report["model"]["format_before"] == FORMATS[family]
    assert report["model"]["bytes_before"] == report["model"]["bytes_after"] == sum(t.nbytes for t in src.values())


@pytest.fixture(scope="module")
def reap_runs(fp8_dirs, data_dir, tmp_path_factory):
    """family -> (FP8 input, twin, FP8 output, twin's output, report): --method reap --keep 4 on both."""
    cache = {}

    def get(family):
        if family not in cache:
            fp8, twin, _ = fp8_dirs(family)
            root = tmp_path_factory.mktemp(f"reap-{family}")
            report = run_prune(fp8, root / "fp8", data_dir, keep=4, method="reap")
            # auto runs aligned on the FP8 input (kept in its format); the twin the same, as asked
            run_prune(twin, root / "twin", data_dir, keep=4, method="reap", merge="aligned")
            cache[family] = (fp8, twin, root / "fp8", root / "twin", report)
        return cache[family]

    return get


@pytest.mark.parametrize("family", CASES)
def test_reap_writes_the_kept_experts_quantized_bytes_and_scales_as_they_were(family, reap_runs):
    fp8, _, out, _, report = reap_runs(family)
    src, got = read_all(fp8), read_all(out)
    # the serving cost counts the weights as stored, not as held dequantized while pruning
    for when in ("before", "after"):
        assert report["cost"][when]["weight_bytes"] == report["model"][f"bytes_{when}"]
    assert report["model"]["bytes_before"] == sum(f.stat().st_size for f in fp8.glob("*.safetensors")) - sum(
        8 + int.from_bytes(open(f, "rb").read(8), "little") for f in fp8.glob("*.safetensors"))  # tensor bytes on disk
    router = ADAPTERS[family].router_attr
    kept = 0
    for layer in report["layers"]:
        prefix = layer["name"] + ".experts."
        assert all(len(g) == 1 for g in layer["groups"])
        rows = [g[0] for g in layer["groups"]]
        for k, j in enumerate(rows):  # FP8: one tensor per expert, renumbered
            for name in [n for n in src if n.startswith(f"{prefix}{j}.")]:
                new = f"{prefix}{k}." + name[len(f"{prefix}{j}."):]
                assert got[new].dtype == src[name].dtype and raw(got[new]) == raw(src[name]), (new, name)
                kept += 1
        for name in [n for n in src if n.startswith(prefix) and not n[len(prefix)].isdigit()]:  # MXFP4: fused
            assert got[name].dtype == src[name].dtype and raw(got[name]) == raw(src[name][rows]), name
            kept += 1
        for buffer in ("weight", "bias", "e_score_correction_bias"):  # router rows: the kept ones, in their dtype
            name = f"{layer['name']}.{router}.{buffer}"
            if name in src:
                assert got[name].dtype == src[name].dtype and torch.equal(got[name], src[name][rows]), name
    assert kept and any(n.endswith(("weight_scale_inv", "_scales")) for n in got)
    for name in set(src) - experts_of(src, family):  # everything else: the input's bytes
        if f".{router}." not in name:
            assert raw(got[name]) == raw(src[name]), name
    # the experts' bytes as stored (weights and scales) are K/E of the input's
    e = expert_count(pretrained(fp8).config, ADAPTERS[family])
    expert_bytes = [sum(t.nbytes for n, t in d.items() if n in experts_of(d, family)) for d in (src, got)]
    assert expert_bytes[1] * e == expert_bytes[0] * 4
    assert report["model"]["bytes_after"] == sum(t.nbytes for t in got.values()) < report["model"]["bytes_before"]


@pytest.mark.parametrize("family", CASES)
def test_the_output_reloads_cleanly_and_runs_as_the_dequantized_twin_pruned_alike(family, reap_runs, ids):
    _, _, out, twin_out, report = reap_runs(family)
    model, info = pretrained(out, output_loading_info=True)  # dequantized on CPU by transformers
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    twin = pretrained(twin_out)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, twin(ids).logits)  # exact: the kept experts are the input's
    assert report["checks"]["forward_ok"] and report["checks"]["experts_per_layer"] == 4


@pytest.mark.parametrize("family", FAMILIES)
def test_a_merge_is_quantized_again_within_fp8_rounding(family, fp8_dirs, data_dir, tmp_path):
    fp8, _, block = fp8_dirs(family)
    report = run_prune(fp8, tmp_path / "out", data_dir, keep=4, method="uncurl", merge="average", router_rows="mean")
    src, got = read_all(fp8), read_all(tmp_path / "out")
    merged = 0
    for layer in report["layers"]:
        prefix = layer["name"] + ".experts."
        for k, (members, weights) in enumerate(zip(layer["groups"], layer["merge_weights"])):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                name, scale = f"{prefix}{k}.{proj}.weight", f"{prefix}{k}.{proj}.weight_scale_inv"
                assert got[name].dtype == torch.float8_e4m3fn and got[scale].dtype == torch.float32
                assert got[scale].shape == src[f"{prefix}0.{proj}.weight_scale_inv"].shape
                if len(members) == 1:
                    assert raw(got[name]) == raw(src[f"{prefix}{members[0]}.{proj}.weight"])
                    continue
                members_f32 = [blockwise_dequant(src[f"{prefix}{e}.{proj}.weight"],
                                                 src[f"{prefix}{e}.{proj}.weight_scale_inv"], block) for e in members]
                exact = sum(w * m.double() for w, m in zip(weights, members_f32))  # the float32 merge
                back = blockwise_dequant(got[name], got[scale], block).double()
                s = got[scale].double().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
                # e4m3 keeps 3 mantissa bits: half a step is 2^-4 of the value (2^-10 of the scale below
                # the normal range), plus the report's 6-decimal merge weights
                bound = 2 ** -4 * exact.abs() + 2 ** -10 * s + 1e-6 * sum(m.double().abs() for m in members_f32)
                assert ((back - exact).abs() <= bound).all(), (name, float(((back - exact).abs() - bound).max()))
                merged += 1
    assert merged


def test_an_mxfp4_merge_is_quantized_again_within_e2m1_rounding(fp8_dirs, data_dir, tmp_path):
    mx, _, _ = fp8_dirs("gpt_oss")
    report = run_prune(mx, tmp_path / "out", data_dir, keep=4, method="uncurl", merge="average", router_rows="mean")
    src, got = read_all(mx), read_all(tmp_path / "out")
    merged = 0
    for layer in report["layers"]:
        for proj in ("gate_up_proj", "down_proj"):
            name = f"{layer['name']}.experts.{proj}"
            assert got[name + "_blocks"].shape[0] == got[name + "_scales"].shape[0] == 4
            before = mxfp4_dequant(src[name + "_blocks"], src[name + "_scales"]).double()
            after = mxfp4_dequant(got[name + "_blocks"], got[name + "_scales"]).double()
            for k, (members, weights) in enumerate(zip(layer["groups"], layer["merge_weights"])):
                if len(members) == 1:
                    assert raw(got[name + "_blocks"][k]) == raw(src[name + "_blocks"][members[0]])
                    continue
                exact = sum(w * before[e] for e, w in zip(members, weights))
                scale = torch.exp2(got[name + "_scales"][k].double() - 127).repeat_interleave(32, -1).T
                # E2M1 steps are at most a quarter of the value above 1 (x scale), 0.25 x scale below it
                bound = 0.25 * exact.abs() + 0.25 * scale + 1e-6 * sum(before[e].abs() for e in members)
                assert ((after[k] - exact).abs() <= bound).all(), (name, k)
                merged += 1
    assert merged


def test_dequantize_writes_full_precision_equal_to_the_twins_prune(fp8_dirs, reap_runs, data_dir, tmp_path):
    fp8, _, _, twin_out, _ = reap_runs("qwen3_moe")
    report = run_prune(fp8, tmp_path / "out", data_dir, keep=4, method="reap", dequantize=True, merge="aligned")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config
    got, want = read_all(tmp_path / "out"), read_all(twin_out)
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    assert report["model"]["format"] == "float32 (dequantized from fp8 (e4m3, 16x16 blocks))"


def test_the_checks_from_disk_run_on_the_quantized_output(reap_runs, tmp_path):
    """verify_checkpoint reloads an FP8 checkpoint (dequantized) and catches NaN in it."""
    _, _, out, _, _ = reap_runs("qwen3_moe")
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    tok = build_tiny("qwen3_moe")[1]
    verify_checkpoint(copy, ADAPTERS["qwen3_moe"], 4, 2, tok)  # intact: passes
    tensors = read_all(copy)
    name = "model.layers.0.mlp.experts.1.down_proj.weight_scale_inv"
    tensors[name] = tensors[name].clone()
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointCheckError, match=r"non-finite values in .*mlp\.experts\.down_proj"):
        verify_checkpoint(copy, ADAPTERS["qwen3_moe"], 4, 2, tok)


def nothing_written(out: Path) -> bool:
    return not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def cli_prune(model: Path, out: Path, data_dir, *extra):
    args = ["prune", "--model", model, "--keep", 4, "--out", out, "--data-dir", data_dir, "--samples", 8,
            "--max-length", 64, "--no-plots", *extra]
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("scheme", ["gptq", "awq", "bitsandbytes", "compressed-tensors"])
def test_an_unsupported_scheme_exits_2_naming_it(scheme, fp8_dirs, data_dir, tmp_path):
    _, twin, _ = fp8_dirs("qwen3_moe")
    folder = tmp_path / "model"
    shutil.copytree(twin, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": scheme, "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    res = cli_prune(folder, tmp_path / "out", data_dir)
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert f"'{scheme}'" in text and "dequantize it first" in text and "--dequantize" in text
    assert nothing_written(tmp_path / "out")


@pytest.mark.parametrize("damage", ["shape", "missing"])
def test_scales_that_do_not_fit_their_weights_exit_2_naming_the_tensor(damage, fp8_dirs, data_dir, tmp_path):
    fp8, _, _ = fp8_dirs("qwen3_moe")
    folder = tmp_path / "model"
    shutil.copytree(fp8, folder)
    tensors = read_all(folder)
    name = "model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"
    if damage == "shape":
        tensors[name] = tensors[name][:1].clone()
    else:
        del tensors[name]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    res = cli_prune(folder, tmp_path / "out", data_dir)
    assert res.exit_code == 2, res.output
    assert name in res.output.replace("\n", "") or name.removesuffix("_scale_inv") in res.output.replace("\n", "")
    assert nothing_written(tmp_path / "out")


def test_the_codec_round_trips_blocks_that_do_not_divide_the_shape():
    """DeepSeek-V3's kv_a_proj_with_mqa [576, 7168] has ceil(576/128) = 5 row blocks: the last one partial."""
    codec, qc = CODECS["fp8"], {"weight_block_size": [16, 16]}
    w = torch.randn(40, 24) * torch.logspace(-3, 1, 24)
    spec = type("S", (), {"dtype": torch.float8_e4m3fn})(), type("S", (), {"dtype": torch.bfloat16})()
    q, s = codec.quantize(w, spec, qc)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.bfloat16 and s.shape == (3, 2)
    back = codec.dequantize(q, (s,), qc)
    scale = s.float().repeat_interleave(16, 0)[:40].repeat_interleave(16, 1)[:, :24]
    # bfloat16 scales round amax/448 up or down by 2^-9: values at the block's max may clip by that much
    assert ((back - w).abs() <= 2 ** -4 * w.abs() + 2 ** -10 * scale + 2 ** -8 * w.abs()).all()


def test_dequantize_cannot_pass_a_scheme_transformers_cannot_load_here(fp8_dirs, data_dir, tmp_path):
    """--dequantize hands an unknown scheme to transformers; where it cannot load it (GPTQ without its
    kernels), the run exits 2 saying so, not with a traceback."""
    _, twin, _ = fp8_dirs("qwen3_moe")
    folder = tmp_path / "model"
    shutil.copytree(twin, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    res = cli_prune(folder, tmp_path / "out", data_dir, "--dequantize")
    assert res.exit_code == 2, res.output
    assert "'gptq'" in res.output and "dequantize the checkpoint first" in " ".join(res.output.split())
    assert nothing_written(tmp_path / "out")


def test_the_codecs_quantize_as_the_published_recipes():
    """uncurl's quantizers give the bytes of the independent ones above (DeepSeek-V3's weight_quant; the
    E2M1 nearest value under the least power-of-two scale), and dequantize them back alike."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 64, 96, generator=g) * torch.logspace(-4, 0, 96)
    fp8, spec = CODECS["fp8"], (type("S", (), {"dtype": torch.float8_e4m3fn}), type("S", (), {"dtype": torch.float32}))
    q, s = fp8.quantize(w[0], spec, {"weight_block_size": [16, 16]})
    q_ref, s_ref = blockwise_fp8(w[0], [16, 16])
    assert raw(q) == raw(q_ref) and torch.equal(s, s_ref)
    assert torch.equal(fp8.dequantize(q, (s,), {"weight_block_size": [16, 16]}), blockwise_dequant(q, s, [16, 16]))
    blocks, scales = CODECS["mxfp4"].quantize(w, None, {})
    b_ref, s_ref = mxfp4(w)
    assert torch.equal(scales, s_ref) and torch.equal(blocks, b_ref)  # (a tie between two values may round apart)
    assert torch.equal(CODECS["mxfp4"].dequantize(blocks, (scales,), {}), mxfp4_dequant(blocks, scales))


def test_partial_blocks_are_dequantized_as_deepseek_lays_them_out(tmp_path, data_dir):
    """16x16 blocks over deepseek_v3's kv_a_proj_with_mqa [24, 64]: the last row block holds 8 rows.
    uncurl reads it with ceil(24/16) = 2 row blocks (transformers 5.23's CPU path would take blocks
    of 12 rows), prunes it and writes it back byte for byte."""
    model, tok = build_tiny("deepseek_v3", seed=0)
    model.save_pretrained(tmp_path / "plain")
    tok.save_pretrained(tmp_path / "plain")
    linears = {f"{n}.weight" for n, m in model.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"}
    qc = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [16, 16]}
    like = (type("S", (), {"dtype": torch.float8_e4m3fn}), type("S", (), {"dtype": torch.float32}))
    fp8, want = {}, {}
    for name, t in read_all(tmp_path / "plain").items():
        if name in linears or re.search(r"\.experts\.\d+\.\w+\.weight$", name):
            q, s = CODECS["fp8"].quantize(t, like, qc)
            fp8[name], fp8[name.removesuffix("weight") + "weight_scale_inv"] = q, s
            full = s.repeat_interleave(16, 0)[: q.shape[0]].repeat_interleave(16, 1)[:, : q.shape[1]]
            want[name] = q.float() * full
        else:
            fp8[name] = t
    name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    assert fp8[name].shape == (24, 64) and fp8[name.replace("weight", "weight_scale_inv")].shape == (2, 4)
    folder = write_folder(tmp_path / "plain", tmp_path / "fp8", fp8, qc)
    from uncurl.load import load_model

    held = load_model(str(folder), device="cpu").model.state_dict()
    assert torch.equal(held[name], want[name])
    run_prune(folder, tmp_path / "out", data_dir, keep=8, method="frequency")
    got = read_all(tmp_path / "out")
    assert got.keys() == fp8.keys() and all(raw(got[n]) == raw(fp8[n]) for n in fp8)


def test_offloaded_to_disk_writes_the_same_quantized_checkpoint(reap_runs, data_dir, tmp_path):
    """--device-map with the model offloaded to disk (accelerate): the dequantized weights it offloads
    and reads back make the same profile, plan and FP8 files."""
    fp8, _, out, _, _ = reap_runs("qwen3_moe")
    report = run_prune(fp8, tmp_path / "out", data_dir, keep=4, method="reap", device="auto", device_map="auto",
                       max_memory="cpu=100KB")
    assert "disk" in report["model"]["placement"]
    want, got = read_all(out), read_all(tmp_path / "out")
    assert got.keys() == want.keys() and all(raw(got[n]) == raw(want[n]) for n in want)


def test_sharded_in_and_out(reap_runs, data_dir, tmp_path):
    """An FP8 input in two shards with an index, written in shards of 100KB: the same tensors, every
    one named in the index, scales beside or apart from their weights alike."""
    fp8, _, out, _, _ = reap_runs("qwen3_moe")
    folder = tmp_path / "sharded"
    shutil.copytree(fp8, folder)
    tensors = read_all(folder)
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):  # a weight and its scale land in different shards
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(folder / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    run_prune(folder, tmp_path / "out", data_dir, keep=4, method="reap", shard_size="100KB")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    want, got = read_all(out), read_all(tmp_path / "out")
    assert set(index["weight_map"]) == got.keys() == want.keys() and all(raw(got[n]) == raw(want[n]) for n in want)


def test_a_quantized_hub_model_is_read_from_its_snapshot_in_the_hub_cache(fp8_dirs, data_dir, tmp_path):
    """`--model ORG/NAME` of an FP8 model: uncurl reads the files of its snapshot in the Hub cache
    (laid out as huggingface_hub lays it out; offline, so only the cache is asked) and keeps the
    format, exactly as for the same files in a local folder; the cache is never written to."""
    import hashlib
    import os
    import subprocess
    import sys

    fp8, _, _ = fp8_dirs("qwen3_moe")
    revision = "0" * 40
    repo = tmp_path / "hub" / "models--someorg--tiny-fp8"
    shutil.copytree(fp8, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in repo.rglob("*") if p.is_file()}
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    common = ["--keep", "4", "--method", "reap", "--data-dir", str(data_dir), "--samples", "8", "--max-length", "64",
              "--no-plots", "--device", "cpu"]
    res = subprocess.run([sys.executable, "-m", "uncurl", "prune", "--model", "someorg/tiny-fp8", "--out",
                          str(tmp_path / "hub-out"), *common], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    local = runner.invoke(app, ["prune", "--model", str(fp8), "--out", str(tmp_path / "local-out"), *common])
    assert local.exit_code == 0, local.output
    assert read_all(tmp_path / "hub-out").keys() == read_all(tmp_path / "local-out").keys()
    for name, t in read_all(tmp_path / "hub-out").items():
        assert raw(t) == raw(read_all(tmp_path / "local-out")[name]), name
    config = json.loads((tmp_path / "hub-out" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "fp8"
    assert "base_model: \"someorg/tiny-fp8\"" in (tmp_path / "hub-out" / "README.md").read_text()
    assert before == {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in repo.rglob("*") if p.is_file()}
    # not in the cache: exit 2, saying to pass a local folder
    res = subprocess.run([sys.executable, "-m", "uncurl", "prune", "--model", "someorg/absent", "--out",
                          str(tmp_path / "none"), *common], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "someorg/absent" in res.stderr and not (tmp_path / "none").exists(), res.stderr


# ---- the spellings real repos use: MiniMax-M2's fmt, DeepSeek-V3.1's UE8M0 scales -----------------------

def requantized(fp8: Path, dst: Path, quantization_config: dict, scale=lambda s: s) -> Path:
    """``fp8``'s checkpoint with another quantization_config, every FP8 weight quantized again from the
    plain model with its block scales passed through ``scale`` (q = w / scale, clamped to e4m3)."""
    plain, tensors = read_all(fp8.parent / "plain"), read_all(fp8)
    block = json.loads((fp8 / "config.json").read_text())["quantization_config"]["weight_block_size"]
    for name, t in list(tensors.items()):
        if t.dtype == torch.float8_e4m3fn:
            (bo, bi), (o, i) = block, t.shape
            s = scale(blockwise_fp8(plain[name], block)[1])
            tiles = plain[name].float().reshape(o // bo, bo, i // bi, bi) / s[:, None, :, None]
            tensors[name] = tiles.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).reshape(o, i)
            tensors[name.removesuffix("weight") + "weight_scale_inv"] = s
    return write_folder(fp8.parent / "plain", dst, tensors, quantization_config)


def is_power_of_two(s: torch.Tensor) -> bool:
    return bool((s > 0).all()) and torch.equal(torch.exp2(torch.round(torch.log2(s.double()))), s.double())


def test_minimax_m2s_spelling_of_e4m3_is_accepted_and_kept(fp8_dirs, data_dir, tmp_path):
    """MiniMax-M2 writes ``fmt: "float8_e4m3fn"`` (torch's name) where DeepSeek writes ``"e4m3"``; another
    format is refused naming the accepted spellings."""
    fp8, _, _ = fp8_dirs("deepseek_v3")
    qc = {**json.loads((fp8 / "config.json").read_text())["quantization_config"], "fmt": "float8_e4m3fn"}
    model = requantized(fp8, tmp_path / "minimax", qc)
    report = run_prune(model, tmp_path / "out", data_dir, keep=4, method="reap")
    assert report["model"]["format"] == FORMATS["deepseek_v3"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"] == qc
    src, got = read_all(model), read_all(tmp_path / "out")
    assert {n for n in src if ".experts." not in n} <= got.keys()
    assert all(raw(got[n]) == raw(src[n]) for n in src if ".experts." not in n and ".gate." not in n)
    bad = requantized(fp8, tmp_path / "e5m2", {**qc, "fmt": "e5m2"})
    result = cli_prune(bad, tmp_path / "refused", data_dir)
    assert result.exit_code == 2 and nothing_written(tmp_path / "refused"), result.output
    assert "fmt 'e5m2' (supported: 'e4m3', 'float8_e4m3fn')" in " ".join(result.output.split())


def test_ue8m0_scales_stay_powers_of_two_and_merges_stay_within_fp8_rounding(fp8_dirs, data_dir, tmp_path):
    """DeepSeek-V3.1's ``scale_fmt: "ue8m0"``: every block scale a power of two, stored as float32. Kept
    experts are the input's bytes; a merged expert is quantized again with its scales rounded up to a power
    of two (no value clamped), within e4m3's rounding of the float32 merge; the config is kept."""
    fp8, _, block = fp8_dirs("deepseek_v3")
    qc = {**json.loads((fp8 / "config.json").read_text())["quantization_config"], "scale_fmt": "ue8m0"}
    model = requantized(fp8, tmp_path / "v3.1", qc, scale=lambda s: torch.exp2(torch.ceil(torch.log2(s))))
    src = read_all(model)
    assert all(is_power_of_two(t) for n, t in src.items() if n.endswith("_scale_inv"))
    report = run_prune(model, tmp_path / "out", data_dir, keep=4, method="uncurl", merge="average",
                       router_rows="mean")
    got = read_all(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"] == qc
    assert report["model"]["format"] == "fp8 (e4m3, 8x8 blocks, ue8m0 scales)"
    scales = {n: t for n, t in got.items() if n.endswith("_scale_inv")}
    assert scales and all(t.dtype == torch.float32 and is_power_of_two(t) for t in scales.values())
    merged = 0
    for layer in report["layers"]:
        prefix = layer["name"] + ".experts."
        for k, (members, weights) in enumerate(zip(layer["groups"], layer["merge_weights"])):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                name, scale = f"{prefix}{k}.{proj}.weight", f"{prefix}{k}.{proj}.weight_scale_inv"
                if len(members) == 1:
                    e = members[0]
                    assert raw(got[name]) == raw(src[f"{prefix}{e}.{proj}.weight"])
                    assert raw(got[scale]) == raw(src[f"{prefix}{e}.{proj}.weight_scale_inv"])
                    continue
                members_f32 = [blockwise_dequant(src[f"{prefix}{e}.{proj}.weight"],
                                                 src[f"{prefix}{e}.{proj}.weight_scale_inv"], block) for e in members]
                exact = sum(w * m.double() for w, m in zip(weights, members_f32))
                (bo, bi), (o, i) = block, exact.shape
                amax = exact.abs().reshape(o // bo, bo, i // bi, bi).amax(dim=(1, 3))
                # the least power of two that keeps the block's largest value within e4m3 (up to the 1e-6 of
                # the report's rounded merge weights): nothing clamped, no precision given away
                s = got[scale].double()
                assert (amax / s <= E4M3_MAX * (1 + 1e-6)).all() and (amax / s > E4M3_MAX / 2 * (1 - 1e-6)).all()
                back = blockwise_dequant(got[name], got[scale], block).double()
                full = s.repeat_interleave(bo, 0).repeat_interleave(bi, 1)
                bound = 2 ** -4 * exact.abs() + 2 ** -10 * full + 1e-6 * sum(m.double().abs() for m in members_f32)
                assert ((back - exact).abs() <= bound).all(), (name, float(((back - exact).abs() - bound).max()))
                merged += 1
    assert merged

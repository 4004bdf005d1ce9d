"""Quantized checkpoints in, the same format out (uncurl/quant.py).

Tiny qwen3_moe and deepseek_v3 models are saved by transformers and rewritten here, in-process, into
DeepSeek-V3's FP8 layout (``float8_e4m3fn`` weights of every linear transformers converts, each
with a float32 ``weight_scale_inv`` per block, ``quantization_config.quant_method = "fp8"``; blocks
of 16x16 / 8x8, which the format allows, for the tiny shapes). Their *dequantized twins* hold the
same weights dequantized in float32 and no quantization_config: what transformers loads from the
FP8 folder on a CPU. Checked: kept experts and every untouched tensor are the input's bytes, merges
are quantized again within FP8's rounding, the output reloads cleanly and runs as the twin pruned
the same way, and bad inputs exit 2 with nothing written.
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

FAMILIES = {"qwen3_moe": [16, 16], "deepseek_v3": [8, 8]}  # weight_block_size (every shape divides)
E4M3_MAX = 448.0
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
    """family -> (the FP8 folder, its dequantized twin, block size)."""
    cache = {}

    def get(family):
        if family not in cache:
            root = tmp_path_factory.mktemp(f"fp8-{family}")
            model, tok = build_tiny(family, seed=0)
            model.save_pretrained(root / "plain")
            tok.save_pretrained(root / "plain")
            linears = {f"{n}.weight" for n, m in model.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"}
            block = FAMILIES[family]
            fp8, twin = {}, {}
            for name, t in read_all(root / "plain").items():
                if name in linears or re.search(r"\.experts\.\d+\.\w+\.weight$", name):
                    q, s = blockwise_fp8(t, block)
                    fp8[name], fp8[name.removesuffix("weight") + "weight_scale_inv"] = q, s
                    twin[name] = blockwise_dequant(q, s, block)
                else:
                    fp8[name] = twin[name] = t
            qc = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": block,
                  "modules_to_not_convert": ["lm_head"]}
            cache[family] = (write_folder(root / "plain", root / "fp8", fp8, qc),
                             write_folder(root / "plain", root / "twin", twin, None), block)
        return cache[family]

    return get


def run_prune(model: Path, out: Path, data_dir, **kw):
    opts = dict(task="superglue-rte", data_dir=str(data_dir), samples=8, max_length=64, plots=False, device="cpu")
    return prune(PruneOptions(model=str(model), out=str(out), **{**opts, **kw})).report


def experts_of(names, family):
    return {n for n in names if re.search(r"\.experts\.\d+\.", n)}


@pytest.mark.parametrize("family", FAMILIES)
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
    assert report["model"]["format"] == report["model"]["format_before"] == f"fp8 (e4m3, {FAMILIES[family][0]}x" \
                                                                          f"{FAMILIES[family][1]} blocks)"
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
            run_prune(twin, root / "twin", data_dir, keep=4, method="reap")
            cache[family] = (fp8, twin, root / "fp8", root / "twin", report)
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_reap_writes_the_kept_experts_fp8_bytes_and_scales_as_they_were(family, reap_runs):
    fp8, _, out, _, report = reap_runs(family)
    src, got = read_all(fp8), read_all(out)
    kept = 0
    for layer in report["layers"]:
        prefix = layer["name"] + ".experts."
        assert all(len(g) == 1 for g in layer["groups"])
        for k, (j,) in enumerate(layer["groups"]):
            for name in [n for n in src if n.startswith(f"{prefix}{j}.")]:
                new = f"{prefix}{k}." + name[len(f"{prefix}{j}."):]
                assert got[new].dtype == src[name].dtype and raw(got[new]) == raw(src[name]), (new, name)
                kept += 1
        rows = [g[0] for g in layer["groups"]]
        for buffer in ("weight", "e_score_correction_bias"):  # router rows: the kept ones, in their dtype
            name = f"{layer['name']}.gate.{buffer}"
            if name in src:
                assert got[name].dtype == src[name].dtype and torch.equal(got[name], src[name][rows]), name
    assert kept and any(n.endswith("weight_scale_inv") for n in got)
    for name in set(src) - experts_of(src, family):  # everything else: the input's bytes
        if ".gate." not in name:
            assert raw(got[name]) == raw(src[name]), name
    # the experts' bytes as stored (weights and scales) are K/E of the input's
    e = expert_count(pretrained(fp8).config, ADAPTERS[family])
    expert_bytes = [sum(t.nbytes for n, t in d.items() if n in experts_of(d, family)) for d in (src, got)]
    assert expert_bytes[1] * e == expert_bytes[0] * 4
    assert report["model"]["bytes_after"] == sum(t.nbytes for t in got.values()) < report["model"]["bytes_before"]


@pytest.mark.parametrize("family", FAMILIES)
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


def test_dequantize_writes_full_precision_equal_to_the_twins_prune(fp8_dirs, reap_runs, data_dir, tmp_path):
    fp8, _, _, twin_out, _ = reap_runs("qwen3_moe")
    report = run_prune(fp8, tmp_path / "out", data_dir, keep=4, method="reap", dequantize=True)
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

"""On a CUDA GPU (``pytest -m cuda``; skipped without one, run by ``make gpu-check``): what the CPU
tests cannot show. Every run under ``same_device.SameDevice`` fails at the first op that mixes
devices, naming it. Written without a GPU at hand: its first run on one is its first check.

- the profile on cuda: the whole-model pass and the layer-by-layer one equal, and a run equal to
  itself bit for bit (deterministic sums);
- a ``cuda:0`` + ``cpu`` device map (what two GPUs do, one of them the CPU): masks made on the
  input device, every op on one device, the profile equal to the resident CPU model's;
- the batch threads run in the caller's CUDA stream;
- hidden states parked in pinned CPU memory give the same profile;
- ``uncurl prune`` on cuda: whole and sequential write the same checkpoint (to float rounding), the
  default merge (the fit) runs, and a quantized (MXFP4) write equals the CPU's within E2M1 rounding;
- serving measurements read the peak of every GPU used.
"""

from __future__ import annotations

import json

import pytest
import torch
from same_device import SameDevice
from test_quant import fp8_dirs, read_all, run_prune  # noqa: F401 - fp8_dirs is a fixture
from typer.testing import CliRunner

from uncurl import devices
from uncurl.adapters import ADAPTERS
from uncurl.cli import app
from uncurl.load import build_tiny
from uncurl.profile import profile_model
from uncurl.sequential import Call, drive, decoder_layers, forward_of, profile_sequential, run_layers
from uncurl.stats import STATISTICS, add_by_index

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda:0")
runner = CliRunner()


def assert_same_profile(got, want, tol=1e-6):
    assert got.layer_index == want.layer_index
    for name, w in want.layers.items():
        g = got.layers[name]
        assert g.tokens == w.tokens
        for stat in STATISTICS:
            torch.testing.assert_close(getattr(g, stat).cpu(), getattr(w, stat).cpu(), rtol=tol, atol=tol, msg=stat)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_whole_and_sequential_profiles_agree_on_cuda(family, texts):
    model, tok = build_tiny(family, seed=0)
    model = model.to(CUDA)
    adapter = ADAPTERS[family]
    with SameDevice():
        whole = profile_model(model, tok, adapter, texts, batch_size=2, max_length=32, seed=3)
        again = profile_model(model, tok, adapter, texts, batch_size=2, max_length=32, seed=3)
        seq = profile_sequential(model, tok, adapter, texts, batch_size=2, max_length=32, seed=3)
    assert_same_profile(seq, whole)
    for name, w in whole.layers.items():  # deterministic: a run equals itself bit for bit
        for stat in STATISTICS:
            assert torch.equal(getattr(again.layers[name], stat), getattr(w, stat)), (name, stat)


def test_per_expert_sums_on_cuda_equal_the_cpus():
    g = torch.Generator().manual_seed(0)
    index, values = torch.randint(0, 128, (50_000,), generator=g), torch.rand(50_000, generator=g, dtype=torch.float64)
    cpu, gpu = torch.zeros(128, dtype=torch.float64), torch.zeros(128, dtype=torch.float64, device=CUDA)
    add_by_index(cpu, index, values)
    add_by_index(gpu, index.to(CUDA), values.to(CUDA))
    again = torch.zeros(128, dtype=torch.float64, device=CUDA)
    add_by_index(again, index.to(CUDA), values.to(CUDA))
    assert torch.equal(gpu, again)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-12, atol=0)


def test_a_cuda_and_cpu_device_map_profiles_on_one_device_per_op(tiny_dirs, texts):
    from conftest import pretrained

    from uncurl.load import load_model

    folder = tiny_dirs("mixtral")
    resident = load_model(str(folder), device="cpu")
    want = profile_model(resident.model, resident.tokenizer, resident.adapter, texts, batch_size=2, max_length=32)
    split = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": "cpu",
             "model.norm": "cpu", "lm_head": 0}
    placed = pretrained(folder, device_map=split).eval()
    assert {str(d) for d in devices.used_devices(placed)} == {"cpu", "cuda:0"}
    for driver in (profile_sequential, profile_model):
        with SameDevice():
            got = driver(placed, resident.tokenizer, resident.adapter, texts, batch_size=2, max_length=32)
        assert_same_profile(got, want, tol=1e-4)


def test_batch_threads_run_in_the_callers_stream(texts):
    model, tok = build_tiny("mixtral", seed=0)
    model = model.to(CUDA)
    adapter = ADAPTERS["mixtral"]
    layers = decoder_layers(model, adapter)
    seen = []

    def work(model, batch):
        seen.append((torch.cuda.current_device(), torch.cuda.current_stream()))
        model(**batch, use_cache=False)

    def visit(i, calls: list[Call]):
        return [call.run(forward_of(layers[i][1]), CUDA) for call in calls]

    batches = [{"input_ids": torch.randint(0, 200, (2, 8), device=CUDA)} for _ in range(3)]
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        drive(model, layers, batches, visit, work)
    assert seen == [(0, stream)] * 3


def test_parked_states_give_the_same_profile(texts, monkeypatch):
    model, tok = build_tiny("mixtral", seed=0)
    model = model.to(CUDA)
    adapter = ADAPTERS["mixtral"]
    made = []
    original = devices.Parking.__init__

    def init(self, *a, **k):
        original(self, *a, **k)
        made.append(self)

    monkeypatch.setattr(devices.Parking, "__init__", init)
    kept = run_layers(model, tok, adapter, texts, batch_size=2, max_length=32, states="device")
    with SameDevice():
        parked = run_layers(model, tok, adapter, texts, batch_size=2, max_length=32, states="cpu")
    assert made[-1].parked_bytes > 0 and made[0].parked_bytes == 0
    for name, w in kept.layers.items():
        for stat in STATISTICS:
            assert torch.equal(getattr(parked.layers[name], stat), getattr(w, stat)), (name, stat)


def _prune(*args):
    res = runner.invoke(app, ["prune", *map(str, args)])
    assert res.exit_code == 0, res.output
    return res


def test_prune_on_cuda_whole_and_sequential_write_the_same_checkpoint(tiny_dirs, data_dir, tmp_path):
    from safetensors.torch import load_file

    base = ["--model", tiny_dirs("mixtral"), "--task", "superglue-rte", "--data-dir", data_dir, "--samples", 8,
            "--max-length", 32, "--keep", 4, "--method", "reap", "--merge", "aligned", "--no-plots",
            "--device", "cuda"]
    for pipeline in ("whole", "sequential"):
        _prune(*base, "--pipeline", pipeline, "--out", tmp_path / pipeline)
    a, b = (load_file(str(tmp_path / p / "model.safetensors")) for p in ("whole", "sequential"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_the_default_merge_runs_on_cuda(tiny_dirs, data_dir, tmp_path):
    """The CLI's defaults (the fit, layer by layer) on cuda; the fit itself is fit.py's."""
    _prune("--model", tiny_dirs("mixtral"), "--task", "superglue-rte", "--data-dir", data_dir, "--samples", 8,
           "--max-length", 32, "--keep", 4, "--no-plots", "--device", "cuda", "--out", tmp_path / "o")
    report = json.loads((tmp_path / "o" / "report" / "report.json").read_text())
    assert report["pipeline"]["layer_by_layer"]


def test_a_quantized_write_on_cuda_equals_the_cpus(fp8_dirs, data_dir, tmp_path):  # noqa: F811
    mx, _, _ = fp8_dirs("gpt_oss")
    opts = dict(keep=4, method="uncurl", merge="average", router_rows="mean")
    run_prune(mx, tmp_path / "cpu", data_dir, **opts)
    run_prune(mx, tmp_path / "cuda", data_dir, device="cuda", **opts)
    cpu, gpu = read_all(tmp_path / "cpu"), read_all(tmp_path / "cuda")
    assert cpu.keys() == gpu.keys()
    for name in cpu:
        if name.endswith(("_blocks", "_scales")):  # E2M1 codes: a merge rounded differently may flip a few
            same = (cpu[name] == gpu[name]).double().mean()
            assert same > 0.99, (name, float(same))
        else:
            torch.testing.assert_close(cpu[name].float(), gpu[name].float(), rtol=1e-4, atol=1e-5, msg=name)


def test_serving_reads_the_peak_of_every_gpu(tiny_dirs):
    from conftest import pretrained

    from uncurl.serving import measure_serving

    split = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": "cpu",
             "model.norm": "cpu", "lm_head": 0}
    model = pretrained(tiny_dirs("mixtral"), device_map=split).eval()
    m = measure_serving(model, batch=2, context=32, repeats=1, decode_tokens=2)
    assert set(m["peak_memory_by_device"]) == {"cuda:0"} and m["peak_memory_bytes"] > 0

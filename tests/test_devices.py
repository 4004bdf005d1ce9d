"""Device rules that can be checked on a CPU-only machine (uncurl/devices.py); the rest is in
test_cuda.py (``-m cuda``), which runs whenever a GPU is present.

What a CPU machine can and cannot show: it has two devices, the CPU and ``meta`` (no data). An op
that mixes them is caught by ``same_device.SameDevice`` (a TorchFunctionMode that fails any op whose
tensor operands sit on two devices); an offloaded layer's weights (meta until onloaded) meeting the
CPU's states would be caught that way. What it cannot show is a mask on ``cuda:0`` indexing a tensor
on ``cuda:1``: the fix is by construction (``devices.on``/``Masks`` at every such op), checked here
as a rule and on GPUs by test_cuda.py under the same mode."""

from __future__ import annotations

import threading

import pytest
import torch
from same_device import MixedDevices, SameDevice

from uncurl import devices
from uncurl.adapters import ADAPTERS
from uncurl.devices import Ambient, Masks, Parking, held_bytes, on, parkable, should_park, used_devices
from uncurl.load import build_tiny
from uncurl.profile import profile_model
from uncurl.quant import Mxfp4
from uncurl.sequential import profile_sequential
from uncurl.stats import STATISTICS, add_by_index


def test_on_moves_to_the_tensor_it_indexes_and_keeps_what_is_there():
    x, mask = torch.zeros(3, device="meta"), torch.ones(3, dtype=torch.bool)
    assert on(mask, x).device.type == "meta" and on(mask, "meta").device.type == "meta"
    assert on(mask, torch.zeros(2)) is mask and on(None, x) is None


def test_masks_copy_once_per_device():
    m = Masks(torch.tensor([True, False, True]))
    first, again = m.on(torch.zeros(1, device="meta")), m.on(torch.device("meta"))
    assert first is again and first.device.type == "meta" and m.on(torch.zeros(1)) is m.mask
    assert m.numel() == 3 and Masks(None).on(torch.zeros(1)) is None


def test_the_mode_catches_an_op_that_mixes_devices():
    with SameDevice() as mode:
        torch.zeros(3) + torch.ones(3)
        torch.zeros(3, device="meta") * torch.tensor(2.0)  # a CPU scalar: PyTorch allows it
        torch.zeros(3).to("meta")  # moves are allowed
        with pytest.raises(MixedDevices, match="meta"):
            torch.zeros(3, device="meta") + torch.ones(3)
        with pytest.raises(MixedDevices, match="bucketize"):
            torch.bucketize(torch.zeros(3, device="meta"), torch.tensor([0.5]))
    assert mode.checked >= 3


def test_mxfp4_quantizes_and_dequantizes_on_the_device_of_its_input():
    """quant.py's MXFP4: the boundaries of bucketize and the value table were CPU tensors; on a GPU
    input that mixed devices. ``meta`` stands for the GPU: the mode fails any op with a CPU operand."""
    w = torch.randn(2, 64, 32).to("meta")
    with SameDevice():
        blocks, scales = Mxfp4().quantize(w, None, {})
        back = Mxfp4().dequantize(blocks, (scales,), {})
    assert blocks.device.type == scales.device.type == back.device.type == "meta"
    assert back.shape == w.shape


def test_per_expert_sums_equal_index_add_and_do_not_depend_on_the_blocking(monkeypatch):
    """stats.add_by_index (deterministic on CUDA: a matrix product, no atomics) against index_add_
    on the CPU (sequential there): integer-valued sums are exact in any order, so equal bit for bit;
    real values to float64 rounding; blocks of 7 rows give the same integer sums as one block."""
    g = torch.Generator().manual_seed(0)
    index = torch.randint(0, 16, (10_000,), generator=g)
    ints = torch.randint(-50, 50, (10_000,), generator=g).double()
    reals = torch.rand(10_000, generator=g, dtype=torch.float64)
    for values, exact in ((ints, True), (reals, False)):
        want = torch.zeros(16, dtype=torch.float64).index_add_(0, index, values)
        got = torch.zeros(16, dtype=torch.float64)
        add_by_index(got, index, values)
        assert torch.equal(got, want) if exact else torch.allclose(got, want, rtol=1e-12, atol=0)
    monkeypatch.setattr("uncurl.stats.SUM_ROWS", 7)
    small = torch.zeros(16, dtype=torch.float64)
    add_by_index(small, index, ints)
    assert torch.equal(small, torch.zeros(16, dtype=torch.float64).index_add_(0, index, ints))


def test_no_statistic_adds_with_float_index_add():
    """The deterministic formulation is the one used: no statistic's update calls index_add_ on floats."""
    import inspect

    for spec in STATISTICS.values():
        assert "index_add_" not in inspect.getsource(spec.update), spec.name


def test_a_cpu_and_disk_split_profiles_under_the_same_device_rule(tiny_dirs, texts, tmp_path):
    """A device map that splits mixtral's layers between the CPU and the disk (offloaded: meta until
    accelerate brings them in), masks made on the input device: the layer-by-layer profile and the
    whole-model one run without any op mixing meta and CPU tensors, and agree with the resident
    model's profile."""
    from conftest import pretrained

    from uncurl.load import load_model

    folder = tiny_dirs("mixtral")
    resident = load_model(str(folder), device="cpu")
    adapter, tok = resident.adapter, resident.tokenizer
    want = profile_model(resident.model, tok, adapter, texts, batch_size=2, max_length=32)
    split = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
             "model.layers.1": "disk", "model.norm": "disk", "lm_head": "cpu"}
    placed = pretrained(folder, device_map=split, offload_folder=str(tmp_path)).eval()
    assert {p.device.type for p in placed.model.layers[1].parameters()} == {"meta"}
    assert {p.device.type for p in placed.model.layers[0].parameters()} == {"cpu"}
    for driver in (profile_sequential, profile_model):
        with SameDevice() as mode:
            got = driver(placed, tok, adapter, texts, batch_size=2, max_length=32)
        assert mode.checked > 1000
        for name, w in want.layers.items():
            for stat in STATISTICS:
                torch.testing.assert_close(getattr(got.layers[name], stat), getattr(w, stat), rtol=1e-6, atol=1e-6)
    assert used_devices(placed) == [torch.device("cpu")]  # meta is where weights wait, not where they run


def test_every_batch_thread_enters_the_drivers_cuda_device_and_stream(monkeypatch, texts):
    """The sequential driver captures the caller's CUDA device and stream (``Ambient.capture``) and
    every per-batch thread enters them before running its forward. On a CPU machine the capture is
    empty; a stand-in capture records which threads entered it."""
    entered = []

    class Recording(Ambient):
        def entered(self):
            entered.append(threading.current_thread().name)
            return super().entered()

    monkeypatch.setattr(devices.Ambient, "capture", classmethod(lambda cls: Recording(None, None)))
    assert Ambient.capture() == Recording(None, None)
    model, tok = build_tiny("mixtral", seed=0)
    profile_sequential(model, tok, ADAPTERS["mixtral"], texts, batch_size=2, max_length=32)
    assert sorted(entered) == [f"uncurl-batch-{b}" for b in range(3)]  # 5 texts, batches of 2


def test_without_cuda_the_capture_is_empty():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: test_cuda.py checks the capture")
    assert Ambient.capture() == Ambient(None, None)
    with Ambient.capture().entered():
        pass


def test_parking_decides_from_the_states_against_the_free_memory():
    cuda = torch.device("cuda:0")  # a device object needs no GPU
    assert should_park({cuda: 600}, {cuda: 1000}) and not should_park({cuda: 400}, {cuda: 1000})
    assert not should_park({torch.device("cpu"): 10**15}, {torch.device("cpu"): None})  # unknown: stay
    with pytest.raises(ValueError, match="auto, device, cpu"):
        Parking("disk")
    assert Parking("cpu").active and not Parking("device").active and not Parking("auto").decided


def test_what_stays_where_it_is():
    """Only floating tensors of two or more axes on an accelerator leave it (test_cuda.py parks
    states there): token ids, 1-d tensors, parameters, CPU tensors (already in CPU memory) and meta
    ones (offloaded weights' placeholders) stay, and count for nothing."""
    assert not parkable(torch.zeros(2, 3, 4)) and not parkable(torch.zeros(2, 3, 4, device="meta"))
    assert not parkable(torch.zeros(2, 3, dtype=torch.long))
    assert not parkable(torch.nn.Parameter(torch.zeros(2, 3)))
    base = torch.zeros(4, 8, 16)
    assert held_bytes((base, {"a": [base[:2], base]})) == {}
    parking = Parking("cpu")
    parking.arrived(((base,), {}))
    assert parking.parked_bytes == 0 and base.device.type == "cpu"


def test_the_preflight_counts_the_hidden_states(tiny_dirs, monkeypatch):
    """load.check_fits_memory: weights that fit are refused when the calibration set's states held
    between layers do not fit beside them on the CPU; on a GPU the states go to the CPU when the GPU
    cannot hold both, and are refused only when neither can."""
    from transformers import AutoConfig

    from uncurl import load
    from uncurl.errors import UncurlError

    folder = tiny_dirs("mixtral")
    config = AutoConfig.from_pretrained(folder)
    weights, _ = load.weights_needed(folder, config, "auto")
    states = load.states_needed(config, "auto", samples=64, max_length=128, copies=2)
    assert states == 2 * 64 * 128 * config.hidden_size * 4  # float32 checkpoint
    assert load.states_needed(config, "bfloat16", samples=64, max_length=128, copies=3) == states * 3 // 4
    free = {"cpu": weights + states // 2, "cuda": weights + states // 2}
    monkeypatch.setattr(load, "available_memory", lambda device: free[device.type])
    load.check_fits_memory(folder, config, "auto", torch.device("cpu"))  # the weights alone fit
    with pytest.raises(UncurlError, match="hidden states .* --samples or --max-length"):
        load.check_fits_memory(folder, config, "auto", torch.device("cpu"), states)
    free["cpu"] = 2 * states
    load.check_fits_memory(folder, config, "auto", torch.device("cuda"), states)  # to the CPU: it has room
    free["cpu"] = states // 2
    with pytest.raises(UncurlError, match="CPU memory available"):
        load.check_fits_memory(folder, config, "auto", torch.device("cuda"), states)
    free["cuda"] = weights + states
    load.check_fits_memory(folder, config, "auto", torch.device("cuda"), states)  # both on the GPU


def test_serving_reads_every_device_the_model_runs_on():
    model, _ = build_tiny("mixtral", seed=0)
    assert used_devices(model) == [torch.device("cpu")]

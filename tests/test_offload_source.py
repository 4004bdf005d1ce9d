"""Weights that --device-map sends to disk are read from the checkpoint's own files, not re-saved
into the offload folder first (offload.from_source): a model larger than memory is read once, and
needs no second copy of itself on disk. Same logits as the model loaded whole."""

from __future__ import annotations

import tempfile

import pytest
import torch

from uncurl.load import load_model
from uncurl.offload import READS, counting, install_source_loaders


def offload_files(root) -> list:
    return [p for p in root.glob("uncurl-offload-*/**/*") if p.is_file()]


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_disk_offload_reads_the_checkpoint_itself(family, tiny_dirs, ids, tmp_path, monkeypatch):
    folder = tiny_dirs(family)
    resident = load_model(str(folder), device="cpu").model
    with torch.no_grad():
        want = resident(input_ids=ids).logits
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where load_model makes its offload folder
    model = load_model(str(folder), device_map="auto", max_memory="cpu=30KB").model
    state = model.state_dict()
    offloaded = sum(t.numel() * t.element_size() for t in state.values() if t.device.type == "meta")
    assert offloaded > 0.5 * sum(t.numel() * t.element_size() for t in resident.state_dict().values())
    assert offload_files(tmp_path) == []  # nothing re-saved
    with counting(model), torch.no_grad():
        READS.reset()
        got = model(input_ids=ids).logits
        assert READS.bytes >= offloaded  # every offloaded weight came from the checkpoint
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_transformers_alone_re_saves_them(tiny_dirs, tmp_path):
    """What from_source avoids: the same load through transformers alone writes the stacked experts
    into the offload folder (so the test above can tell the difference)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs("mixtral"), device_map="auto",
                                                 max_memory={"cpu": "30KB"}, offload_folder=tmp_path / "off")
    assert any("experts" in p.name for p in (tmp_path / "off").iterdir())
    assert install_source_loaders(model) == 0  # its loaders are left alone


def test_another_transformers_release_loads_its_own_way(tiny_dirs, ids, tmp_path, monkeypatch):
    """from_source wraps transformers' loading internals only where they have the parameters it was
    written against (offload.source_loading_fits; true of the pinned release, as the first test needs);
    where they differ, the load goes transformers' own way (re-saved to the offload folder), same logits."""
    from transformers import core_model_loading as cml

    import uncurl.offload as offload

    assert offload.source_loading_fits(cml)
    folder = tiny_dirs("mixtral")
    resident = load_model(str(folder), device="cpu").model
    with torch.no_grad():
        want = resident(input_ids=ids).logits
    real = cml.offload_and_maybe_resave_param

    def renamed(target_name, param, loading_info, folder, index, applied_ops):  # a release that renamed them
        return real(target_name, param, loading_info, folder, index, applied_ops)

    monkeypatch.setattr(cml, "offload_and_maybe_resave_param", renamed)
    assert not offload.source_loading_fits(cml)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = load_model(str(folder), device_map="auto", max_memory="cpu=30KB").model
    assert offload_files(tmp_path) != []  # transformers' own path: re-saved
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=0)

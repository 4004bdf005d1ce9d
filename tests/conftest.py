"""Shared fixtures: tiny random models per registered family, the real task data, no network."""

from __future__ import annotations

import hashlib
import os
from dataclasses import fields
from pathlib import Path
from typing import Mapping

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from uncurl.adapters import ADAPTERS, broken_here, installed, needs_newer_transformers  # noqa: E402
from uncurl.load import build_tiny, model_class  # noqa: E402

# Under pytest-xdist (pyproject's addopts: one worker per core) each worker gets its share of the
# cores for torch's intra-op threads, so the workers do not oversubscribe the machine.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
FAMILIES = sorted(ADAPTERS)


def representatives() -> list[str]:
    """One family per distinct adapter layout, for tests whose cost is per family but whose code
    paths depend on the layout alone (offload, consuming merge): what an entry says beyond the
    names of its config keys and the size of its tiny instance (whether it has shared experts, grouped
routing or hybrid layers counts, not what they are called). The first six families come first."""
    names_only = {"model_type", "expert_count_key", "top_k_key", "tiny", "tiny_wrapper"}
    first = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"]
    chosen = {}
    for family in first + [f for f in FAMILIES if installed(f)]:
        a = ADAPTERS[family]
        shape = tuple(bool(v) if f.name in ("shared_attrs", "group_keys", "hybrid", "tail_rows")
                      else tuple(sorted(v.items())) if isinstance(v, Mapping) else v  # expert_axes
                      for f in fields(a) if f.name not in names_only for v in [getattr(a, f.name)])
        chosen.setdefault(shape, family)
    return sorted(set(chosen.values()))


def pytest_collection_modifyitems(items):
    """A family the installed transformers does not know yet (`make test-newest` covers it) is
    skipped, saying so, wherever a test is parametrised over families. Under pytest-xdist, one
    family's tests in test_families run on one worker, which prunes that family once for all of them."""
    for item in items:
        if item.get_closest_marker("cuda") and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (make gpu-check runs it on one)"))
        family = getattr(item, "callspec", None) and item.callspec.params.get("family")
        if family and item.module.__name__ == "test_families":
            item.add_marker(pytest.mark.xdist_group(f"family-{family}"))
        if family in ADAPTERS and not installed(family):
            item.add_marker(pytest.mark.skip(reason=needs_newer_transformers(family)))
        elif family in ADAPTERS and broken_here(ADAPTERS[family]):
            item.add_marker(pytest.mark.skip(reason=broken_here(ADAPTERS[family])))


PREPROCESSOR = '{\n  "image_processor_type": "uncurl-test",\n  "patch_size": 16\n}\n'


def is_wrapper(config) -> bool:
    """A multimodal wrapper: its language model's config is nested in it."""
    return config.get_text_config(decoder=True) is not config


def pretrained(folder, **kwargs):
    """``from_pretrained`` with the class uncurl loads the folder's config with (the causal LM, or a
    multimodal wrapper's ...ForConditionalGeneration)."""
    from transformers import AutoConfig

    return model_class(AutoConfig.from_pretrained(folder)).from_pretrained(folder, **kwargs)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "superglue" / "rte" / "train.jsonl").is_file():
        pytest.skip(f"real task data not found at {DATA_DIR}")
    return DATA_DIR


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """family -> a saved tiny model folder (built once per session, seed 0)."""
    root = tmp_path_factory.mktemp("tiny")
    cache = {}

    def get(family: str) -> Path:
        if family not in cache:
            model, tok = build_tiny(family, seed=0)
            path = root / family
            model.save_pretrained(path)
            tok.save_pretrained(path)
            if is_wrapper(model.config):  # a processor, which prune must copy as it is
                (path / "preprocessor_config.json").write_text(PREPROCESSOR)
            cache[family] = path
        return cache[family]

    return get


@pytest.fixture
def ids():
    """A fixed batch of token ids valid for every tiny model (byte tokenizer)."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (2, 12), generator=g)


@pytest.fixture
def texts():
    return [
        "The cat sat on the mat.\nQuestion: A cat sat. True or False?\nAnswer: True",
        "Paris is in France.",
        "No weapons were found.\nQuestion: Weapons were found. True or False?\nAnswer: False",
        "Short.",
        "A somewhat longer sentence about mixtures of experts and their routers, for padding.",
    ]


# The fault tests' checks (test_faults_inputs.py, test_faults_round2.py): a refusal, and an input left as it was
def digest(*paths: Path) -> dict[str, str]:
    """sha256 of every file under ``paths`` (folders walked): the input before and after a run."""
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def refused(res, out: Path | None, *needles: str, absent: tuple[str, ...] = ()) -> str:
    """Exit 2, one line ``error: ...`` holding every needle (and none of ``absent``), no traceback,
    nothing at --out nor beside it."""
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit), res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    for needle in absent:
        assert needle not in lines[0], lines[0]
    if out is not None:
        assert not out.exists() and not leftovers(out), leftovers(out)
    return lines[0]

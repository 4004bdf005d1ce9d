"""Step 1: load a pretrained SMoE (Hub id, local folder, or a built-in tiny model) and its tokenizer.

    uncurl prune --model builtin:mixtral ...      # a seeded random tiny Mixtral, no files needed
    uncurl prune --model ./my-olmoe ...           # a local transformers folder
    uncurl prune --model allenai/OLMoE-1B-7B-0924 # the Hub (set HF_HUB_OFFLINE=1 to fail fast offline)

The family is checked from the config alone, before any weight is read.

Memory: a local folder's safetensors shards are read with ``pread`` into the model's own tensors
instead of being memory-mapped. With mmap (transformers' default) every page of the file stays
mapped, and counted as resident, for as long as any unconverted tensor points into it, so loading a
checkpoint whose experts are fused on load (Mixtral, Qwen-MoE, OLMoE, ...) peaked at ~2x the
weights; with ``pread`` it is one copy plus the tensors being converted (benchmarks/run.py).

On CPU the experts run with transformers' ``eager`` implementation (a loop over the experts that
were hit) instead of the default ``grouped_mm``. On a 2-core CPU its speed is within noise of it
(three runs: -10%, -10%, +8%), and it needs a fraction of the activation memory per batch
(benchmarks/run.py, "experts_implementation"). On CUDA the default is kept; a model accelerate
places (``--device-map``) gets ``eager`` when every layer runs on the CPU (none on a GPU).
"""

from __future__ import annotations

import logging
import math
import os
import pickle
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapters import (ADAPTERS, REFUSED, TINY_BASE, MoEAdapter, get_adapter, installed, moe_config,
                       needs_newer_transformers, tiny_config)
from .errors import UncurlError
from .offload import from_source, install_source_loaders

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's placement strategies


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    adapter: MoEAdapter | None  # None: a causal LM uncurl can evaluate but not prune (load_model(moe=False))
    model_id: str
    source: Path | None  # the local folder the model came from (never written to), if any
    placement: dict = field(default_factory=dict)  # device_map and max_memory, for reloading alike
    processor_files: list = field(default_factory=list)  # copied beside the pruned checkpoint
    quantized: object | None = None  # quant.Source: a quantized input's files and format (profiled dequantized)
    loading_info: dict | None = None  # from_pretrained's (missing, unexpected, mismatched keys), for save's checks
    mtp: object | None = None  # mtp.Blocks: its MTP blocks and whether this run prunes them (pipeline.mtp_of)
    carry: object | None = None  # repo.Carried: the parent's code, licence and tokenizer files the output keeps


# A multimodal model's processor (image, video, audio preprocessing; chat template): written beside
# the pruned checkpoint as they are, so the output folder is used exactly like the input one.
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json",
                   "audio_tokenizer_config.json", "chat_template.json", "chat_template.jinja")


def processor_files(model_id: str) -> list[Path]:
    """The ``PROCESSOR_FILES`` a local folder or Hub repository has (the Hub's through its cache)."""
    folder = Path(model_id)
    if folder.is_dir():
        return [folder / name for name in PROCESSOR_FILES if (folder / name).is_file()]
    from transformers.utils import cached_file

    found = []
    for name in PROCESSOR_FILES:
        try:
            path = cached_file(model_id, name, _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False)
        except OSError:
            path = None
        if path:
            found.append(Path(path))
    return found


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UncurlError(f"--device {device}: CUDA is not available on this machine; use cpu or auto")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise UncurlError(f"--device {device!r} is not one of auto, cpu, cuda, cuda:N")
    return torch.device(device)


def input_device(model) -> torch.device:
    """Where inputs go: the embedding's device (the first one under --device-map; for an offloaded
    embedding, the device its accelerate hook runs it on)."""
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    if embeddings is None:
        return next(model.parameters()).device
    if embeddings.weight.device.type == "meta" and hasattr(embeddings, "_hf_hook"):
        return torch.device(embeddings._hf_hook.execution_device)
    return embeddings.weight.device


def byte_tokenizer():
    """A byte-level tokenizer with no merges (256 symbols + eos + pad): no files, no training.

    Used for built-in tiny models; any text round-trips.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<pad>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>")


def model_class(config):
    """The transformers class that loads and saves a checkpoint of ``config`` whole.

    A language model's is its causal LM. A multimodal wrapper (a config with a text config) gets
    its ``...ForConditionalGeneration``, so the vision (audio) towers load, stay untouched and are
    saved too: the causal-LM class some wrappers also map to would drop them. A config found in no
    causal-LM mapping (mistral4) gets its class from the image-text-to-text mapping. A config read
    with the repo's own code (``--trust-remote-code``, repo.py) gets the repo's model class.
    """
    from transformers.models.auto import modeling_auto as auto

    from .repo import remote_model_class

    remote = remote_model_class(config)
    if remote is not None:
        return remote

    mappings = [auto.MODEL_FOR_CAUSAL_LM_MAPPING, auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING,
                auto.MODEL_FOR_MULTIMODAL_LM_MAPPING]
    if config.get_text_config(decoder=True) is not config:
        mappings = mappings[1:] + mappings[:1]
    for mapping in mappings:
        if type(config) in mapping:
            return mapping[type(config)]
    raise UncurlError(f"transformers has no generative model class for a {config.model_type!r} config")


def build_tiny(model_type: str, seed: int = 0, **overrides):
    """A seeded random tiny model of ``model_type`` with the byte tokenizer."""
    tokenizer = byte_tokenizer()
    config = tiny_config(
        model_type,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        **overrides,
    )
    torch.manual_seed(seed)
    model = model_class(config)._from_config(config)
    return model.eval(), tokenizer


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _read_json(path: Path, what: str) -> dict:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UncurlError(f"{path} is not valid JSON ({err}); it should be the model's {what}") from None


def check_safetensors(path: Path) -> None:
    """Read ``path``'s header only: its JSON must parse and its tensors must end where the file does.

    A truncated download or a partly written file fails here, naming the file, before any weight
    is read.
    """
    import json

    if not path.is_file():
        raise UncurlError(f"weights file {path} is missing (named by the checkpoint's index)")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise UncurlError(f"{path} is not a safetensors file or is truncated ({size:,} bytes, header of "
                              f"{n:,} bytes announced); re-download or re-save it")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UncurlError(f"{path}: the safetensors header is not valid JSON ({err}); the file is corrupt") from None
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)
            and "data_offsets" in t]
    needed = 8 + n + max(ends, default=0)
    if needed != size:
        raise UncurlError(f"{path} is truncated or corrupt: its header places tensors up to byte {needed:,}, "
                          f"the file has {size:,}; re-download or re-save it")


def check_config_file(folder: Path) -> None:
    """A local model folder's config.json: present, and a JSON object."""
    config = folder / "config.json"
    if not config.is_file():
        raise UncurlError(f"model folder {folder} has no config.json; pass a transformers model folder "
                          f"(config.json and weights), a Hub id, or builtin:<family>")
    if not isinstance(_read_json(config, "configuration"), dict):
        raise UncurlError(f"{config} is not a JSON object; it should be the model's configuration")


def check_weight_files(folder: Path) -> None:
    """A local model folder's weight files: present, and each safetensors file whole (headers only)."""
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise UncurlError(f"model folder {folder} has config.json but no weights: expected one of "
                          f"{', '.join(WEIGHT_FILES)}")
    index = folder / "model.safetensors.index.json"
    if index.is_file() and not isinstance(_read_json(index, "weight index").get("weight_map"), dict):
        raise UncurlError(f"{index} has no weight_map; it should map each tensor to its shard")
    for path in checkpoint_files(folder):
        check_safetensors(path)


def check_generation_config(folder: Path) -> None:
    """A local model folder's generation_config.json, when there is one: a JSON object (transformers
    reads it as keyword arguments when the model is built)."""
    path = folder / "generation_config.json"
    if path.is_file() and not isinstance(_read_json(path, "generation settings (a JSON object)"), dict):
        raise UncurlError(f"{path} is not a JSON object; it should hold the model's generation settings, e.g. "
                          f"{{\"eos_token_id\": 2}} (or remove the file)")


def unsafe_pickle(model_id: str, err: Exception) -> UncurlError:
    """torch's safe loader (``weights_only``) refused a pickled checkpoint (a ``.bin`` holding more than
    tensors): the message says so in one line; uncurl never runs such a file's code."""
    import re

    why = re.search(r"WeightsUnpickler error: ([^\n]*)", str(err))
    why = (why.group(1) if why else " ".join(str(err).split())).split(". ")[0].strip()
    return UncurlError(f"model {model_id}: torch's safe loader refused its pickled weights (pytorch_model.bin: "
                       f"{why}); uncurl never runs code from a checkpoint: use its safetensors copy, or convert it to "
                       f"safetensors where you trust its source")


def check_moe_keys(folder: Path, config, adapter: MoEAdapter) -> None:
    """config.json must spell the family's expert count and top-k (or an alias transformers maps to
    them): a key left out would be transformers' default, which need not be this checkpoint's."""
    raw = _read_json(folder / "config.json", "configuration")
    target, where = moe_config(config), ""
    if target is not config:  # a multimodal wrapper: the keys live in its text config
        name = next((n for n in getattr(config, "sub_configs", {}) if getattr(config, n, None) is target), None)
        raw, where = (raw.get(name) if name else None), f" ({name})"
        if not isinstance(raw, dict):
            return  # laid out some other way: the weights' shapes are still checked
    aliases = getattr(type(target), "attribute_map", {}) or {}
    for key, what in ((adapter.expert_count_key, "expert count"), (adapter.top_k_key, "router's top-k")):
        names = {key, aliases.get(key, key)}
        names |= {alias for alias, real in aliases.items() if real in names}
        if not names & set(raw):
            raise UncurlError(f"{folder / 'config.json'}{where} has no {key!r}: the {adapter.model_type} adapter "
                              f"reads the {what} there (accepted spellings: {', '.join(sorted(names))}); the "
                              f"config is incomplete, re-save or re-download the model")


def _spellings(cls, key: str) -> list[str]:
    """``key`` and the aliases a config class maps to it (``attribute_map``), the key first."""
    aliases = getattr(cls, "attribute_map", {}) or {}
    real = aliases.get(key, key)
    return list(dict.fromkeys([key, real, *(alias for alias, target in aliases.items() if target == real)]))


def config_values(raw: dict, model_type: str | None) -> tuple[dict, str, list[tuple[str, str, object, bool]]]:
    """What ``check_config_values`` checks in a raw config.json: (the dict holding the keys, where it
    is, [(what, key as spelled, value, may be null)]) for the family's expert count, top-k and
    routing groups (the adapter table's keys) and the hidden size."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type] if model_type in CONFIG_MAPPING else None
    adapter, where, values = ADAPTERS.get(model_type), "", raw
    subs = getattr(cls, "sub_configs", None) or {}
    if "text_config" in subs and isinstance(raw.get("text_config"), dict):  # a multimodal wrapper
        cls, where, values = subs["text_config"], " (text_config)", raw["text_config"]
    wanted = [("hidden size", "hidden_size", False)]
    if adapter is not None:
        wanted += [("expert count", adapter.expert_count_key, False), ("top-k", adapter.top_k_key, False)]
        wanted += [(f"routing groups' {k}", k, True) for k in adapter.group_keys or ()]
    found = []
    for what, key, nullable in wanted:
        spelled = next((k for k in _spellings(cls, key) if k in values), None)
        if spelled is not None:
            found.append((what, spelled, values[spelled], nullable))
    return values, where, found


def check_config_values(folder: Path) -> None:
    """Before the config is built: the family's expert count, top-k and routing groups (the keys the
    adapter table names) and the hidden size are whole numbers >= 1 in config.json, and the top-k is
    at most the expert count (transformers would fail on a string, or build tensors of a negative size)."""
    raw = _read_json(folder / "config.json", "configuration")
    values, where, found = config_values(raw, raw.get("model_type"))
    file = f"{folder / 'config.json'}{where}"
    for what, key, value, nullable in found:
        if value is None and nullable:
            continue
        # a per-layer list (Hunyuan's moe_topk) holds one such number per layer (adapters._uniform)
        per_layer = what in ("expert count", "top-k") and isinstance(value, list) and value
        for item in (value if per_layer else [value]):
            bad_type = isinstance(item, bool) or not isinstance(item, int)
            if bad_type or item < 1:
                kind = f" (a {JSON_TYPES.get(type(value), type(value).__name__)})" if bad_type and value is not None else ""
                each = " (each entry of a per-layer list)" if per_layer else ""
                raise UncurlError(f"{file} has {key!r}: {json_value(value)}{kind}; the {what}{each} must be a whole "
                                  f"number >= 1, e.g. {tiny_value(raw.get('model_type'), key)}: the config is damaged, "
                                  f"fix the value or re-download the model")
    numbers = {what: (key, min(value) if what == "expert count" and isinstance(value, list) else
                      max(value) if isinstance(value, list) else value) for what, key, value, _ in found
               if value is not None}
    if "expert count" in numbers and "top-k" in numbers:
        (e_key, e), (k_key, k) = numbers["expert count"], numbers["top-k"]
        if k > e:
            raise UncurlError(f"{file} has {k_key!r}: {k} above {e_key!r}: {e}; a token's router cannot choose more "
                              f"experts than there are: the top-k must be 1..{e} (fix the config or re-download the "
                              f"model)")


def json_value(value) -> str:
    """``value`` as config.json spells it (a JSON literal), cut to 40 characters."""
    import json

    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


JSON_TYPES = {str: "string", bool: "boolean", float: "number with a fraction", type(None): "null", list: "list",
              dict: "object"}


def tiny_value(model_type: str | None, key: str) -> int:
    """An example of an accepted value: the family's own in its tiny config."""
    value = {**TINY_BASE, **(ADAPTERS[model_type].tiny if model_type in ADAPTERS else {})}.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else 8


TOKENIZER_FILES = ("tokenizer.json (or a slow tokenizer's vocabulary: tokenizer.model, or vocab.json and merges.txt) "
                   "and tokenizer_config.json naming its special tokens")


def load_tokenizer(model_id: str, padding: bool = True, *, trust_remote_code: bool = False, config=None):
    """The model's tokenizer, checked to encode text (and, with ``padding``, to pad a batch: a pad or
    an end-of-sequence token) before anything costly; else a one-line error naming what it needs.

    A tokenizer whose class only the repo's code has (repo.remote_tokenizer) needs
    ``trust_remote_code`` (else exit 2 naming --trust-remote-code); ``config``: the model's config
    as uncurl read it (repo.read_config), so transformers does not read it again its own way."""
    from transformers import AutoTokenizer

    from .repo import FLAG, RISK, module_file, remote_tokenizer

    where = f"model folder {model_id}" if Path(model_id).is_dir() else f"model {model_id!r}"
    remote = remote_tokenizer(model_id)
    if remote is not None and not trust_remote_code:
        raise UncurlError(f"{where}: its tokenizer is the repo's own code ({remote}, from tokenizer_config.json's "
                          f"auto_map: {module_file(remote) or 'another repo'}), a class transformers does not have; "
                          f"uncurl runs it only with {FLAG} ({RISK})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=trust_remote_code,
                                                  **({"config": config} if config is not None else {}))
        ids = tokenizer("uncurl checks the tokenizer.")["input_ids"]
    except Exception as err:  # noqa: BLE001 - missing or unreadable files fail in many ways
        raise UncurlError(f"{where} has no usable tokenizer ({' '.join(str(err).split())[:160]}); a tokenizer "
                          f"needs {TOKENIZER_FILES}") from None
    if not ids:
        raise UncurlError(f"{where}: its tokenizer turns text into no tokens; a tokenizer needs {TOKENIZER_FILES}")
    if padding and tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
        raise UncurlError(f"{where}: its tokenizer has neither a pad nor an end-of-sequence token, so calibration "
                          f"batches cannot be padded; a tokenizer needs {TOKENIZER_FILES}")
    return tokenizer


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}
_LOAD_FAILURES = ("conversion of the weights", "Error(s) in loading state_dict", "ignore_mismatched_sizes")


def _tensor_list(names, limit: int = 8) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_loading_info(info: dict, where: str) -> None:
    """Refuse a checkpoint transformers loaded with tensors missing (it would initialise them at
    random), unexpected (it would drop them) or of another shape, naming them. Tied weights and
    non-persistent buffers are not reported missing by transformers."""
    problems = []
    if info.get("missing_keys"):
        problems.append(f"the checkpoint lacks {_tensor_list(info['missing_keys'])}")
    if info.get("unexpected_keys"):
        problems.append(f"the model has no place for {_tensor_list(info['unexpected_keys'])}")
    for key, found, expected in sorted(info.get("mismatched_keys") or (), key=lambda m: m[0])[:8]:
        problems.append(f"{key} has shape {list(found)}, the config expects {list(expected)}")
    problems += [" ".join(str(m).split()) for m in info.get("error_msgs") or ()][:3]
    if problems:
        raise UncurlError(f"model {where} is damaged: its tensors do not match the model its config.json describes: "
                          f"{'; '.join(problems)}; re-download or re-save it")


def odd_tensors(shapes: dict[str, tuple]) -> list[str]:
    """Checkpoint tensors that differ from their siblings, the tensors named alike but for their last
    index (one expert among a layer's): a shape of their own, or absent where siblings have that index."""
    from collections import Counter, defaultdict

    groups: dict[tuple[str, str], dict[int, tuple]] = defaultdict(dict)
    for name, shape in shapes.items():
        parts = name.split(".")
        digits = [i for i, p in enumerate(parts) if p.isdigit()]
        if len(digits) < 2:  # a layer's own tensors: layers may differ (dense, hybrid)
            continue
        i = digits[-1]
        groups[".".join(parts[:i]), ".".join(parts[i + 1:])][int(parts[i])] = tuple(shape)
    indices: dict[str, set] = defaultdict(set)
    for (prefix, _), members in groups.items():
        indices[prefix] |= set(members)
    found = []
    for (prefix, suffix), members in sorted(groups.items()):
        (common, n), *_ = Counter(members.values()).most_common(1)
        if n > len(members) / 2:
            found += [f"{prefix}.{i}.{suffix} has shape {list(s)}, its siblings {list(common)}"
                      for i, s in sorted(members.items()) if s != common]
        found += [f"{prefix}.{i}.{suffix} is missing" for i in sorted(indices[prefix] - set(members))]
    for prefix, seen in sorted(indices.items()):
        found += [f"{prefix}.{i}.* is missing" for i in sorted(set(range(max(seen) + 1)) - seen)]
    return found


def refused_by_transformers(err: Exception) -> bool:
    """Whether ``err`` is transformers refusing a checkpoint's tensors (its loading report)."""
    return isinstance(err, RuntimeError) and any(m in str(err) for m in _LOAD_FAILURES)


def damaged(where: str, err: Exception, shapes: dict[str, tuple] | None = None) -> UncurlError:
    """transformers' refusal of a checkpoint's tensors as a one-line error naming ``where`` and, from
    the headers' ``shapes``, the tensors that do not fit their siblings."""
    odd = odd_tensors(shapes) if shapes else []
    detail = "; ".join(odd[:8]) if odd else " ".join(str(err).split())[:300]
    return UncurlError(f"model {where} is damaged: its tensors do not fit the model its config.json describes: "
                       f"{detail}; re-download or re-save it")


def check_weights_fit(folder: Path, config) -> None:
    """Before any weight is read: the checkpoint's tensors as its safetensors headers describe them
    (names, shapes, dtypes) are loaded into the model's class on the meta device, through the same
    renaming and fusing as a real load; a tensor missing, unexpected or of the wrong shape fails
    here, named. A quantized checkpoint, or a dry run transformers cannot do, is left to the real
    load, whose loading info is checked too."""
    files = checkpoint_files(folder)
    if not files or getattr(config, "quantization_config", None):
        return
    from safetensors import safe_open

    state, shapes = {}, {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                spec = handle.get_slice(name)
                shapes[name] = tuple(spec.get_shape())
                state[name] = torch.empty(shapes[name], dtype=_SAFETENSORS_DTYPES.get(spec.get_dtype(), torch.float32),
                                          device="meta")
    try:
        _, info = model_class(config).from_pretrained(None, config=config, state_dict=state, device_map="meta",
                                                      output_loading_info=True, ignore_mismatched_sizes=True,
                                                      trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 - the dry run is a convenience: the real load decides
        if refused_by_transformers(err):
            raise damaged(str(folder), err, shapes) from None
        log.debug("dry run of %s on the meta device failed (%s); the real load is checked", folder, err)
        return
    check_loading_info(info, str(folder))


def available_memory(device: torch.device) -> int | None:
    """Bytes free for the weights on ``device``: CUDA's free memory, or the kernel's MemAvailable
    (what can be had without swapping: free memory plus reclaimable caches); None when unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def weights_needed(folder: Path, config, dtype: str) -> tuple[int, bool]:
    """(bytes the loaded weights take at least, whether that is a lower bound) from the headers
    alone: each floating tensor at ``--dtype``'s size (``auto``: its own); a quantized checkpoint,
    which is held dequantized, at twice its stored bytes at least (FP8 to bf16; MXFP4 takes more)."""
    from safetensors import safe_open

    size = DTYPES[dtype].itemsize if dtype in DTYPES else None
    total = 0
    for path in checkpoint_files(folder):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                view = handle.get_slice(name)
                own = _SAFETENSORS_DTYPES.get(view.get_dtype(), torch.uint8)
                numel = math.prod(view.get_shape())
                total += numel * (size if size and own.is_floating_point and own.itemsize > 1 else own.itemsize)
    quantized = getattr(config, "quantization_config", None) is not None
    return (2 * total if quantized else total), quantized


def states_needed(config, dtype: str, *, samples: int, max_length: int, copies: int = 2) -> int:
    """Bytes the layer-by-layer driver holds between two layers for the whole calibration set, at
    most: ``copies`` tensors of samples x max_length x hidden (the states and the embeddings the
    forward keeps; three with ``--calibrate-through pruned``) in the run's dtype (``auto``: the
    config's, else float32). An upper bound: texts shorter than ``max_length`` are padded only to
    their batch's longest."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    hidden = int(getattr(text, "hidden_size", 0) or 0)
    own = getattr(text, "dtype", None) or getattr(config, "dtype", None)
    if isinstance(own, str):
        own = getattr(torch, own, None)
    size = DTYPES[dtype].itemsize if dtype in DTYPES else (own.itemsize if isinstance(own, torch.dtype) else 4)
    return copies * samples * max_length * hidden * size


def _amount(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_fits_memory(folder: Path, config, dtype: str, device: torch.device, states: int = 0) -> None:
    """Without ``--device-map`` the whole model is loaded onto ``device``: a checkpoint that cannot
    fit there is refused before any weight is read (exit 2), saying how to place it instead, rather
    than ending in the kernel's out-of-memory kill or CUDA's error halfway through.

    ``states``: bytes of hidden states the run holds besides the weights (``states_needed``; the
    layer-by-layer driver's). On the CPU they count with the weights; on a GPU they stay there if
    both fit and go to CPU memory otherwise (``devices.Parking``), so they must fit one or the other."""
    free = available_memory(device)
    if free is None:
        return
    needed, lower_bound = weights_needed(folder, config, dtype)
    at_least = "at least " if lower_bound else ""
    if needed > free:
        where = f"{device} memory free" if device.type == "cuda" else "memory available on this machine"
        raise UncurlError(f"model {folder}: its weights need {at_least}{_amount(needed)} "
                          f"and there is {_amount(free)} of {where}; place it with --device-map auto "
                          f"(--max-memory caps each device; the rest is offloaded to disk), and --pipeline sequential "
                          f"reads each offloaded layer once")
    if not states:
        return
    host = free if device.type != "cuda" else available_memory(torch.device("cpu"))
    if device.type == "cuda" and needed + states <= free:
        return  # the states stay on the GPU
    if device.type != "cuda" and needed + states > free:
        raise UncurlError(f"model {folder}: its weights need {at_least}{_amount(needed)} and the hidden states of the "
                          f"calibration set up to {_amount(states)} between two layers, and there is {_amount(free)} "
                          f"of memory available on this machine; lower --samples or --max-length, or place the model "
                          f"with --device-map auto --max-memory cpu=... (its weights offloaded to disk)")
    if device.type == "cuda" and host is not None and states > host:
        raise UncurlError(f"model {folder}: the hidden states of the calibration set take up to {_amount(states)} "
                          f"between two layers: more than the {_amount(free - needed)} of {device} left beside the "
                          f"weights and the {_amount(host)} of CPU memory available; lower --samples or --max-length")


def check_finite(model) -> None:
    """Refuse weights holding NaN or Inf, naming the first such tensor (offloaded ones are skipped).

    Read in slices of 16M values, so no tensor-sized temporary is made.
    """
    for name, param in model.named_parameters():
        if param.device.type == "meta" or not param.dtype.is_floating_point:
            continue
        flat = param.detach().reshape(-1)
        for start in range(0, flat.numel(), 1 << 24):
            chunk = flat[start : start + (1 << 24)]
            if not bool(torch.isfinite(chunk).all()):
                bad = int((~torch.isfinite(flat)).sum())
                layer = next((p for p in name.split(".") if p.isdigit()), None)
                where = f"layer {layer}, " if layer is not None else ""
                raise UncurlError(f"model weights hold NaN/Inf: {where}tensor {name} has {bad:,} non-finite "
                                  f"values of {flat.numel():,}; the checkpoint is damaged (or was saved "
                                  f"after a diverged step)")


def looks_like_path(model_id: str) -> bool:
    """``--model`` meant as a local path rather than a Hub id: it exists, starts with ``/``, ``.`` or
    ``~``, or has a path separator beyond the one of ``ORG/NAME``."""
    return (os.path.exists(os.path.expanduser(model_id)) or model_id.startswith(("/", ".", "~"))
            or model_id.count("/") > 1 or "\\" in model_id)


def check_model_path(model_id: str, named: str | None = None) -> None:
    """A ``--model`` that looks like a path (``looks_like_path``) must be a folder: say what it is
    instead of treating it as a Hub id. ``named``: how messages name it (default ``--model ID``)."""
    if model_id.startswith(BUILTIN_PREFIX) or not looks_like_path(model_id):
        return
    named = named or f"--model {model_id}"
    path = Path(model_id).expanduser()
    if path.is_file():
        raise UncurlError(f"{named} is a file, not a model folder: pass the folder holding config.json "
                          f"and the weights")
    if not path.is_dir():
        raise UncurlError(f"{named}: no such folder (a local model folder holds config.json and the "
                          f"weights; a Hub id is ORG/NAME)")


def check_family(model_id: str, named: str | None = None) -> None:
    """Before anything costly: a local folder of a family uncurl refuses, or of one in the table that
    the installed transformers does not know yet, fails here with the reason (and a path that is not
    a folder, as such, named as ``named`` says: default ``--model ID``)."""
    check_model_path(model_id, named)
    folder = Path(model_id).expanduser()
    if not folder.is_dir():
        return
    check_config_file(folder)
    from .repo import family_of

    model_type = family_of(_read_json(folder / "config.json", "configuration"))  # kimi_k2: deepseek_v3
    if model_type in ADAPTERS and not installed(model_type):
        raise UncurlError(needs_newer_transformers(model_type))
    if model_type in REFUSED or model_type in ADAPTERS:
        get_adapter(model_type)  # a refused family, or one this transformers release cannot run, says why
    check_config_values(folder)  # after the family: a refused one says so first


def _config(model_id: str, trust_remote_code: bool = False):
    """(config, repo.Native or None): see ``repo.read_config``; errors as one line."""
    from huggingface_hub.errors import StrictDataclassError

    from .repo import read_config

    if Path(model_id).is_dir():
        check_config_file(Path(model_id))
        check_config_values(Path(model_id))
    try:
        return read_config(model_id, trust_remote_code)
    except StrictDataclassError as err:  # a value of the wrong type, which transformers' config validates
        raise UncurlError(f"the configuration of model {model_id!r} does not fit transformers' own "
                          f"({' '.join(str(err).split())}); fix the value in config.json or re-download the "
                          f"model") from None
    except (OSError, ValueError) as err:
        if Path(model_id).is_dir():
            check_family(model_id)  # a family too new for this transformers, or refused, says so
            raise UncurlError(f"cannot read the configuration in model folder {model_id!r}: "
                              f"{type(err).__name__}: {err}") from None
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        hint = (
            "it is not a local folder and the Hugging Face Hub is unreachable"
            + (" (HF_HUB_OFFLINE is set)" if offline else "")
            + "; pass a local transformers folder, or builtin:<family> for a tiny random model"
        )
        raise UncurlError(f"cannot load model {model_id!r}: {hint}. ({type(err).__name__}: {err})".strip()) from None


def return_freed_memory() -> None:
    """Let glibc give large freed buffers back to the OS at once (process-wide, idempotent).

    By default glibc raises its mmap threshold after the first large free, so later tensors of a
    few MB (converted expert slices, activations) are carved from the heap and stay resident after
    they are freed. A fixed 1 MiB threshold keeps every large buffer in its own mapping.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None or not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return
    try:
        ctypes.CDLL(name).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD; not glibc -> no mallopt -> skip
    except (OSError, AttributeError):
        pass


def prefer_lean_experts(model, device: torch.device) -> None:
    """On CPU, run experts with the ``eager`` implementation (see the module doc)."""
    if device.type == "cpu" and getattr(model.config, "_experts_implementation", None) not in (None, "eager"):
        try:
            model.set_experts_implementation("eager")
        except (AttributeError, ValueError):  # a model without switchable experts keeps its own
            pass


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors shards transformers would load from ``folder`` (index first), else []."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        import json

        return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


def parse_max_memory(text: str | None) -> dict | None:
    """``0=20GiB,cpu=60GiB`` -> ``{0: "20GiB", "cpu": "60GiB"}`` (accelerate's max_memory)."""
    if not text:
        return None
    out = {}
    for item in text.split(","):
        device, sep, amount = item.strip().partition("=")
        if not sep or not amount:
            raise UncurlError(f"--max-memory {text!r}: expected DEVICE=AMOUNT pairs, e.g. 0=20GiB,cpu=60GiB")
        if device.isdigit():
            out[int(device)] = amount
        elif device in ("cpu", "mps"):
            out[device] = amount
        else:
            raise UncurlError(f"--max-memory {text!r}: device {device!r} is not a GPU index, cpu or mps")
    return out


def placement_kwargs(device_map: str | None, max_memory: dict | None) -> dict:
    """from_pretrained's placement arguments; what does not fit goes to a private offload folder
    that is deleted when the process exits."""
    if device_map is None:
        return {}
    import atexit
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="uncurl-offload-")
    atexit.register(shutil.rmtree, folder, True)
    return {"device_map": device_map, "max_memory": max_memory, "offload_folder": folder}


def stored_dtype(files: list[Path]) -> torch.dtype:
    """The dtype ``dtype="auto"`` means for a checkpoint whose config names none (gpt-oss's has no
    ``torch_dtype``): its first floating tensor's that is not float8/float4, from the safetensors headers, as
    transformers' ``get_state_dict_dtype`` picks it from a state dict of tensors (it cannot read it from
    the pread slices ``from_folder`` hands it); float32 when every floating tensor is quantized."""
    from safetensors import safe_open

    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                dtype = _SAFETENSORS_DTYPES.get(handle.get_slice(name).get_dtype())
                if dtype is not None and dtype.is_floating_point:
                    return dtype
    return torch.float32


def from_folder(folder: Path, config, dtype, device_map=None, output_loading_info: bool = False, **placement):
    """``from_pretrained(folder)`` with the shards read by ``pread`` instead of mmap (see above).

    Falls back to plain ``from_pretrained`` for anything but safetensors shards. ``placement``:
    ``max_memory``/``offload_folder`` for a ``device_map``. A checkpoint in a format uncurl writes
    back (``quant.CODECS``) is dequantized by uncurl as each tensor is read, on every device alike,
    and the model gets a config without ``quantization_config`` (quant.py, "Reading").
    """
    from transformers import GenerationConfig

    files = checkpoint_files(folder)
    source = None
    if files and getattr(config, "quantization_config", None) is not None:
        from .quant import check_source, dequantized_state, without_quantization

        source = check_source(folder, _read_json(folder / "config.json", "configuration"), dequantize=True)
        if source is not None:
            config = without_quantization(config)
    cls = model_class(config)
    if not files:
        return cls.from_pretrained(folder, config=config, dtype=dtype, device_map=device_map,
                                   output_loading_info=output_loading_info, trust_remote_code=False, **placement)
    if dtype == "auto" and getattr(config, "dtype", None) is None:
        dtype = stored_dtype(files)
    from safetensors import safe_open

    handles = [] if source else [safe_open(str(f), framework="pt", device="cpu", backend="pread") for f in files]
    try:
        state = dequantized_state(source) if source else {name: h.get_slice(name) for h in handles for name in h.keys()}
        # weights sent to disk stay in the checkpoint's own files (offload.from_source), not re-saved
        direct = device_map is not None and not source and getattr(config, "quantization_config", None) is None
        files_of = {name: str(f) for f, h in zip(files, handles) for name in h.keys()} if direct else {}
        with from_source(files_of, config) if direct else nullcontext():
            model = cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype, device_map=device_map,
                                        output_loading_info=output_loading_info, trust_remote_code=False, **placement)
        if direct:
            install_source_loaders(model[0] if output_loading_info else model)
    finally:
        for h in handles:
            h.__exit__(None, None, None)
        if source is not None:
            source.close()
    loaded = model[0] if output_loading_info else model
    loaded.config._name_or_path = loaded.name_or_path = str(folder)
    if (folder / "generation_config.json").is_file():  # no code in it: it takes no trust_remote_code (it would
        loaded.generation_config = GenerationConfig.from_pretrained(folder)  # keep it as an attribute, and save it)
    return model


def load_model(model_id: str, *, device: str = "auto", dtype: str = "auto", seed: int = 0,
               device_map: str | None = None, max_memory: str | None = None, moe: bool = True,
               dequantize: bool = False, states: dict | None = None, trust_remote_code: bool = False) -> Loaded:
    """Load ``model_id`` for inference (eval mode, no gradients) on ``device``, or spread over the
    GPUs by accelerate when ``device_map`` is given (``auto``: fill GPUs in order), with what does not
    fit (or exceeds ``max_memory``, e.g. ``0=20GiB,cpu=60GiB``) offloaded to CPU memory, then disk.

    ``moe=False`` (evaluation only) accepts any causal LM transformers can load, dense ones included;
    ``adapter`` is then the family's when uncurl knows it, else None.

    A quantized checkpoint is loaded dequantized; a format uncurl writes back (``quant.CODECS``) is
    described by ``Loaded.quantized``, any other is refused unless ``dequantize`` (quant.py).

    ``states``: ``states_needed``'s keywords (samples, max_length, copies) when the run will hold the
    calibration set's hidden states (layer by layer): the memory preflight counts them too.

    Never asks on stdin. The model loads with transformers' own class wherever it has one (a
    model_type it lacks, by its ``architectures``); the repo's code (``auto_map``) runs only with
    ``trust_remote_code`` and only where transformers has no class (repo.py)."""
    return_freed_memory()
    dev = resolve_device(device)
    if device_map is not None:
        if device_map not in DEVICE_MAPS:
            raise UncurlError(f"--device-map {device_map!r} is not one of {', '.join(DEVICE_MAPS)}")
        if device != "auto":
            raise UncurlError("--device-map places the model itself; leave --device at auto")
    elif max_memory:
        raise UncurlError("--max-memory only applies with --device-map")
    limits = parse_max_memory(max_memory)
    if dtype != "auto" and dtype not in DTYPES:
        raise UncurlError(f"--dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    if model_id.startswith(BUILTIN_PREFIX):
        if device_map is not None:
            raise UncurlError(f"--device-map is for checkpoints on disk or the Hub; {model_id} is built in memory "
                              "(save it with save_pretrained to place it)")
        model, tokenizer = build_tiny(get_adapter(model_id[len(BUILTIN_PREFIX):]).model_type, seed=seed)
        if dtype != "auto":
            model = model.to(DTYPES[dtype])
        prefer_lean_experts(model, dev)
        return Loaded(model.to(dev), tokenizer, get_adapter(model.config.model_type), model_id, None)

    model_id = os.path.expanduser(model_id) if model_id.startswith("~") else model_id
    check_model_path(model_id)
    config, native = _config(model_id, trust_remote_code)
    if native is not None:
        log.info("%s: %s", model_id, native.why())
    # an unknown family fails here, before the weights, unless only evaluating
    adapter = get_adapter(config.model_type) if moe else ADAPTERS.get(config.model_type)
    folder = Path(model_id) if Path(model_id).is_dir() else None
    if folder is None and keeps_format(model_id, config, dequantize or not moe):
        folder = hub_files(model_id)  # a quantized Hub model: uncurl reads (and writes back) its own files
    if folder is not None:
        if adapter is not None:
            check_moe_keys(folder, config, adapter)
        check_weight_files(folder)  # missing or truncated files fail here, named
        check_generation_config(folder)
        check_weights_fit(folder, config)  # a missing, extra or mis-shaped tensor, before any weight is read
        if device_map is None:  # too big for the device: say how to place it
            check_fits_memory(folder, config, dtype, dev, states_needed(config, dtype, **states) if states else 0)
    quantized = check_quantized(model_id, folder, config, dequantize or not moe)  # scheme and scales, named
    # before the weights: it is cheap
    tokenizer = load_tokenizer(model_id, padding=moe, trust_remote_code=trust_remote_code, config=config)
    log.info("loading %s (%s) on %s", model_id, config.model_type, dev)
    placement = placement_kwargs(device_map, limits) or {"device_map": {"": dev}}
    # mismatched sizes come back in the loading info (and are refused below), not as a RuntimeError
    checked = {"output_loading_info": True, "ignore_mismatched_sizes": True}
    try:
        if folder is not None:
            model, info = from_folder(folder, config, DTYPES.get(dtype, "auto"), **placement, **checked)
        else:
            model, info = model_class(config).from_pretrained(model_id, config=config, trust_remote_code=False,
                                                              dtype=DTYPES.get(dtype, "auto"), **placement, **checked)
    except RuntimeError as err:
        if not refused_by_transformers(err):
            raise
        raise damaged(model_id, err) from None
    except pickle.UnpicklingError as err:
        raise unsafe_pickle(model_id, err) from None
    except (ImportError, NotImplementedError, ValueError) as err:
        if getattr(config, "quantization_config", None) is None or quantized is not None:
            raise
        from .quant import quantization_config, scheme

        raise UncurlError(f"model {model_id}: transformers cannot load its {scheme(quantization_config(config))!r} "
                          f"weights here ({' '.join(str(err).split())[:200]}), so --dequantize cannot either; "
                          f"dequantize the checkpoint first where its scheme's kernels are installed and prune "
                          f"that") from None
    check_loading_info(info, model_id)  # transformers would have initialised the missing ones at random
    routers_placed_whole(model, adapter)
    if getattr(config, "quantization_config", None) is not None:
        from .quant import check_dequantized, quantization_config

        check_dequantized(model, quantization_config(config), model_id)
    executes = {str(d) for d in (getattr(model, "hf_device_map", None) or {"": dev}).values()}
    if executes <= {"cpu", "disk"}:  # every layer runs on the CPU, placed by accelerate or not
        prefer_lean_experts(model, torch.device("cpu"))
    check_finite(model)  # NaN weights fail here, named, not as a clustering traceback later
    source = folder.resolve() if folder is not None else None  # never written to (a Hub snapshot included)
    again = {"device_map": device_map, "max_memory": limits} if device_map else {}
    from .repo import carried

    return Loaded(model.eval(), tokenizer, adapter, model_id, source, again, processor_files(model_id), quantized,
                  info, carry=carried(model_id, config, native, tokenizer))


def routers_placed_whole(model, adapter: MoEAdapter | None):
    """Under accelerate's offload, each router's hook brings in the router's children too
    (``offload.reach_children``: longcat_flash's router reads its child's weight directly)."""
    from .adapters import find_moe_layers
    from .offload import dispatched, reach_children

    if adapter is not None and dispatched(model):
        reach_children(layer.router for layer in find_moe_layers(model, adapter))
    return model


# what a quantized Hub model's snapshot needs: config, index and shards, tokenizer, processor, its card, the
# code its auto_map names and its licence files (carried into the output; repo.py), never run unless trusted
HUB_FILES = ("*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken", "README.md", "*.py",
             "LICENSE*", "LICENCE*", "License*", "license*", "USE_POLICY*", "NOTICE*", "COPYING*")


def keeps_format(model_id: str, config, dequantize: bool) -> bool:
    """Whether ``config`` is quantized in a format uncurl writes back (quant.CODECS), so its files
    are read by uncurl itself; an unsupported scheme is refused here, naming it (quant.codec_for)."""
    from .quant import codec_for, quantization_config

    qc = quantization_config(config)
    return qc is not None and codec_for(qc, f"model {model_id!r}", dequantize) is not None


def hub_files(model_id: str) -> Path:
    """A Hub model's snapshot folder in the Hub cache (downloaded when missing; offline, the cached
    one), read like a local folder and never written to."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_id, allow_patterns=list(HUB_FILES)))
    except Exception as err:  # noqa: BLE001 - offline, gated, missing: one message
        raise UncurlError(f"model {model_id!r} is quantized, and uncurl reads its files itself to keep its format, "
                          f"but they could not be had from the Hub or its cache ({type(err).__name__}: "
                          f"{' '.join(str(err).split())[:200]}); pass a local folder (hf download {model_id} "
                          f"--local-dir DIR), or --dequantize to write full precision") from None


def check_quantized(model_id: str, folder: Path | None, config, dequantize: bool):
    """A quantized checkpoint's scheme must be one uncurl writes back, and its scales must fit its
    weights (headers only; quant.check_source), else exit 2 naming it; ``dequantize`` accepts any
    scheme transformers dequantizes on load. A quantized Hub model in a format uncurl keeps is read from
    its snapshot (``hub_files``), so ``folder`` is None here only for one transformers dequantizes."""
    from .quant import check_source, codec_for, quantization_config

    qc = quantization_config(config)
    if qc is None:
        return None
    if folder is None:
        if codec_for(qc, f"model {model_id!r}", dequantize) is not None:
            raise UncurlError(f"model {model_id!r} is quantized ({qc.get('quant_method')}): uncurl writes it back in "
                              f"its format from its files, so pass a local folder (e.g. hf download {model_id} "
                              f"--local-dir DIR), or --dequantize to write full precision")
        return None
    return check_source(folder, _read_json(folder / "config.json", "configuration"), dequantize)

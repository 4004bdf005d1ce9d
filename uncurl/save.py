"""Step 5: write the pruned checkpoint, all or nothing, and check it from disk before saying so.

The output is assembled in a hidden folder beside ``--out`` and renamed into place only when
complete and checked (``output.claim``: what ``--out`` may be, the lock, signals, a full disk).
``parse_shard_size`` and ``expected_bytes`` let a run refuse a bad ``--shard-size`` or a disk too
small before the expensive work.

Writing streams: ``save_pretrained`` first reverts transformers' load-time weight conversions for
the *whole* model at once (e.g. splitting every fused ``gate_up_proj`` into per-expert ``w1``/``w3``
copies, ~0.6x the weights for Mixtral), then writes. ``write_checkpoint`` reverts one decoder
layer at a time and writes each tensor at its final offset in its shard, so the extra memory is one
layer's converted tensors. The files are the ones ``save_pretrained`` writes, byte for byte (same
names, shard split, index, safetensors header order and config; tests/test_lean.py checks it).
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import torch

from .adapters import MoEAdapter, expert_count, expert_id_names, find_moe_layers, per_expert_names, tail_rows, top_k
from .errors import CheckpointCheckError, UncurlError

SHARD_SIZE = "5GB"  # transformers' default; a model under it is one model.safetensors, no index


def parse_shard_size(value: str | int, flag: str = "--shard-size") -> int:
    """``value`` in bytes, read as transformers reads ``max_shard_size`` (5GB, 500MB: decimal units;
    a plain number: bytes); an UncurlError for anything else, or for a size that is not positive."""
    from huggingface_hub.serialization._base import parse_size_to_int

    text = str(value).strip()
    try:
        size = int(text) if text.isdigit() else parse_size_to_int(text)
    except (ValueError, OverflowError):
        size = None
    if size is None or size <= 0:
        raise UncurlError(f"{flag} {str(value)!r} is not a shard size; give a positive size with a unit (TB, GB, "
                          f"MB or KB), e.g. 5GB or 500MB, or a number of bytes")
    return size


def expected_bytes(model, adapter: MoEAdapter, keep: int) -> int:
    """About what ``write_checkpoint`` writes for ``model`` cut to ``keep`` experts per MoE layer:
    every tensor outside the experts as it is, the experts' tensors K/E of theirs."""
    from .merge import weight_bytes

    state = model.state_dict()
    experts = sum(state[name].numel() * state[name].element_size() for layer in find_moe_layers(model, adapter)
                  for name in per_expert_names(layer, adapter)[0])
    return weight_bytes(model) - experts + experts * keep // expert_count(model.config, adapter)


def write_checkpoint(model, tokenizer, folder: Path, shard_size: str | int = SHARD_SIZE, *, stream: bool = True,
                     extra_files=(), as_input=None, extra=(), carry=None) -> None:
    """Safetensors shards of at most ``shard_size`` + index (transformers' names), config,
    generation config, tokenizer files, and ``extra_files`` (the input's processor files, see
    ``load.PROCESSOR_FILES``) copied as they are; ``carry`` (``repo.Carried``): the parent's code,
    licence and tokenizer files, and its own config.json form. ``stream=False`` is plain ``save_pretrained``.
    ``as_input``: (``quant.Source``, adapter, plans) of a quantized input, written in its format
    from its files (``quant.write_quantized``). ``extra``: runs of tensors beside the model's (its
    MTP blocks, ``CheckpointWriter``), which ``save_pretrained`` cannot write."""
    if as_input is not None:
        from .quant import write_quantized

        source, adapter, plans = as_input
        write_quantized(model, adapter, plans, source, folder, shard_size, extra=extra)
    elif not (stream and stream_checkpoint(model, folder, shard_size, extra)):
        if extra:
            raise UncurlError("this model cannot be written tensor by tensor, so its MTP blocks cannot be written "
                              "beside it; their count would be wrong")
        model.save_pretrained(folder, max_shard_size=shard_size)
    write_extras(tokenizer, folder, extra_files, carry)


def write_extras(tokenizer, folder: Path, extra_files=(), carry=None) -> None:
    """The tokenizer's files and ``extra_files`` (the input's processor files) beside the weights,
    and what ``carry`` (``repo.Carried``) keeps of the parent: a tokenizer with an ``auto_map`` as
    its own files (not re-saved), the code and licence files; last, config.json in the parent's form.
    Called once the weights and config.json are written."""
    if tokenizer is not None and not (carry is not None and carry.tokenizer):
        tokenizer.save_pretrained(folder)
    if carry is not None:
        carry.write(folder)
    for path in map(Path, extra_files):
        if not (folder / path.name).exists():  # the tokenizer may have written the chat template
            shutil.copyfile(path, folder / path.name)


# safetensors orders a file's tensors by dtype (this order), then by name
_ST_DTYPES = {torch.int64: "I64", torch.float64: "F64", torch.float32: "F32", torch.int32: "I32",
              torch.bfloat16: "BF16", torch.float16: "F16", torch.int16: "I16", torch.float8_e8m0fnu: "F8_E8M0",
              torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.uint8: "U8", torch.int8: "I8",
              torch.bool: "BOOL"}
_ST_RANK = {d: i for i, d in enumerate(_ST_DTYPES)}


def _layer_runs(state: dict, prefixes=()) -> list[tuple[str | None, dict]]:
    """The state dict in transformers' revert order, cut where the decoder layer changes (weight
    conversions never cross a layer): (layer name or None, {name: tensor}) per run. A layer is one
    of ``prefixes`` (``sequential.decoder_layers``' names) when given, else a ``*.layers.N``."""
    from transformers.core_model_loading import dot_natural_key

    runs, last = [], object()
    for name in sorted(state, key=dot_natural_key):
        key = next((p for p in prefixes if name.startswith(p + ".")), None)
        if key is None:
            m = re.match(r"(.*?\.layers\.\d+)\.", name)
            key = m.group(1) if m else None
        if not runs or key != last:
            runs.append((key, {}))
        runs[-1][1][name] = state[name]
        last = key
    return runs


def streamable(model) -> bool:
    """Whether ``CheckpointWriter`` can write ``model`` (not quantized by transformers; dtypes
    safetensors has)."""
    return getattr(model, "hf_quantizer", None) is None and all(t.dtype in _ST_DTYPES for t in model.state_dict().values())


class CheckpointWriter:
    """The files ``save_pretrained`` writes for ``model``, written a run of tensors at a time.

    The shard layout (names after reverting transformers' weight conversions, shapes, dtypes, the
    shard split) comes from ``model``'s state dict up front, on ``meta`` stand-ins: ``model`` may be
    a model on ``meta`` whose tensors only exist later (``layerwise.py``). ``runs`` lists the runs
    ((layer name or None, {name: stand-in})); ``write(run)`` takes one run's real tensors, in any
    order of runs; ``finish`` writes the index and configs and checks every tensor came. ``extra``:
    runs of tensors the model does not hold (its MTP blocks, ``mtp.py``), named as the model would
    hold them; they go into the layout too, and are written by ``write`` like any run."""

    def __init__(self, model, folder: Path, shard_size: str | int, prefixes=(), extra=()):
        from huggingface_hub.serialization._base import split_state_dict_into_shards_factory
        from transformers.core_model_loading import revert_weight_conversion
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        self.model, self.folder = model, folder
        state = remove_tied_weights_from_state_dict(model.state_dict(), model)
        self.runs = _layer_runs(state, prefixes)
        folder.mkdir(parents=True, exist_ok=True)
        # on meta stand-ins (no data read or copied): final names, shapes, dtypes and which outputs
        # share storage (views of one tensor), which is what transformers' shard split looks at
        specs, storage = {}, {}
        self.extra_parameters = sum(t.numel() for _, run in extra for t in run.values())
        for i, (_, run) in enumerate([*self.runs, *extra]):
            stand_ins = {name: torch.empty_like(t, device="meta") for name, t in run.items()}
            for name, t in revert_weight_conversion(model, stand_ins).items():
                specs[name] = t
                storage[name] = (i, t.untyped_storage()._cdata), t.untyped_storage().nbytes()
        self.split = split_state_dict_into_shards_factory(
            {n: (n,) for n in specs}, get_storage_id=lambda v: storage[v[0]][0],  # (n,): a str would be skipped
            get_storage_size=lambda v: storage[v[0]][1],
            filename_pattern="model{suffix}.safetensors", max_shard_size=shard_size)
        self.shards = {file: _ShardWriter(folder / file, {n: specs[n] for n in names})
                       for file, names in self.split.filename_to_tensors.items()}
        self.where = {name: self.shards[file] for file, names in self.split.filename_to_tensors.items()
                      for name in names}

    def write(self, run: dict) -> None:
        """One run's tensors {state-dict name: tensor}: reverted and each written at its offset."""
        from transformers.core_model_loading import revert_weight_conversion

        for name, tensor in revert_weight_conversion(self.model, run).items():
            self.where[name].write(name, tensor)

    def close(self) -> None:
        for shard in self.shards.values():
            shard.file.close()

    def finish(self, config=None, generation_config=None) -> None:
        """Close the shards, check every tensor was written, write the index, ``config`` (default
        the model's) and ``generation_config`` as ``save_pretrained`` would."""
        self.close()
        model, folder = self.model, self.folder
        unwritten = sorted(n for shard in self.shards.values() for n in shard.missing)
        if unwritten:
            raise RuntimeError(f"streaming save never wrote {unwritten[:5]}")
        if self.split.is_sharded:
            index = {"metadata": {"total_parameters": model.num_parameters() + self.extra_parameters,
                                  **self.split.metadata},
                     "weight_map": self.split.tensor_to_filename}
            (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        config = config if config is not None else model.config
        config.dtype = str(model.dtype).split(".")[1]  # what save_pretrained records
        config.architectures = [type(model).__name__]
        config.save_pretrained(folder)
        generation_config = generation_config if generation_config is not None else getattr(
            model, "generation_config", None)
        if model.can_generate() and generation_config is not None:
            generation_config.save_pretrained(folder)


def stream_checkpoint(model, folder: Path, shard_size: str | int, extra=()) -> bool:
    """Write what ``save_pretrained`` writes, one decoder layer at a time, and the ``extra`` runs
    (``CheckpointWriter``). False: not supported for this model (quantized, an unusual dtype); the
    caller falls back. Offloaded tensors are read from accelerate's offload one decoder layer at a time."""
    from .offload import read_tensor

    if not streamable(model):
        return False
    writer = CheckpointWriter(model, folder, shard_size, extra=extra)
    try:
        for _, run in writer.runs:  # tensors accelerate offloaded are read one layer at a time
            writer.write({name: read_tensor(model, name, t) for name, t in run.items()})
        for _, run in extra:
            writer.write(run)
    finally:
        writer.close()
    writer.finish()
    return True


class _ShardWriter:
    """One safetensors file whose header is fixed up front; tensors are written in any order."""

    def __init__(self, path: Path, specs: dict[str, torch.Tensor]):
        order = sorted(specs, key=lambda n: (_ST_RANK[specs[n].dtype], n))
        header, offset, self.offsets = {"__metadata__": {"format": "pt"}}, 0, {}
        for name in order:
            t = specs[name]
            size = t.numel() * t.element_size()
            header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
            self.offsets[name] = (offset, size)
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.base = 8 + len(raw)
        self.missing = set(specs)
        self.file = open(path, "wb")  # noqa: SIM115 - closed by CheckpointWriter.close
        self.file.write(struct.pack("<Q", len(raw)) + raw)
        self.file.truncate(self.base + offset)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        offset, size = self.offsets[name]
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        if data.numel() != size:
            raise RuntimeError(f"{name}: {data.numel()} bytes, header says {size}")
        self.file.seek(self.base + offset)
        self.file.write(memoryview(data.numpy()))
        self.missing.discard(name)


def stored_bytes(folder: Path) -> int:
    """The weight bytes of a checkpoint as its safetensors files store them (their headers' tensors)."""
    from .load import checkpoint_files
    from .quant import headers

    return sum(spec.nbytes for spec in headers(checkpoint_files(folder)).values())


def verify_checkpoint(folder: Path, adapter: MoEAdapter, expected_experts: int, expected_top_k: int, tokenizer,
                      placement: dict | None = None, reloaded: tuple | None = None) -> dict:
    """Reload from disk (placed like the run's model: ``placement``) and check keys, expert counts,
    router rows, finiteness and one forward. ``reloaded``: (model, loading info) of ``folder``
    already loaded back (to evaluate it), checked instead of a second load."""
    from .load import from_folder, placement_kwargs, routers_placed_whole
    from .repo import read_config

    if reloaded is not None:
        return _verify(reloaded, folder, adapter, expected_experts, expected_top_k, tokenizer)
    where = placement_kwargs(**placement) if placement else {}  # a fresh offload folder, not the run's
    try:
        config, _ = read_config(str(folder))  # transformers' own class (a kimi_k2 output too); no repo code runs
        model, info = from_folder(folder, config, "auto", output_loading_info=True, **where)
        return _verify((routers_placed_whole(model, adapter), info), folder, adapter, expected_experts,
                       expected_top_k, tokenizer)
    finally:
        if where:
            shutil.rmtree(where["offload_folder"], ignore_errors=True)


def _no_nan(tensor: torch.Tensor) -> torch.Tensor:
    return ~torch.isnan(tensor)


def _verify(loaded, folder, adapter, expected_experts, expected_top_k, tokenizer) -> dict:
    from .cost import kv_rows
    from .load import input_device
    from .offload import read_tensor

    model, info = loaded
    problems = [f"{k}: {sorted(v)}" for k, v in info.items() if k != "error_msgs" and v] + list(info["error_msgs"])
    if expert_count(model.config, adapter) != expected_experts:
        problems.append(f"config says {expert_count(model.config, adapter)} experts, expected {expected_experts}")
    if top_k(model.config, adapter) != expected_top_k:
        problems.append(f"config says top-k {top_k(model.config, adapter)}, expected {expected_top_k}")
    layers = find_moe_layers(model, adapter)
    state, tail = model.state_dict(), tail_rows(model.config, adapter)
    written = set()  # the tensors uncurl rewrote: finite; every other one: no NaN (clip bounds may be inf)
    for layer in layers:
        for name in sum(per_expert_names(layer, adapter), []):
            written.add(name)
            rows = state[name].shape[adapter.expert_axis(name)]
            if rows not in (expected_experts, expected_experts + tail):
                problems.append(f"{name} has {rows} experts, expected {expected_experts}")
        for name in expert_id_names(layer, adapter):  # hash tables: every id names a kept expert
            ids = read_tensor(model, name, state[name])
            if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < expected_experts):
                problems.append(f"{name} holds expert ids {int(ids.min())}..{int(ids.max())}, expected 0.."
                                f"{expected_experts - 1}")
    bad = [n for n, t in state.items() if t.is_floating_point()
           and not (torch.isfinite if n in written else _no_nan)(read_tensor(model, n, t)).all()]
    if bad:
        problems.append(f"non-finite values in {bad[:5]}")
    ids = tokenizer("uncurl checks the pruned model.", return_tensors="pt")["input_ids"]
    with torch.no_grad():  # the cache it fills is the pruned model's KV cache, measured (cost.kv_rows)
        out = model(input_ids=ids.to(input_device(model)), use_cache=True)
    logits, kv_cache = out.logits, kv_rows(getattr(out, "past_key_values", None))
    del out
    if not torch.isfinite(logits).all():
        problems.append("forward pass produced non-finite logits")
    from .mtp import check_written

    problems += check_written(folder, model.config, adapter, expected_experts)
    if problems:
        raise CheckpointCheckError("the pruned checkpoint failed its checks: " + "; ".join(problems))
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    return {
        "missing_keys": 0,
        "unexpected_keys": 0,
        "moe_layers": len(layers),
        "experts_per_layer": expected_experts,
        "forward_ok": True,
        "shards": shards,
        "bytes_on_disk": sum((folder / s).stat().st_size for s in shards),
        "kv_cache": kv_cache,  # per cache layer: bytes per token, fixed bytes, window (None: no cache)
    }

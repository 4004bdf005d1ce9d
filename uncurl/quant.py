"""Quantized checkpoints in, the same format out (FP8 block-scaled: DeepSeek-V3, Qwen3-*-FP8, ...).

    uncurl prune --model ./Qwen3-30B-A3B-FP8 --keep 64 --out runs/k64               # FP8 in, FP8 out
    uncurl prune --model ./Qwen3-30B-A3B-FP8 --keep 64 --dequantize --out runs/bf16 # full precision, on purpose

A format is one ``Codec`` in ``CODECS``, found by ``config.json``'s ``quantization_config.quant_method``:
it says which tensors are quantized, which companion tensors carry their scales, and how to
``dequantize`` and ``quantize`` one tensor. Any other scheme (gptq, awq, bitsandbytes,
compressed-tensors, mxfp4 for now) is refused before any weight is read (``codec_for``), never written
in another precision; ``--dequantize`` lets transformers dequantize it on load instead, and says so.

Design: the model is *profiled and planned* as transformers loads it, dequantized (on CPU
transformers dequantizes FP8 by itself; on a GPU uncurl asks it to, so both run the same code: the
profile runs on dequantized weights). The *checkpoint* is written from the input's own files
(``Source``: the shards, read with safetensors' pread reader, headers checked up front by
``check_source``), streamed one decoder layer at a time in the pruned model's save-time names
(``write_quantized``):

- a tensor uncurl did not change (attention, embeddings, dense layers, shared experts) and every
  expert of a singleton group (every expert under a pruning criterion) is copied from the input's
  bytes with its scales, the experts renumbered 0..K-1: bit-identical to the input's;
- an expert that merges a group is quantized again from the pruned model's merged tensor (the
  members dequantized, merged in float32 by ``merge.py``'s rule, cast to the run's dtype: with
  ``--dtype float32`` that is the float32 merge itself) in the input's block layout and scale dtype;
- router rows and per-expert router buffers are uncurl's (sliced or merged by the router rule), in
  the dtype the input stores them in.

``config.json`` keeps the input's ``quantization_config`` as it was (``modules_to_not_convert`` and
all) and its ``dtype``; expert count and top-k are rewritten as for any model.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UncurlError

log = logging.getLogger(__name__)

_ST = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F32": torch.float32, "BF16": torch.bfloat16,
       "F16": torch.float16, "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
       "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


@dataclass(frozen=True)
class Spec:
    """One tensor of the input's files, as its header describes it."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class Codec:
    """One quantization format: which tensors it quantizes, where their scales are, the arithmetic."""

    name = ""

    def detect(self, qc: dict) -> bool:
        raise NotImplementedError

    def check_config(self, qc: dict) -> str | None:
        """What in ``qc`` this codec does not handle (None: all of it)."""
        return None

    def describe(self, qc: dict) -> str:
        raise NotImplementedError

    def is_quantized(self, spec: Spec) -> bool:
        raise NotImplementedError

    def companions(self, name: str) -> tuple[str, ...]:
        """The names of the tensors that carry ``name``'s scales."""
        raise NotImplementedError

    def check(self, specs: dict[str, Spec], qc: dict) -> str | None:
        """The first quantized tensor whose scales do not fit it, as a sentence (None: all fit)."""
        raise NotImplementedError

    def dequantize(self, q: torch.Tensor, scales: tuple[torch.Tensor, ...], qc: dict) -> torch.Tensor:
        raise NotImplementedError

    def quantize(self, w: torch.Tensor, like: tuple[Spec, ...], qc: dict) -> tuple[torch.Tensor, ...]:
        """``w`` (full precision) as the quantized tensor and its scales, laid out as ``like``'s
        (the input's weight spec, then its companions' specs)."""
        raise NotImplementedError

    def dequantizing(self, qc: dict) -> dict:
        """from_pretrained's keyword arguments that make transformers dequantize on load, on any device."""
        return {}


FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448


class Fp8Block(Codec):
    """DeepSeek-V3's FP8: ``float8_e4m3fn [.., out, in]`` weights, each with ``weight_scale_inv``
    ``[.., ceil(out/bo), ceil(in/bi)]`` (float32 or bfloat16) for ``weight_block_size = [bo, bi]``;
    the real weight is ``q * scale`` block by block."""

    name = "fp8"

    def detect(self, qc):
        return qc.get("quant_method") == "fp8"

    def check_config(self, qc):
        block = qc.get("weight_block_size")
        if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            return f"weight_block_size {block!r} (per-tensor FP8 scales are not supported yet)"
        for key, accepted in (("fmt", (None, "e4m3")), ("scale_fmt", (None, "float")),
                              ("activation_scheme", (None, "dynamic")), ("expert_dtype", (None, "fp8"))):
            if qc.get(key) not in accepted:
                return f"{key} {qc.get(key)!r} (supported: {', '.join(repr(a) for a in accepted if a)})"
        return None

    def describe(self, qc):
        bo, bi = qc["weight_block_size"]
        return f"fp8 (e4m3, {bo}x{bi} blocks)"

    def is_quantized(self, spec):
        return spec.dtype == torch.float8_e4m3fn

    def companions(self, name):
        return (name[: -len("weight")] + "weight_scale_inv" if name.endswith(".weight") else name + "_scale_inv",)

    def scale_shape(self, shape, qc) -> tuple[int, ...]:
        bo, bi = qc["weight_block_size"]
        return (*shape[:-2], -(-shape[-2] // bo), -(-shape[-1] // bi))

    def check(self, specs, qc):
        scales = {}
        for name, spec in specs.items():
            if not self.is_quantized(spec):
                continue
            (scale,) = self.companions(name)
            scales[scale] = name
            if len(spec.shape) < 2:
                return f"{name} is float8 with shape {list(spec.shape)}; block-scaled weights have at least two axes"
            if scale not in specs:
                return f"{name} is float8 but the checkpoint has no {scale} (its scales)"
            want, got = self.scale_shape(spec.shape, qc), specs[scale]
            if got.shape != want:
                bo, bi = qc["weight_block_size"]
                return (f"{scale} has shape {list(got.shape)}, but {name} {list(spec.shape)} in {bo}x{bi} blocks "
                        f"needs {list(want)}")
            if got.dtype not in (torch.float32, torch.bfloat16):
                return f"{scale} is {got.dtype}; FP8 block scales are float32 or bfloat16"
        for name, spec in specs.items():
            if name.endswith("_scale_inv") and name not in scales:
                return f"{name} is a scale, but its weight is missing or not float8"
        return None

    def _expand(self, s: torch.Tensor, shape, qc) -> torch.Tensor:
        bo, bi = qc["weight_block_size"]
        return s.repeat_interleave(bo, -2)[..., : shape[-2], :].repeat_interleave(bi, -1)[..., : shape[-1]]

    def dequantize(self, q, scales, qc):
        return q.to(torch.float32) * self._expand(scales[0].to(torch.float32), q.shape, qc)

    def quantize(self, w, like, qc):
        bo, bi = qc["weight_block_size"]
        w = w.to(torch.float32)
        rows, cols = w.shape[-2:]
        padded = torch.nn.functional.pad(w.abs(), (0, -cols % bi, 0, -rows % bo))
        blocks = padded.unflatten(-1, (-1, bi)).unflatten(-3, (-1, bo))  # [.., R, bo, C, bi]
        amax = blocks.amax(dim=(-3, -1))
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).to(like[1].dtype)
        q = (w / self._expand(scale.to(torch.float32), w.shape, qc)).clamp(-FP8_MAX, FP8_MAX).to(like[0].dtype)
        return q, scale

    def dequantizing(self, qc):
        from transformers import FineGrainedFP8Config

        known = ("activation_scheme", "weight_block_size", "modules_to_not_convert", "modules_to_convert",
                 "scale_fmt", "expert_dtype")
        return {"quantization_config": FineGrainedFP8Config(**{k: qc[k] for k in known if k in qc}, dequantize=True)}


CODECS: dict[str, Codec] = {c.name: c for c in (Fp8Block(),)}


def quantization_config(config) -> dict | None:
    """``config``'s (a transformers config or config.json's dict) quantization_config as a dict, if any."""
    qc = config.get("quantization_config") if isinstance(config, dict) else getattr(config, "quantization_config", None)
    if qc is None:
        return None
    return dict(qc) if isinstance(qc, dict) else qc.to_dict()


def scheme(qc: dict) -> str:
    return str(qc.get("quant_method") or qc.get("quant_type") or "unknown")


def codec_for(qc: dict | None, where: str, dequantize: bool = False) -> Codec | None:
    """The codec that reads and writes ``qc``'s format; None for an unquantized checkpoint, or for any
    scheme with ``dequantize`` (transformers then dequantizes it on load, see ``check_dequantized``).
    Anything else is refused, naming the scheme."""
    if qc is None:
        return None
    codec = next((c for c in CODECS.values() if c.detect(qc)), None)
    problem = codec.check_config(qc) if codec else None
    if codec is not None and problem is None:
        return codec
    if dequantize:
        return codec if problem is None else None
    what = f"{scheme(qc)!r} with {problem}" if problem else repr(scheme(qc))
    raise UncurlError(
        f"{where} is quantized as {what} (config.json quantization_config); uncurl reads and writes back only "
        f"{', '.join(CODECS)} (block-scaled) checkpoints in their own format, and never writes a quantized model in "
        f"another precision silently: dequantize it first (transformers: from_pretrained, model.dequantize(), "
        f"save_pretrained) and prune that, or pass --dequantize to have transformers dequantize it on load and "
        f"write full precision")


def check_dequantized(model, qc: dict, where: str) -> None:
    """After a --dequantize load: transformers must have dequantized the weights (else uncurl cannot
    merge them)."""
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False):
        raise UncurlError(f"{where}: transformers keeps {scheme(qc)!r} weights quantized in memory, so uncurl cannot "
                          f"prune them even with --dequantize; dequantize the checkpoint first (from_pretrained, "
                          f"model.dequantize(), save_pretrained) and prune that")


@dataclass
class Source:
    """A quantized input's files: every tensor's header, and its format."""

    folder: Path
    codec: Codec
    config: dict  # quantization_config, as config.json has it
    raw_config: dict  # config.json
    specs: dict[str, Spec] = field(default_factory=dict)

    @property
    def format(self) -> str:
        return self.codec.describe(self.config)

    @property
    def stored_bytes(self) -> int:
        return sum(s.nbytes for s in self.specs.values())

    def read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.specs[name].file), framework="pt", device="cpu") as handle:
            return handle.get_tensor(name)

    def quantized(self, name: str) -> bool:
        return name in self.specs and self.codec.is_quantized(self.specs[name])

    def dequantized(self, name: str) -> torch.Tensor:
        """An input tensor in float32 (as stored, if it is not quantized)."""
        if not self.quantized(name):
            return self.read(name).to(torch.float32)
        return self.codec.dequantize(self.read(name), tuple(self.read(c) for c in self.codec.companions(name)),
                                     self.config)


def headers(files: list[Path]) -> dict[str, Spec]:
    """Every tensor of the safetensors ``files`` (name -> file, dtype, shape), from the headers alone."""
    from safetensors import safe_open

    specs = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                view = handle.get_slice(name)
                dtype = _ST.get(view.get_dtype())
                if dtype is None:
                    raise UncurlError(f"{path}: tensor {name} has dtype {view.get_dtype()}, which uncurl cannot read")
                specs[name] = Spec(path, dtype, tuple(view.get_shape()))
    return specs


def check_source(folder: Path, raw_config: dict, dequantize: bool = False) -> Source | None:
    """Before any weight is read: a local folder's quantization scheme is one uncurl keeps (else exit 2,
    naming it) and every quantized tensor's scales fit its shape (else exit 2, naming the tensor).
    None: not quantized, or --dequantize."""
    from .load import checkpoint_files

    qc = quantization_config(raw_config)
    codec = codec_for(qc, f"model folder {folder}", dequantize)
    if codec is None:
        return None
    files = checkpoint_files(folder)
    if not files:
        raise UncurlError(f"model folder {folder} is quantized ({scheme(qc)}) but has no safetensors shards; uncurl "
                          f"reads quantized checkpoints from safetensors only")
    source = Source(folder, codec, qc, raw_config, headers(files))
    problem = codec.check(source.specs, qc)
    if problem:
        raise UncurlError(f"model folder {folder} is damaged: {problem}; its quantization_config declares "
                          f"{source.format}. Re-download or re-save it")
    return source


# ---- writing: the input's files, streamed in the pruned model's names -----------------------------

def _expert_source(name: str, layers, plans, adapter, tail_start) -> tuple[str, tuple[int, ...]] | None:
    """For a save-time name of an expert tensor ``<layer>.experts.<k>.<rest>``: (the name of member j's
    tensor in the input, with {j} to fill, the group's members); None for any other tensor."""
    for layer in layers:
        prefix = f"{layer.name}.{adapter.experts_attr}."
        if name.startswith(prefix):
            index, _, rest = name[len(prefix):].partition(".")
            if not index.isdigit() or not rest:
                return None
            k, groups = int(index), plans[layer.name].groups
            members = tuple(groups[k]) if k < len(groups) else (tail_start[layer.name] + k - len(groups),)
            return prefix + "{}." + rest, members
    return None


def write_quantized(model, adapter, plans: dict, source: Source, folder: Path, shard_size) -> int:
    """The pruned ``model``'s checkpoint in ``source``'s format (see the module doc): safetensors shards
    as transformers names and splits them, index, config.json with the input's quantization_config,
    generation config. Returns the weight bytes written."""
    from huggingface_hub.serialization._base import split_state_dict_into_shards_factory
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    from .adapters import expert_count, find_moe_layers
    from .offload import read_tensor
    from .save import _layer_runs, _ShardWriter

    codec, qc = source.codec, source.config
    layers = find_moe_layers(model, adapter)
    tail_start = {layer.name: expert_count(source_config(source), adapter) for layer in layers}
    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    runs = _layer_runs(state)

    def plan_for(name: str, shape) -> tuple[str, str]:
        """(action, input tensor): copy its bytes (and scales), quantize like it, or cast to its dtype."""
        expert = _expert_source(name, layers, plans, adapter, tail_start)
        if expert is not None:
            pattern, members = expert
            src = pattern.format(members[0])
            if src not in source.specs:
                raise UncurlError(f"the pruned model's {name} has no counterpart {src} in {source.folder}: its files "
                                  f"name the experts otherwise than transformers saves them; pass --dequantize")
            if len(members) == 1:
                return "copy", src
            return ("quantize" if source.quantized(src) else "cast"), src
        if name not in source.specs:
            raise UncurlError(f"the pruned model's {name} is not in {source.folder}'s files (they name tensors "
                              f"otherwise than transformers saves them); pass --dequantize to write full precision")
        if source.specs[name].shape == tuple(shape) and not any(name.startswith(f"{layer.name}.{adapter.router_attr}.")
                                                                for layer in layers):
            return "copy", name
        if source.quantized(name):  # uncurl rewrites only experts and routers, which it handles above
            raise UncurlError(f"uncurl changed {name}, which {source.folder} stores quantized; pass --dequantize")
        return "cast", name

    specs, actions = {}, {}
    for run in runs:  # pass 1, on meta stand-ins: every output tensor's name, shape and dtype
        stand_ins = {name: torch.empty_like(t, device="meta") for name, t in run.items()}
        for name, t in revert_weight_conversion(model, stand_ins).items():
            action, src = actions[name] = plan_for(name, t.shape)
            like = source.specs[src]
            if action == "copy":
                specs[name] = torch.empty(like.shape, dtype=like.dtype, device="meta")
                for c_out, c_in in zip(codec.companions(name), codec.companions(src)):
                    if c_in in source.specs:
                        specs[c_out] = torch.empty(source.specs[c_in].shape, dtype=source.specs[c_in].dtype,
                                                   device="meta")
            elif action == "quantize":
                specs[name] = torch.empty(t.shape, dtype=like.dtype, device="meta")
                for c_out, c_in in zip(codec.companions(name), codec.companions(src)):
                    specs[c_out] = torch.empty(codec.scale_shape(t.shape, qc), dtype=source.specs[c_in].dtype,
                                               device="meta")
            else:
                specs[name] = torch.empty(t.shape, dtype=like.dtype, device="meta")
    split = split_state_dict_into_shards_factory(
        {n: (n,) for n in specs}, get_storage_id=lambda v: v[0],
        get_storage_size=lambda v: specs[v[0]].numel() * specs[v[0]].element_size(),
        filename_pattern="model{suffix}.safetensors", max_shard_size=shard_size)
    folder.mkdir(parents=True, exist_ok=True)
    shards = {file: _ShardWriter(folder / file, {n: specs[n] for n in names})
              for file, names in split.filename_to_tensors.items()}
    where = {name: shards[file] for file, names in split.filename_to_tensors.items() for name in names}
    try:  # pass 2: one decoder layer at a time
        for run in runs:
            converted = revert_weight_conversion(model, {n: read_tensor(model, n, t) for n, t in run.items()})
            for name, tensor in converted.items():
                action, src = actions[name]
                if action == "copy":
                    where[name].write(name, source.read(src))
                    for c_out, c_in in zip(codec.companions(name), codec.companions(src)):
                        if c_in in source.specs:
                            where[c_out].write(c_out, source.read(c_in))
                elif action == "quantize":
                    like = (source.specs[src], *(source.specs[c] for c in codec.companions(src)))
                    parts = codec.quantize(tensor, like, qc)
                    for out_name, part in zip((name, *codec.companions(name)), parts):
                        where[out_name].write(out_name, part)
                else:
                    where[name].write(name, tensor.to(source.specs[src].dtype))
            del converted
    finally:
        for shard in shards.values():
            shard.file.close()
    unwritten = sorted(n for shard in shards.values() for n in shard.missing)
    if unwritten:
        raise RuntimeError(f"quantized save never wrote {unwritten[:5]}")
    total = sum(t.numel() * t.element_size() for t in specs.values())
    if split.is_sharded:
        index = {"metadata": {"total_size": total}, "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    dtype = source.raw_config.get("dtype", source.raw_config.get("torch_dtype"))
    if dtype is not None:
        config.dtype = dtype
    config.quantization_config = copy.deepcopy(source.raw_config["quantization_config"])
    config.save_pretrained(folder)
    if model.can_generate():
        model.generation_config.save_pretrained(folder)
    return total


def source_config(source: Source):
    """The input's transformers config (for its expert count)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source.folder)

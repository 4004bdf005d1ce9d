"""Next-token-prediction (MTP) blocks: profiled, pruned to the same K and written back with the model.

    uncurl prune --model ./DeepSeek-V3 --keep 128 --out runs/k128   # model.layers.61.* cut to 128 experts too

Several families' checkpoints keep blocks that serve speculative decoding beside the model
(``../shared/REAL_CHECKPOINTS.md``, "MTP"): transformers does not load them (each model class's
``_keys_to_ignore_on_load_unexpected``), vLLM and SGLang do, and build their experts from the
config's expert count. So a pruned checkpoint must hold them with K experts, or not at all with
their count set to 0. Where a family keeps them and how they are run is the adapter table's
``MtpBlocks`` entry (``adapters.py``: the count keys, the wiring); nothing here names a family.

**Wiring "deepseek"** (DeepSeek-V3/R1, Kimi-K2, GLM-4.5/4.5-Air): block i is
``model.layers.{num_hidden_layers + i}.*``, a decoder layer of the family's own class (attention,
router, experts, shared experts) plus ``enorm``, ``hnorm``, ``eh_proj [H, 2H]``,
``shared_head.{norm,head}`` and its own ``embed_tokens``. It is run as vLLM's ``deepseek_mtp.py``
runs it: at position t, ``x = eh_proj([enorm(embed(token[t+1])), hnorm(h[t])])`` (the embedding
zeroed at position 0), h the main model's last hidden state before its final norm, then the decoder
layer. uncurl builds the block as a one-layer model of the family's own causal-LM class (the
"shell": ``embed_tokens`` the block's, the decoder layer the block's, ``norm`` its
``shared_head.norm``, ``lm_head`` its ``shared_head.head``), loaded from the checkpoint's files by
transformers' own loading (so experts stored one tensor per expert, or FP8, load as for the main
layers), and feeds it on the calibration batches: its router and experts are recorded as any MoE
layer's (``profile._Recorder``), planned by the same method, rewritten by the same merge
(``merge.rewrite_model`` on the shell; ``--merge fit`` in the layer-by-layer prune, else aligned)
and written back under the checkpoint's own names (the writers revert transformers' conversions as
for the main layers: per-expert names, and an FP8 input's kept experts byte for byte).

**Memory and passes.** The whole-model profile runs the block on each batch after the model's
forward. Layer by layer (``--pipeline sequential``) the last hidden states of every batch are held
(tokens x hidden, as the driver holds states between layers) and the block runs once after the last
decoder layer. The block is held whole on the execution device while it runs: one decoder layer
plus its embedding and head.

**Dropped** (the count written as 0, the report and card say why): a family whose wiring uncurl
does not run (``MtpBlocks.wiring`` None: ERNIE-4.5, LongCat, Qwen3-Next/3.5, ...), a multimodal
wrapper's, a config announcing blocks whose tensors the checkpoint lacks, a ``--profile`` file
without their statistics, ``uncurl sweep``. Every pruned config has its count zeroed where the
expert count is written (``adapters.set_moe_keys``); it is set back only where the blocks are
written.
"""

from __future__ import annotations

import copy
import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .adapters import MoEAdapter, MoELayer, find_moe_layers, language_stack, moe_config, mtp_count, set_mtp_count, top_k

log = logging.getLogger(__name__)

SHELL = "model.layers.0"  # the block's decoder layer inside its shell
# the block's own tensors outside its decoder layer -> their place in the shell (None: MtpInput's)
_OUTSIDE = {"embed_tokens.": "model.embed_tokens.", "shared_head.norm.": "model.norm.",
            "shared_head.head.": "lm_head.", "enorm.": None, "hnorm.": None, "eh_proj.": None}


def announced(config, adapter: MoEAdapter) -> tuple[str | None, int]:
    """(the config key, the number of MTP blocks it announces); (None, 0) when none."""
    return mtp_count(config, adapter)


def set_count(config, adapter: MoEAdapter, count: int) -> None:
    set_mtp_count(config, adapter, count)


def layer_index(config) -> int:
    """The index of the first MTP block (``deepseek`` wiring): right after the decoder layers."""
    return int(moe_config(config).num_hidden_layers)


class MtpInput(nn.Module):
    """``eh_proj([enorm(e), hnorm(h)])``: the block's input from the next token's embedding and h."""

    def __init__(self, norm: type, hidden: int, eps: float):
        super().__init__()
        self.enorm, self.hnorm = norm(hidden, eps=eps), norm(hidden, eps=eps)
        self.eh_proj = nn.Linear(2 * hidden, hidden, bias=False)

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.eh_proj(torch.cat([self.enorm(embeds), self.hnorm(hidden)], dim=-1))


@dataclass
class Block:
    """One MTP block of the checkpoint: its prefix there and, once loaded, its shell and input."""

    index: int
    prefix: str  # e.g. "model.layers.61"
    name: str  # its MoE block, as the report, the profile and the plans call it: "model.layers.61.mlp"
    shell: nn.Module | None = None
    inputs: MtpInput | None = None

    def real(self, shell_name: str) -> str:
        return self.prefix + shell_name[len(SHELL):] if shell_name.startswith(SHELL) else shell_name

    def moe(self, shell=None) -> MoELayer:
        from .adapters import ADAPTERS

        shell = shell if shell is not None else self.shell
        (layer,) = find_moe_layers(shell, ADAPTERS[shell.config.model_type])
        return layer

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, hidden: torch.Tensor, shell=None):
        """The block at positions 0..T-2 of a right-padded batch: h[t] and token t+1 -> its last hidden state
        after ``shared_head.norm`` [B, T-1, H] (None for one-token batches); the mask of those positions."""
        shell = shell if shell is not None else self.shell
        device = self.inputs.eh_proj.weight.device
        ids, mask = input_ids[:, 1:].to(device), attention_mask[:, 1:].to(device)
        if ids.shape[1] == 0:
            return None, mask
        embeds = shell.get_input_embeddings()(ids)
        embeds[:, 0] = 0  # position 0, as vLLM masks it
        x = self.inputs(embeds, hidden[:, :-1].to(device, embeds.dtype))
        positions = torch.arange(ids.shape[1], device=device)[None].expand(ids.shape[0], -1)
        out = shell.model(inputs_embeds=x, attention_mask=mask, position_ids=positions, use_cache=False)
        return out.last_hidden_state, mask

    def state(self, shell=None) -> dict[str, torch.Tensor]:
        """The block's tensors under the checkpoint's names as transformers holds them (runtime layout:
        what the writers revert, with the main layers', to the checkpoint's own layout)."""
        shell = shell if shell is not None else self.shell
        own = {v: k for k, v in _OUTSIDE.items() if v}
        out = {}
        for name, t in shell.state_dict().items():
            place = next((k for k in own if name.startswith(k)), None)
            if place is not None:
                out[f"{self.prefix}.{own[place]}{name[len(place):]}"] = t
            elif name.startswith(SHELL + "."):
                out[self.real(name)] = t
        out.update({f"{self.prefix}.{k}": t for k, t in self.inputs.state_dict().items()})
        return out

    def release(self) -> None:
        self.shell = self.inputs = None


def _shell_config(config, adapter: MoEAdapter):
    """The family's text config for a one-layer model whose only layer is an MoE layer."""
    text = copy.deepcopy(moe_config(config))
    text.num_hidden_layers = 1
    if getattr(text, "first_k_dense_replace", None) is not None:
        text.first_k_dense_replace = 0
    text.tie_word_embeddings = False
    set_count(text, adapter, 0)
    if hasattr(text, "quantization_config"):
        del text.quantization_config
    return text


@dataclass
class Blocks:
    """The MTP blocks of one run: the ones uncurl prunes (``blocks``), or why they are dropped (``why``)."""

    adapter: MoEAdapter
    key: str | None = None  # the config key announcing them
    count: int = 0  # how many the input's config announces
    blocks: list[Block] = field(default_factory=list)
    why: str | None = None  # why they are dropped (None: pruned, or none announced)
    folder: Path | None = None
    quantized: object | None = None  # quant.Source of an FP8 input
    config: object = None  # the input model's config
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    merge: str | None = None  # the merge rule the blocks got (the report's)

    @property
    def kept(self) -> bool:
        return bool(self.blocks) and self.why is None

    @property
    def names(self) -> list[str]:
        """The MoE block names (``model.layers.61.mlp``, ...) the profile and the plans use."""
        return [b.name for b in self.blocks] if self.kept else []

    def layer_index(self) -> dict[str, int]:
        """{MoE block name: its layer index}, as ``Profile.layer_index`` keeps them."""
        return {b.name: b.index for b in self.blocks} if self.kept else {}

    def session(self, seed: int, keep_inputs: bool = False) -> "Session":
        return Session(self, seed, keep_inputs)

    def drop(self, why: str) -> None:
        if self.count and self.why is None:
            self.why = why
            log.warning("the %d MTP block(s) the config announces (%s) are dropped and their count set to 0: %s",
                        self.count, self.key, why)

    def report(self, keep: int | None = None) -> dict | None:
        """The report's ``mtp`` entry (None when the input announces none)."""
        if not self.count:
            return None
        out = {"announced": self.count, "count_key": self.key, "kept": self.count if self.kept else 0,
               "layers": self.names}
        if self.kept:
            out.update(experts=keep, merge=self.merge)
        else:
            out["why_dropped"] = self.why
        return out

    # -- loading --------------------------------------------------------------------------------

    def _entries(self, prefix: str, handles: list) -> dict:
        """The checkpoint's tensors under ``prefix`` as from_pretrained reads a state dict's entries
        (an FP8 input's dequantized as read, ``quant.dequantized_state``); ``handles`` gets the files
        opened, for the caller to close."""
        from .load import checkpoint_files
        from .quant import dequantized_state, headers

        if self.quantized is not None:
            return {k: v for k, v in dequantized_state(self.quantized).items() if k.startswith(prefix)}
        from safetensors import safe_open

        out = {}
        for path, names in _by_file(headers(checkpoint_files(self.folder)), prefix).items():
            handles.append(safe_open(str(path), framework="pt", device="cpu", backend="pread"))
            out.update({n: handles[-1].get_slice(n) for n in names})
        return out

    def load(self, block: Block, device: torch.device | None = None) -> Block:
        """``block``'s shell and input, from the checkpoint's files, in the run's dtype on ``device``."""
        from .load import model_class, prefer_lean_experts

        device = device or self.device
        config = _shell_config(self.config, self.adapter)
        shell_state, inputs, handles = {}, {}, []
        for name, entry in self._entries(block.prefix + ".", handles).items():
            rel = name[len(block.prefix) + 1:]
            place = next((k for k in _OUTSIDE if rel.startswith(k)), None)
            if place is None:
                shell_state[f"{SHELL}.{rel}"] = entry
            elif _OUTSIDE[place] is None:
                inputs[rel] = entry
            else:
                shell_state[_OUTSIDE[place] + rel[len(place):]] = entry
        try:
            shell, info = model_class(config).from_pretrained(None, config=config, state_dict=shell_state,
                                                               dtype=self.dtype, device_map={"": device},
                                                               output_loading_info=True)
            inputs = {k: (v if isinstance(v, torch.Tensor) else v[...]).to(self.dtype) for k, v in inputs.items()}
        finally:
            for handle in handles:
                handle.__exit__(None, None, None)
        problems = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
        if problems or info["error_msgs"]:
            raise ValueError(f"MTP block {block.prefix}: its tensors do not load as a {config.model_type} decoder "
                             f"layer: {problems or info['error_msgs']}")
        prefer_lean_experts(shell, device)
        norm = type(shell.model.norm)
        module = MtpInput(norm, config.hidden_size, config.rms_norm_eps)
        module.load_state_dict(inputs, strict=True)
        block.shell, block.inputs = shell.eval(), module.to(device=device, dtype=self.dtype).eval()
        return block

    # -- profiling ------------------------------------------------------------------------------

    @contextmanager
    def hidden_states(self, model):
        """Each forward's last hidden state before the final norm (``MtpBlocks.hidden_from``), kept in
        ``store`` by batch: the sequential driver's batch thread's index, else 0."""
        from . import sequential

        _, stack = language_stack(model, self.adapter)
        store: dict[int, torch.Tensor] = {}

        def hook(module, args):
            batch = getattr(sequential._local, "batch", None)
            store[batch.index if batch is not None else 0] = args[0].detach()

        handle = stack.get_submodule(self.adapter.mtp.hidden_from).register_forward_pre_hook(hook)
        try:
            yield store
        finally:
            handle.remove()

    def recorder(self, seed: int):
        """A recorder of every kept block's router and experts (loaded), by their real names."""
        from .profile import _Recorder

        layers = []
        for block in self.blocks:
            moe = block.moe()
            layers.append(MoELayer(block.name, block.index, moe.router, moe.experts, moe.num_experts))
        return _Recorder(layers, layers[0].num_experts, seed, tail=bool(self.adapter.tail_rows),
                         output=self.adapter.router_output, top_k=top_k(self.config, self.adapter),
                         router_logits=self.adapter.router_logits)

    def run_batch(self, recorder, batch, hidden: torch.Tensor, text_ids) -> None:
        """Every kept block on one batch (recorded), its input ``hidden`` the main model's states."""
        from .profile import token_positions

        ids, mask = batch["input_ids"], batch["attention_mask"]
        if ids.shape[1] < 2:
            return
        names = mask[:, 1:]
        recorder.mask = names.reshape(-1).bool().to(self.device)
        recorder.tokens = token_positions(names, text_ids)
        try:
            for block in self.blocks:
                block.forward(ids, mask, hidden)
        finally:
            recorder.mask = recorder.tokens = None

    # -- pruning --------------------------------------------------------------------------------

    def prune_all(self, plans: dict, stats: dict, *, merge: str, router_rule: str, top_k: int | None) -> list:
        """Every kept block loaded, cut by its plan and let go: the writers' runs [(prefix, {name: tensor})]
        (the whole-model prune; ``--merge fit`` is aligned here, the fit needing the block's inputs)."""
        from .merge import MERGE_RULES

        fitting = MERGE_RULES[merge].fit
        merge = "aligned" if fitting else merge
        self.merge = merge + (" (not fitted: the whole-model prune keeps no MTP inputs to fit on; the layer-by-layer "
                              "prune fits it)" if fitting else "")
        runs = []
        for block in self.blocks:
            self.load(block)
            try:
                shell = self.pruned(block, plans[block.name], merge=merge, router_rule=router_rule,
                                    stats=stats[block.name], top_k=top_k)
                runs.append((block.prefix, block.state(shell)))
            finally:
                block.release()
        return runs

    def pruned(self, block: Block, plan, *, merge: str, router_rule: str, stats, top_k: int | None):
        """The block's shell cut to the plan's K experts (``merge.rewrite_model`` on the shell)."""
        from .merge import rewrite_model

        shell_name = block.moe().name
        return rewrite_model(block.shell, self.adapter, {shell_name: plan}, router_rule=router_rule, merge=merge,
                             stats={shell_name: stats}, top_k=top_k)

    def stand_ins(self, keep: int, top_k: int | None) -> list[tuple[str, dict]]:
        """Each kept block's tensors as the pruned checkpoint holds them, on ``meta`` (the writer's layout,
        fixed before anything is profiled): each block is loaded once here, then let go."""
        from .layerwise import pruned_on_meta

        runs = []
        for block in self.blocks:
            self.load(block, torch.device("cpu"))
            pruned = pruned_on_meta(block.shell, self.adapter, keep, top_k)
            runs.append((block.prefix, {k: torch.empty_like(v, device="meta") for k, v in block.state(pruned).items()}))
            block.release()
        return runs


class Session:
    """The kept blocks loaded and recorded on calibration batches (``run``), each fed the main model's
    last hidden states of that batch; ``finish`` gives their statistics. ``keep_inputs``: the
    batches are held to be run again (``replay``: ``--merge fit`` in the layer-by-layer prune)."""

    def __init__(self, blocks: Blocks, seed: int, keep_inputs: bool = False):
        self.blocks, self.keep_inputs, self.inputs = blocks, keep_inputs, []
        for block in blocks.blocks:
            blocks.load(block)
        self.recorder = blocks.recorder(seed)
        self.stats: dict = {}

    def run(self, batch, hidden: torch.Tensor, text_ids) -> None:
        if self.keep_inputs:
            self.inputs.append((batch, hidden, text_ids))
        self.blocks.run_batch(self.recorder, batch, hidden, text_ids)

    def finish(self) -> dict:
        """{block name: LayerStats}, on the CPU."""
        self.recorder.close()
        self.stats = dict(self.recorder.stats)
        return self.stats

    def replay(self, block: Block, passes) -> None:
        """``block`` (its original shell, hooked by ``fit.Replay``: ``passes``) on every held batch again."""
        for batch, hidden, _ in self.inputs:
            passes.mask = batch["attention_mask"][:, 1:].reshape(-1).bool().to(self.blocks.device)
            block.forward(batch["input_ids"], batch["attention_mask"], hidden)

    def close(self) -> None:
        self.inputs = []
        for block in self.blocks.blocks:
            block.release()


def _by_file(specs: dict, prefix: str) -> dict:
    out: dict = {}
    for name, spec in specs.items():
        if name.startswith(prefix):
            out.setdefault(spec.file, []).append(name)
    return out


def present(names, config) -> list[int]:
    """The MTP block indices (``deepseek`` wiring) the checkpoint's tensor ``names`` hold a layer for."""
    first = layer_index(config)
    found = {int(m.group(1)) for n in names if (m := re.match(r"model\.layers\.(\d+)\.", n))}
    return sorted(i for i in found if i >= first)


def find(loaded, *, why: str | None = None) -> Blocks:
    """The MTP blocks of ``loaded``'s input and whether this run prunes them (``why``: a reason of the
    caller's to drop them, e.g. ``uncurl sweep``)."""
    from .load import checkpoint_files
    from .quant import headers

    model, adapter = loaded.model, loaded.adapter
    key, count = announced(model.config, adapter)
    found = Blocks(adapter, key, count, config=model.config, dtype=model.dtype, quantized=loaded.quantized,
                   folder=loaded.source)
    if not count:
        return found
    if why:
        found.drop(why)
        return found
    if adapter.mtp.wiring is None:
        found.drop(f"uncurl does not run {model.config.model_type}'s MTP blocks yet")
        return found
    if moe_config(model.config) is not model.config:
        found.drop("uncurl does not run a multimodal model's MTP blocks yet")
        return found
    names = list(headers(checkpoint_files(loaded.source))) if loaded.source is not None else []
    first = layer_index(model.config)
    want = list(range(first, first + count))
    have = present(names, model.config)
    if have != want:
        found.drop(f"the config announces {count} ({key}) at model.layers.{want[0]}"
                   f"{f'..{want[-1]}' if count > 1 else ''}, the checkpoint holds "
                   f"{('model.layers.' + ', '.join(map(str, have))) if have else 'none'}")
        return found
    from .sequential import decoder_layers, layer_device

    found.device = layer_device(decoder_layers(model, adapter)[-1][1])
    found.blocks = [Block(i, f"model.layers.{i}", f"model.layers.{i}.{adapter.mtp.moe_attr}") for i in want]
    return found


def check_written(folder: Path, config, adapter: MoEAdapter, experts: int) -> list[str]:
    """What in a written checkpoint contradicts its config about MTP blocks (``deepseek`` wiring): a
    block announced but absent, one present but not announced, or one with other than ``experts``
    experts (its router rows and its per-expert tensors)."""
    from .load import checkpoint_files
    from .quant import headers

    specs = headers(checkpoint_files(folder))
    key, count = announced(config, adapter)
    first = layer_index(config)
    have = present(specs, config)
    problems = []
    if have != list(range(first, first + count)):
        problems.append(f"config announces {count} MTP block(s) ({key or 'no count key'}), the checkpoint holds "
                        f"{len(have)} at model.layers.{have}")
    for i in have:
        prefix = f"model.layers.{i}.{adapter.mtp.moe_attr}."
        router = specs.get(f"{prefix}{adapter.router_attr}.weight")
        ids = {int(m.group(1)) for n in specs if (m := re.match(re.escape(prefix + adapter.experts_attr) + r"\.(\d+)\.",
                                                               n))}
        fused = [s.shape[0] for n, s in specs.items() if re.fullmatch(re.escape(prefix + adapter.experts_attr) +
                                                                      r"\.[a-z_]+", n)]
        counts = ({len(ids)} if ids else set()) | set(fused) | ({router.shape[0]} if router is not None else set())
        if counts != {experts}:
            problems.append(f"MTP block model.layers.{i} has {sorted(counts)} experts, expected {experts}")
    return problems

"""What a model repo ships beside its weights, carried into the pruned output; and remote code.

    uncurl prune --model ./Kimi-K2-Instruct ...                      # model_type kimi_k2: DeepseekV3ForCausalLM
    uncurl prune --model ./Kimi-K2-Instruct --trust-remote-code ...  # its tiktoken tokenizer is the repo's code

**Remote code.** uncurl runs a repo's Python (the files its ``auto_map`` names) only with
``--trust-remote-code``, and never asks: every transformers call that could import such code is
given ``trust_remote_code`` explicitly (left unset, transformers asks "Do you wish to run the custom
code? [y/N]" on stdin). The model is loaded with transformers' own class wherever it has one, since
uncurl's adapters know those classes: the class of a ``model_type`` transformers has, else the first
of the config's ``architectures`` it has (Kimi-K2: ``kimi_k2`` is not in transformers,
``DeepseekV3ForCausalLM`` is), as vLLM picks its implementation by ``architectures``. The repo's code
runs only for what has no class in transformers: a model whose model_type and architectures it lacks
(``uncurl eval`` and ``cost`` can run it; pruning needs a family in uncurl's table), or a tokenizer
whose class it lacks (Kimi-K2's tiktoken tokenizer). Without the flag these exit 2 before any weight
is read, naming it.

**The output keeps the repo's files** (``Carried``):

- every file ``auto_map`` names, in config.json and tokenizer_config.json (``"file.Class"``, lists of
  [slow, fast] classes), with the files they import relatively, byte for byte: so
  ``from_pretrained(out, trust_remote_code=True)`` works on the output as on the parent. An entry
  whose file the parent lacks is dropped from the output's ``auto_map``; one that names another
  repo's code (``"org/repo--file.Class"``) is kept as it is (transformers fetches it from there);
- licence and notice files (``LICENSE*``, ``LICENCE*``, ``USE_POLICY*``, ``NOTICE*``, ``COPYING*``,
  any case, top level), which licences such as Llama's require with any redistribution; the card's
  ``license`` falls back to them (``licence_metadata``);
- a tokenizer with an ``auto_map`` keeps its own files as they are (tokenizer_config.json and
  the vocabulary), instead of transformers' re-saving;
- config.json, for a parent whose config has an ``auto_map`` or a model_type transformers lacks, is
  the parent's own file with only the keys pruning changed, spelled as the parent spells them
  (``parent_config_with``): the repo's code and serving engines read it as they read the parent's
  (``model_type: kimi_k2``, ``rope_scaling``), where transformers' own serialisation would rename
  keys (``rope_parameters``) and the model type. transformers reads it back natively as above;
  the result is checked to read back as the config transformers wrote.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointCheckError, UncurlError

log = logging.getLogger(__name__)

LICENCE_PREFIXES = ("license", "licence", "use_policy", "notice", "copying")
# a tokenizer's own files, copied as they are when its tokenizer_config.json has an auto_map
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.json",
                   "tokenizer.model", "tiktoken.model", "vocab.json", "merges.txt", "vocab.txt")
FLAG = "--trust-remote-code"
RISK = ("it imports and runs Python files from the model's folder or Hub repo (the ones its auto_map names) with "
        "your permissions: read them first")


# ---- where the parent's files are -----------------------------------------------------------------

def _cached(model_id: str, name: str) -> Path | None:
    """A Hub repo's file through the Hub cache (downloaded when online), or None."""
    from transformers.utils import cached_file

    try:
        found = cached_file(model_id, name, _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
    except (OSError, ValueError):
        found = None
    return Path(found) if found else None


def source_file(model_id: str, name: str) -> Path | None:
    """The parent's file ``name`` (a path inside its folder or Hub repo), or None when it has none."""
    if model_id.startswith("builtin:"):
        return None
    folder = Path(model_id)
    if folder.is_dir():
        path = folder / name
        return path if path.is_file() else None
    return _cached(model_id, name)


def source_folder(model_id: str) -> Path | None:
    """The folder holding the parent's files: a local folder, or a Hub snapshot in the cache (only
    the files already downloaded are there)."""
    if Path(model_id).is_dir():
        return Path(model_id)
    config = source_file(model_id, "config.json")
    return config.parent if config is not None else None


def raw_json(model_id: str, name: str) -> dict:
    """The parent's JSON file ``name`` as written, {} when it has none or it is not a JSON object
    (a damaged config.json is refused, naming it, by load.check_config_file)."""
    path = source_file(model_id, name)
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


# ---- model types transformers lacks ---------------------------------------------------------------

@dataclass(frozen=True)
class Native:
    """A config whose ``model_type`` transformers lacks, loaded with the class of one of its
    ``architectures`` that it has."""

    model_type: str  # the config's own, kept in the output (kimi_k2)
    native_type: str  # the model_type of the class that loads it (deepseek_v3): uncurl's adapter
    architecture: str  # DeepseekV3ForCausalLM

    def why(self) -> str:
        import transformers

        return (f"transformers {transformers.__version__} has no model type {self.model_type!r}; the config's "
                f"architectures name {self.architecture}, which it has, so that class loads it natively (as vLLM "
                f"picks its implementation by architectures), with uncurl's {self.native_type} adapter, and no "
                f"code from the repo runs")

    def as_dict(self) -> dict:
        return {"model_type": self.model_type, "native_type": self.native_type, "class": self.architecture,
                "why": self.why()}


def known_type(model_type) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return isinstance(model_type, str) and model_type in CONFIG_MAPPING_NAMES


def native_of(raw: dict) -> Native | None:
    """For a config.json (``raw``) whose model_type transformers lacks: the first of its
    ``architectures`` that transformers has (a model class whose config class it knows); else None."""
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or known_type(model_type):
        return None
    import transformers

    for arch in raw.get("architectures") or ():
        try:
            cls = getattr(transformers, arch) if isinstance(arch, str) and arch.isidentifier() else None
        except Exception:  # noqa: BLE001 - a missing name, or one whose module cannot import here
            cls = None
        config_class = getattr(cls, "config_class", None)
        if config_class is not None and known_type(getattr(config_class, "model_type", None)):
            return Native(model_type, config_class.model_type, arch)
    return None


def family_of(raw: dict):
    """The model_type uncurl's adapter table is looked up with: the config's own, or for one
    transformers lacks, its architectures' (``native_of``)."""
    native = native_of(raw)
    return native.native_type if native is not None else raw.get("model_type")


def config_refs(raw: dict) -> list[str]:
    return auto_map_refs(raw.get("auto_map"))


def remote_only(model_id: str, raw: dict) -> UncurlError:
    """The error for a config transformers can only read with the repo's code, without --trust-remote-code."""
    import transformers

    files = sorted({f for f in map(module_file, config_refs(raw)) if f}) or ["(none named)"]
    archs = ", ".join(a for a in raw.get("architectures") or () if isinstance(a, str)) or "none listed"
    where = f"model folder {model_id}" if Path(model_id).is_dir() else f"model {model_id!r}"
    return UncurlError(f"{where}: transformers {transformers.__version__} has neither its model_type "
                       f"{raw.get('model_type')!r} nor any of its architectures ({archs}), so only the repo's own code "
                       f"({', '.join(files)}) can load it; uncurl runs it only with {FLAG} ({RISK})")


def read_config(model_id: str, trust_remote_code: bool = False):
    """(the model's config, ``Native`` or None): transformers' own config class wherever it has one
    (the model_type's, else an architecture's: ``native_of``), the repo's code only with
    ``trust_remote_code`` and only where transformers has none. Never asks on stdin. transformers'
    own errors (an unreadable file, an unknown type without code) propagate for the caller."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    raw = raw_json(model_id, "config.json")
    native = native_of(raw)
    if native is not None:
        cls = CONFIG_MAPPING[native.native_type]
        # from the dict without its model_type: transformers would warn about the mismatch, and the
        # instance would carry kimi_k2, which no transformers mapping or uncurl adapter knows
        config = cls.from_dict(copy.deepcopy({k: v for k, v in raw.items() if k != "model_type"}))
        config._name_or_path = str(model_id)
        return config, native
    remote = not known_type(raw.get("model_type")) and bool(config_refs(raw))  # no model_type at all, too
    if remote and not trust_remote_code:
        raise remote_only(model_id, raw)
    return AutoConfig.from_pretrained(model_id, trust_remote_code=bool(remote and trust_remote_code)), None


def remote_model_class(config):
    """The repo's model class for a config read with its own code (``read_config`` with
    ``trust_remote_code``), from its ``auto_map``; None for transformers' own configs."""
    if not type(config).__module__.startswith("transformers_modules"):
        return None
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    auto_map = getattr(config, "auto_map", None) or {}
    ref = auto_map.get("AutoModelForCausalLM") or auto_map.get("AutoModel")
    if ref is None:
        raise UncurlError(f"model {config._name_or_path}: its config is the repo's code, and its auto_map names no "
                          f"AutoModelForCausalLM class to load it with")
    return get_class_from_dynamic_module(ref, config._name_or_path)


# ---- auto_map: the code files ---------------------------------------------------------------------

def auto_map_refs(auto_map) -> list[str]:
    """Every class reference in an ``auto_map``: a dict's values, each a string or a [slow, fast]
    list (None entries skipped), or the legacy bare list."""
    if isinstance(auto_map, dict):
        values = list(auto_map.values())
    elif isinstance(auto_map, (list, tuple)):
        values = [auto_map]
    else:
        return []
    refs = []
    for value in values:
        for ref in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(ref, str) and ref.strip():
                refs.append(ref.strip())
    return refs


def module_file(ref: str) -> str | None:
    """``"modeling_x.Cls"`` -> ``"modeling_x.py"``; None for another repo's code
    (``"org/repo--modeling_x.Cls"``) or a reference without a module."""
    if "--" in ref or "." not in ref:
        return None
    return ref.rsplit(".", 1)[0].replace(".", "/") + ".py"


def _relative_imports(path: Path) -> list[str]:
    """The modules a code file imports relatively (``from .configuration_x import ...``), as files
    beside it, as transformers resolves them."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    found = re.findall(r"^\s*import\s+\.(\S+)\s*$", text, flags=re.MULTILINE)
    found += re.findall(r"^\s*from\s+\.(\S+)\s+import", text, flags=re.MULTILINE)
    return sorted({m.replace(".", "/") + ".py" for m in found})


def code_files(model_id: str, refs: list[str]) -> tuple[dict[str, Path], list[str], list[str]]:
    """({file in the repo: its path} for every file ``refs`` name and the files they import
    relatively, the refs whose file the parent lacks, the refs to another repo's code)."""
    files: dict[str, Path] = {}
    missing, elsewhere = [], []
    queue: list[str] = []
    for ref in refs:
        name = module_file(ref)
        if name is None:
            (elsewhere if "--" in ref else missing).append(ref)
        elif source_file(model_id, name) is None:
            missing.append(ref)
        else:
            queue.append(name)
    while queue:
        name = queue.pop()
        if name in files:
            continue
        path = source_file(model_id, name)
        if path is None:
            continue  # an import the repo's own code would fail on too; nothing to carry
        files[name] = path
        parent = str(Path(name).parent)
        queue += [rel if parent == "." else f"{parent}/{rel}" for rel in _relative_imports(path)]
    return files, sorted(set(missing)), sorted(set(elsewhere))


def without_missing(auto_map, missing: set[str]):
    """``auto_map`` without the references in ``missing`` (a [slow, fast] list keeps its place as None)."""
    if isinstance(auto_map, dict):
        out = {}
        for key, value in auto_map.items():
            if isinstance(value, (list, tuple)):
                value = [None if v in missing else v for v in value]
                if any(v is not None for v in value):
                    out[key] = value
            elif value not in missing:
                out[key] = value
        return out
    if isinstance(auto_map, (list, tuple)):
        return [None if v in missing else v for v in auto_map]
    return auto_map


# ---- tokenizers -----------------------------------------------------------------------------------

def tokenizer_ref(tokenizer_config: dict) -> str | None:
    """The class reference transformers would load a tokenizer's code from (the fast one, else the
    slow one), from tokenizer_config.json's ``auto_map``; None without one."""
    auto_map = tokenizer_config.get("auto_map")
    refs = auto_map if isinstance(auto_map, (list, tuple)) else (
        auto_map.get("AutoTokenizer") if isinstance(auto_map, dict) else None)
    if isinstance(refs, str):
        refs = [refs]
    if not isinstance(refs, (list, tuple)):
        return None
    return next((r for r in reversed(list(refs)) if isinstance(r, str) and r.strip()), None)


def remote_tokenizer(model_id: str) -> str | None:
    """The class reference of a tokenizer that only the repo's code can load: an ``auto_map``
    entry, and a ``tokenizer_class`` transformers does not have (Kimi-K2's ``TikTokenTokenizer``)."""
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    tokenizer_config = raw_json(model_id, "tokenizer_config.json")
    ref = tokenizer_ref(tokenizer_config)
    if ref is None:
        return None
    name = tokenizer_config.get("tokenizer_class")
    if isinstance(name, str) and name:
        base = name.removesuffix("Fast")
        try:
            if tokenizer_class_from_name(base) is not None or tokenizer_class_from_name(base + "Fast") is not None:
                return None
        except Exception:  # noqa: BLE001 - a name transformers cannot import here: not its own
            pass
    return ref


# ---- licences -------------------------------------------------------------------------------------

def licence_files(model_id: str) -> dict[str, Path]:
    """The parent's licence and notice files at the top of its folder (any case), by name."""
    folder = source_folder(model_id)
    if folder is None:
        return {}
    return {p.name: p for p in sorted(folder.iterdir())
            if p.is_file() and p.name.lower().startswith(LICENCE_PREFIXES)}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def licence_metadata(files: dict[str, Path]) -> dict:
    """The card's ``license`` from licence files, for a parent whose card names none: the model's
    licence file (a name with "model", else LICENSE/LICENCE itself, else the first licence file).
    Apache-2.0 and MIT are recognised from the text; anything else is ``other`` with a
    ``license_name`` from the file's title line (else its name) and a ``license_link`` to the file."""
    licences = sorted(n for n in files if n.lower().startswith(("license", "licence")))
    if not licences:
        return {}
    name = next((n for n in licences if "model" in n.lower()), None) or next(
        (n for n in licences if Path(n.lower()).stem in ("license", "licence")), licences[0])
    try:
        text = files[name].read_text(encoding="utf-8", errors="replace")[:200_000]
    except OSError:
        text = ""
    flat = " ".join(text.split())
    if "Apache License" in flat and "Version 2.0" in flat:
        return {"license": "apache-2.0"}
    if "Permission is hereby granted, free of charge" in flat and "MIT" in flat:
        return {"license": "mit"}
    title = next((line.strip(" #*") for line in text.splitlines() if line.strip(" #*")), "")
    label = _slug(title) if "licen" in title.lower() and len(title) <= 80 else _slug(Path(name).stem)
    return {"license": "other", "license_name": label or _slug(name), "license_link": name}


# ---- the output's config.json ---------------------------------------------------------------------

# keys the output takes from the parent as they are, whatever transformers' own serialisation says
_PARENT_KEYS = {"model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", "_commit_hash"}


def _config_dict(raw: dict, config_class) -> dict:
    """``raw`` as transformers' ``config_class`` reads it back, as a dict (every key, defaults included)."""
    # a deep copy: transformers standardises nested values (rope_scaling) in place
    config = config_class.from_dict(copy.deepcopy({k: v for k, v in raw.items() if k != "model_type"}))
    return {k: v for k, v in config.to_dict().items() if k not in _PARENT_KEYS}


def _aliases(config_class) -> dict[str, list[str]]:
    """canonical key -> the aliases a config.json may spell it with (``attribute_map``, ``torch_dtype``)."""
    out: dict[str, list[str]] = {"dtype": ["torch_dtype"]}
    for alias, canonical in (getattr(config_class, "attribute_map", None) or {}).items():
        out.setdefault(canonical, []).append(alias)
    return out


_ABSENT = object()


def _apply(out: dict, before: dict, after: dict, aliases: dict[str, list[str]]) -> None:
    """Put into ``out`` (the parent's raw config) every key whose value differs between ``before``
    and ``after``, in the spelling ``out`` already uses; a nested dict is changed key by key."""
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key, _ABSENT), after.get(key, _ABSENT)
        if old == new:
            continue
        spelled = next((k for k in [key, *aliases.get(key, [])] if k in out), key)
        if new is _ABSENT:
            out.pop(spelled, None)
        elif isinstance(old, dict) and isinstance(new, dict) and isinstance(out.get(spelled), dict):
            _apply(out[spelled], old, new, {})
        else:
            out[spelled] = copy.deepcopy(new)


def parent_config_with(parent: dict, written: dict, config_class, missing: set[str]) -> dict:
    """The parent's config.json (``parent``) with what pruning changed: every key whose value
    differs between the parent and ``written`` (transformers' config.json of the output), both read
    by ``config_class``; its ``auto_map`` without the entries whose files the parent lacks. Checked:
    it reads back as ``written`` does (else exit 3, naming the keys)."""
    out = copy.deepcopy(parent)
    after = _config_dict(written, config_class)
    _apply(out, _config_dict(parent, config_class), after, _aliases(config_class))
    if "auto_map" in out and missing:
        out["auto_map"] = without_missing(out["auto_map"], missing)
        if not out["auto_map"]:
            del out["auto_map"]
    back = _config_dict(out, config_class)
    differ = sorted(k for k in set(back) | set(after) if back.get(k, _ABSENT) != after.get(k, _ABSENT))
    if differ:
        raise CheckpointCheckError(f"config.json written in the parent's own form does not read back as the pruned "
                                   f"model's config: {', '.join(differ[:8])} differ")
    return out


# ---- what is carried ------------------------------------------------------------------------------

@dataclass
class Carried:
    """The parent's files that the output keeps (see the module doc), and how its config was read."""

    code: dict[str, Path] = field(default_factory=dict)  # auto_map's files (config.json's and the tokenizer's)
    licences: dict[str, Path] = field(default_factory=dict)
    tokenizer: dict[str, Path] = field(default_factory=dict)  # a tokenizer with an auto_map: its own files
    parent_config: dict | None = None  # written back with pruning's changes (parent_config_with)
    config_class: type | None = None  # transformers' class that reads parent_config
    missing: list[str] = field(default_factory=list)  # auto_map entries whose file the parent lacks (dropped)
    elsewhere: list[str] = field(default_factory=list)  # auto_map entries naming another repo's code (kept)
    native: Native | None = None
    remote_tokenizer: str | None = None  # the repo's tokenizer class that was run (--trust-remote-code)

    def write(self, folder: Path) -> None:
        """Copy the files into ``folder`` and, where the parent's config is kept, rewrite its
        config.json (already written by the checkpoint writer) as the parent's with the changes."""
        for name, path in {**self.tokenizer, **self.code, **self.licences}.items():
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        config = folder / "config.json"
        if self.parent_config is not None and config.is_file():
            written = json.loads(config.read_text(encoding="utf-8"))
            out = parent_config_with(self.parent_config, written, self.config_class, set(self.missing))
            config.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")  # the parent's key order

    def entries(self) -> dict:
        """The report's ``model`` entries: ``carried`` (``report``) and, for a model_type transformers
        lacks, ``loaded_as`` (the native class used, and why)."""
        out = {"carried": self.report()}
        if self.native is not None:
            out["loaded_as"] = self.native.as_dict()
        return out

    def report(self) -> dict:
        """The files carried, by kind, and the auto_map entries not carried."""
        out = {"code": sorted(self.code), "licences": sorted(self.licences), "tokenizer": sorted(self.tokenizer)}
        if self.licences:
            out["card_licence"] = licence_metadata(self.licences)
        if self.missing:
            out["auto_map_dropped"] = self.missing
        if self.elsewhere:
            out["auto_map_other_repos"] = self.elsewhere
        if self.remote_tokenizer:
            out["remote_tokenizer"] = self.remote_tokenizer
        return out


def carried(model_id: str, config, native: Native | None, tokenizer=None) -> Carried:
    """What the output of ``model_id`` (its config read as ``config``) keeps from it."""
    if model_id.startswith("builtin:"):
        return Carried()
    raw, tokenizer_config = raw_json(model_id, "config.json"), raw_json(model_id, "tokenizer_config.json")
    refs = config_refs(raw) + auto_map_refs(tokenizer_config.get("auto_map"))
    code, missing, elsewhere = code_files(model_id, refs)
    carry = Carried(code=code, licences=licence_files(model_id), missing=missing, elsewhere=elsewhere, native=native)
    if tokenizer_config.get("auto_map") is not None:
        names = set(TOKENIZER_FILES) | set((getattr(type(tokenizer), "vocab_files_names", None) or {}).values())
        carry.tokenizer = {n: p for n in sorted(names) if isinstance(n, str)
                           for p in [source_file(model_id, n)] if p is not None}
        if type(tokenizer).__module__.startswith("transformers_modules"):
            carry.remote_tokenizer = tokenizer_ref(tokenizer_config)
    keep_parent = native is not None or "auto_map" in raw
    if keep_parent and not type(config).__module__.startswith("transformers_modules"):
        carry.parent_config, carry.config_class = raw, type(config)
    if missing:
        log.warning("%s: auto_map names %s, whose files it lacks; the output's auto_map leaves them out", model_id,
                    ", ".join(missing))
    return carry

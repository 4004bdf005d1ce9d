"""Repos as the Hub ships them: remote code (auto_map), a model_type transformers lacks (Kimi-K2),
a tokenizer that is the repo's own code, licence files (repo.py).

Tiny deepseek_v3 folders, laid out like DeepSeek-V3 and Kimi-K2: config.json's auto_map names
configuration_deepseek.py / modeling_deepseek.py (written here: subclasses of transformers' own
classes, so trust_remote_code=True really imports and runs them), licence files beside the weights.
Every piece of repo code here appends to a marker file when it runs, so a test can tell whether
uncurl ran it. Anything that runs repo code runs in a subprocess with its own HF_MODULES_CACHE
(transformers copies the code there), never in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from uncurl.cli import app
from uncurl.load import build_tiny
from uncurl.repo import auto_map_refs, licence_metadata, module_file, native_of, without_missing

FAST = ["--samples", "12", "--max-length", "64", "--no-plots"]
ROOT = Path(__file__).resolve().parents[1]
PROMPT = "[y/N]"  # transformers' question, "Do you wish to run the custom code? [y/N]"

MIT = ("MIT License\n\nCopyright (c) 2023 DeepSeek\n\nPermission is hereby granted, free of charge, to any person "
       "obtaining a copy\nof this software ...\n")
MODEL_LICENCE = "DEEPSEEK LICENSE AGREEMENT\n\nVersion 1.0, 23 October 2023\n\nCopyright (c) 2023 DeepSeek\n..."
LICENCES = {"LICENSE-CODE": MIT, "LICENSE-MODEL": MODEL_LICENCE, "USE_POLICY.md": "# Acceptable use\n",
            "Notice.txt": "third-party notices\n"}

MARK = textwrap.dedent("""\
    import os as _os
    def _mark(what):
        path = _os.environ.get("UNCURL_TEST_MARKER")
        if path:
            with open(path, "a") as f:
                f.write(what + "\\n")
    """)
CODE = {
    "configuration_deepseek.py": MARK + textwrap.dedent("""\
        from transformers import DeepseekV3Config as _Base
        _mark("configuration_deepseek")
        class DeepseekV3Config(_Base):  # the repo's own class; transformers' weight conversions go by its model_type
            pass
        """),
    "modeling_deepseek.py": MARK + textwrap.dedent("""\
        from transformers import DeepseekV3ForCausalLM as _Causal, DeepseekV3Model as _Model
        from transformers.conversion_mapping import (get_checkpoint_conversion_mapping,
                                                     register_checkpoint_conversion_mapping)
        from .configuration_deepseek import DeepseekV3Config
        from .deepseek_helpers import NAME
        _mark("modeling_deepseek " + NAME)
        # the real repo's classes hold one module per expert, as the checkpoint stores them; these subclass
        # transformers' fused ones, so they register transformers' own per-expert conversion for their type
        register_checkpoint_conversion_mapping("kimi_k2", get_checkpoint_conversion_mapping("deepseek_v3"),
                                               overwrite=True)
        class DeepseekV3Model(_Model):
            config_class = DeepseekV3Config
        class DeepseekV3ForCausalLM(_Causal):
            config_class = DeepseekV3Config
        """),
    "deepseek_helpers.py": 'NAME = "helpers"\n',  # imported relatively only: carried all the same
    "tokenization_kimi.py": MARK + textwrap.dedent("""\
        from transformers import PreTrainedTokenizerFast
        class TikTokenTokenizer(PreTrainedTokenizerFast):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                _mark("tokenization_kimi")
        """),
}
AUTO_MAP = {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
            "AutoModel": "modeling_deepseek.DeepseekV3Model",
            "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 32.0, "beta_slow": 1.0,
        "mscale": 1.0, "mscale_all_dim": 1.0}


@pytest.fixture(scope="module")
def tiny_deepseek(tmp_path_factory):
    """A saved tiny deepseek_v3 (the weights every twin below shares)."""
    path = tmp_path_factory.mktemp("remote") / "deepseek_v3"
    model, tok = build_tiny("deepseek_v3", seed=0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def repo(tmp_path: Path, base: Path, name: str, *, model_type: str = "kimi_k2", remote_tokenizer: bool = False,
         auto_map: dict | None = None, card: str | None = None) -> Path:
    """A copy of ``base`` laid out as a Hub repo: the config as the real repo spells it (legacy
    rope_scaling and torch_dtype, auto_map), the code files, licence files and a file that is none."""
    folder = tmp_path / name
    folder.mkdir()
    for f in base.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config.pop("rope_parameters", None)
    config.update(model_type=model_type, auto_map=auto_map or AUTO_MAP, rope_theta=50000.0, rope_scaling=YARN,
                  torch_dtype=config.pop("dtype"), topk_method="noaux_tc", scoring_func="sigmoid",
                  num_nextn_predict_layers=0)  # as Kimi-K2 ships it; these copies hold no MTP tensors (test_mtp.py)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for file, text in {**CODE, **LICENCES, "extra_notes.txt": "not a licence\n"}.items():
        (folder / file).write_text(text)
    if remote_tokenizer:
        tc = json.loads((folder / "tokenizer_config.json").read_text())
        tc.update(tokenizer_class="TikTokenTokenizer", auto_map={"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer",
                                                                                   None]})
        (folder / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    if card is not None:
        (folder / "README.md").write_text(card)
    return folder


def cli(args, tmp_path: Path, stdin: str | None = None):
    """``python -m uncurl ARGS`` in a fresh process; ``stdin``: text piped in (None: /dev/null)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "UNCURL_TEST_MARKER": str(tmp_path / "ran.txt")}
    return subprocess.run([sys.executable, "-m", "uncurl", *map(str, args)], input=stdin, capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=600,
                          **({} if stdin is not None else {"stdin": subprocess.DEVNULL}))


def ran(tmp_path: Path) -> list[str]:
    """What repo code ran (the marker file's lines)."""
    marker = tmp_path / "ran.txt"
    return marker.read_text().split() if marker.exists() else []


def python(script: str, tmp_path: Path) -> dict:
    """Run ``script`` (which prints one JSON line last) in a fresh process; its result."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "UNCURL_TEST_MARKER": str(tmp_path / "ran-check.txt")}
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, env=env,
                         stdin=subprocess.DEVNULL, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def same_bytes(src: Path, out: Path, names) -> None:
    for name in names:
        assert (out / name).read_bytes() == (src / name).read_bytes(), name


REMOTE_LOAD = """
    import json, sys
    from transformers import AutoConfig, AutoModelForCausalLM
    out = {}
    for name in %r:
        model, info = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=True, output_loading_info=True)
        config = AutoConfig.from_pretrained(name, trust_remote_code=True)
        out[name] = {"classes": [type(model).__module__.split(".")[0], type(config).__module__.split(".")[0]],
                     "experts": config.n_routed_experts, "rope": model.config.rope_parameters.get("rope_type"),
                     "info": {k: sorted(map(str, v)) for k, v in info.items()}}
    print(json.dumps(out))
"""
# no repo code in this process: the config as uncurl reads it (repo.read_config), transformers' own class
NATIVE_LOAD = """
    import json
    from transformers import DeepseekV3ForCausalLM
    from uncurl.repo import read_config
    out = {}
    for name in %r:
        config, native = read_config(name)
        model, info = DeepseekV3ForCausalLM.from_pretrained(name, config=config, output_loading_info=True)
        out[name] = {"classes": [type(model).__module__.split(".")[0], type(config).__module__.split(".")[0]],
                     "experts": config.n_routed_experts, "rope": model.config.rope_parameters.get("rope_type"),
                     "info": {k: sorted(map(str, v)) for k, v in info.items()}}
    print(json.dumps(out))
"""


def test_kimi_prunes_natively_with_no_prompt_and_keeps_its_files(tmp_path, tiny_deepseek, data_dir):
    """Kimi-K2's layout (model_type kimi_k2, architectures DeepseekV3ForCausalLM, remote code) prunes
    natively without --trust-remote-code, with 'y' waiting on stdin for a prompt that must not come:
    no repo code runs, the code and licence files are copied byte for byte, config.json is the
    parent's own with the expert count changed, and it loads both ways as the parent does."""
    src = repo(tmp_path, tiny_deepseek, "Kimi-K2-Instruct")
    out = tmp_path / "k4"
    res = cli(["prune", "--model", src, "--keep", 4, "--data-dir", data_dir, "--out", out, *FAST], tmp_path,
              stdin="y\ny\ny\n")
    assert res.returncode == 0, res.stderr[-3000:]
    assert PROMPT not in res.stdout + res.stderr and "custom code" not in res.stdout + res.stderr
    assert ran(tmp_path) == []  # no repo code ran, 'y' on stdin notwithstanding
    model_code = [n for n in CODE if n != "tokenization_kimi.py"]
    same_bytes(src, out, [*model_code, *LICENCES])  # deepseek_helpers.py: a relative import of modeling_deepseek.py
    assert not (out / "extra_notes.txt").exists() and not (out / "tokenization_kimi.py").exists()  # named by nothing
    parent, config = json.loads((src / "config.json").read_text()), json.loads((out / "config.json").read_text())
    assert config["model_type"] == "kimi_k2" and config["auto_map"] == AUTO_MAP
    assert config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert config["rope_scaling"] == YARN and "rope_parameters" not in config and "dtype" not in config
    changed = {k for k in parent if parent[k] != config.get(k)} | (set(config) - set(parent))
    assert changed == {"n_routed_experts"} and config["n_routed_experts"] == 4
    assert list(config) == list(parent)  # the parent's own key order
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["model"]["loaded_as"]["model_type"] == "kimi_k2"
    assert report["model"]["loaded_as"]["class"] == "DeepseekV3ForCausalLM"
    assert "no code from the repo runs" in report["model"]["loaded_as"]["why"]
    carried = report["model"]["carried"]
    assert carried["code"] == sorted(model_code)
    assert carried["licences"] == sorted(LICENCES)
    text = (out / "report" / "report.md").read_text()
    assert "Loaded as DeepseekV3ForCausalLM" in text and all(f"`{name}`" in text for name in [*model_code, *LICENCES])
    # loads as the parent does: with its (copied) code, and natively; both with every tensor in place
    for script, where in ((REMOTE_LOAD, "transformers_modules"), (NATIVE_LOAD, "transformers")):
        loads = python(script % [str(src), str(out)], tmp_path)
        for name, expected in ((str(src), 8), (str(out), 4)):
            got = loads[name]
            assert got["classes"] == [where, where] and got["experts"] == expected and got["rope"] == "yarn"
            info = got["info"]
            assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info


def test_remote_tokenizer_needs_the_flag_before_the_expensive_pass(tmp_path, tiny_deepseek, data_dir):
    """Kimi-K2's tokenizer is the repo's code: without --trust-remote-code, exit 2 naming the flag
    before any weight is read, with stdin closed, nothing written, and none of the repo's code run."""
    src = repo(tmp_path, tiny_deepseek, "Kimi-K2-Instruct", remote_tokenizer=True)
    out = tmp_path / "k4"
    res = cli(["prune", "--model", src, "--keep", 4, "--data-dir", data_dir, "--out", out, *FAST], tmp_path)
    assert res.returncode == 2, res.stderr[-3000:]
    message = " ".join(res.stderr.split())
    assert "--trust-remote-code" in message and "tokenization_kimi" in message, message
    assert PROMPT not in res.stdout + res.stderr
    assert ran(tmp_path) == [] and not out.exists()


def test_remote_tokenizer_runs_with_the_flag_and_is_carried(tmp_path, tiny_deepseek, data_dir):
    """With --trust-remote-code the repo's tokenizer class is the one used (its code ran), the model
    still loads natively, and the output keeps the tokenizer's files and code as they are."""
    src = repo(tmp_path, tiny_deepseek, "Kimi-K2-Instruct", remote_tokenizer=True)
    out = tmp_path / "k4"
    res = cli(["prune", "--model", src, "--keep", 4, "--data-dir", data_dir, "--out", out, "--trust-remote-code",
               *FAST], tmp_path, stdin="n\n")
    assert res.returncode == 0, res.stderr[-3000:]
    assert PROMPT not in res.stdout + res.stderr
    assert ran(tmp_path) and set(ran(tmp_path)) == {"tokenization_kimi"}  # the tokenizer's code only: not the model's
    same_bytes(src, out, [*CODE, *LICENCES, "tokenizer_config.json", "tokenizer.json"])
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["model"]["carried"]["remote_tokenizer"] == "tokenization_kimi.TikTokenTokenizer"
    assert "tokenization_kimi.py" in report["model"]["carried"]["code"]
    assert report["model"]["loaded_as"]["native_type"] == "deepseek_v3"
    check = python(f"""
        import json
        from transformers import AutoTokenizer
        a = AutoTokenizer.from_pretrained({str(src)!r}, trust_remote_code=True)
        b = AutoTokenizer.from_pretrained({str(out)!r}, trust_remote_code=True)
        text = "uncurl keeps the tokenizer."
        print(json.dumps({{"classes": [type(a).__name__, type(b).__name__], "same": a(text)["input_ids"] == b(text)["input_ids"]}}))
    """, tmp_path)
    assert check == {"classes": ["TikTokenTokenizer", "TikTokenTokenizer"], "same": True}


def test_deepseek_v3_layout_keeps_code_licences_and_card_licence(tmp_path, tiny_deepseek, data_dir):
    """DeepSeek-V3's layout (model_type deepseek_v3, which transformers has, plus auto_map): loaded
    natively; the code files and the licence files are carried; an auto_map entry whose file the
    repo lacks is dropped, one naming another repo's code kept; the card's license is the parent card's."""
    auto_map = {**AUTO_MAP, "AutoModelForSequenceClassification": "modeling_absent.Classifier",
                "AutoModelForTokenClassification": "other-org/other-repo--modeling_other.Tagger"}
    card = "---\nlicense: mit\nlanguage:\n- en\n---\n# DeepSeek-V3\n"
    src = repo(tmp_path, tiny_deepseek, "DeepSeek-V3", model_type="deepseek_v3", auto_map=auto_map, card=card)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    out = tmp_path / "k4"
    res = CliRunner().invoke(app, ["prune", "--model", str(src), "--keep", "4", "--data-dir", str(data_dir),
                                   "--out", str(out), *FAST])
    assert res.exit_code == 0, res.output
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before  # the input untouched
    same_bytes(src, out, [n for n in CODE if n != "tokenization_kimi.py"] + list(LICENCES))
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["n_routed_experts"] == 4
    expected = {k: v for k, v in auto_map.items() if k != "AutoModelForSequenceClassification"}
    assert config["auto_map"] == expected
    assert config["rope_scaling"] == YARN
    report = json.loads((out / "report" / "report.json").read_text())
    assert "loaded_as" not in report["model"]
    assert report["model"]["carried"]["auto_map_dropped"] == ["modeling_absent.Classifier"]
    assert report["model"]["carried"]["auto_map_other_repos"] == ["other-org/other-repo--modeling_other.Tagger"]
    from huggingface_hub import ModelCard

    meta = ModelCard((out / "README.md").read_text()).data.to_dict()
    assert meta["license"] == "mit" and "license_name" not in meta  # the parent card's, not the files'
    from transformers import AutoModelForCausalLM

    _, info = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


def test_card_licence_from_the_files_when_the_parent_card_has_none(tmp_path, tiny_deepseek, data_dir):
    """No parent card: the card's license comes from the licence files (the model's: LICENSE-MODEL,
    not the code's), as `other` with a name from its title and a link to the file in the output."""
    src = repo(tmp_path, tiny_deepseek, "DeepSeek-V3", model_type="deepseek_v3")
    out = tmp_path / "k4"
    res = CliRunner().invoke(app, ["prune", "--model", str(src), "--keep", "4", "--data-dir", str(data_dir),
                                   "--out", str(out), "--method", "frequency", "--merge", "select", *FAST])
    assert res.exit_code == 0, res.output
    from huggingface_hub import ModelCard

    meta = ModelCard((out / "README.md").read_text()).data.to_dict()
    assert meta["license"] == "other" and meta["license_name"] == "deepseek-license-agreement"
    assert meta["license_link"] == "LICENSE-MODEL" and (out / meta["license_link"]).read_text() == MODEL_LICENCE


@pytest.mark.parametrize(("files", "expected"), [
    ({"LICENSE": "Apache License\nVersion 2.0, January 2004\nhttp://www.apache.org/licenses/\n"},
     {"license": "apache-2.0"}),
    ({"LICENSE.md": MIT}, {"license": "mit"}),
    ({"LICENSE-CODE": MIT, "LICENSE-MODEL": MODEL_LICENCE},
     {"license": "other", "license_name": "deepseek-license-agreement", "license_link": "LICENSE-MODEL"}),
    ({"LICENSE": "LLAMA 4 COMMUNITY LICENSE AGREEMENT\nLlama 4 Version Effective Date: April 5, 2025\n",
      "USE_POLICY.md": "Llama 4 Acceptable Use Policy\n"},
     {"license": "other", "license_name": "llama-4-community-license-agreement", "license_link": "LICENSE"}),
    ({"licence.txt": "Some terms.\n"}, {"license": "other", "license_name": "licence", "license_link": "licence.txt"}),
    ({"NOTICE": "notices\n", "USE_POLICY.md": "policy\n"}, {}),  # no licence among them: no card license
])
def test_licence_metadata(tmp_path, files, expected):
    paths = {}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        paths[name] = tmp_path / name
    assert licence_metadata(paths) == expected


def test_auto_map_references():
    """auto_map values as the Hub spells them: "file.Class", [slow, fast] lists with None, another repo's."""
    auto_map = {"AutoConfig": "configuration_x.XConfig", "AutoTokenizer": ["tokenization_x.XTokenizer", None],
                "AutoModel": "org/repo--modeling_x.XModel"}
    assert auto_map_refs(auto_map) == ["configuration_x.XConfig", "tokenization_x.XTokenizer", "org/repo--modeling_x.XModel"]
    assert auto_map_refs(["tokenization_x.Slow", "tokenization_x.Fast"]) == ["tokenization_x.Slow", "tokenization_x.Fast"]
    assert module_file("configuration_x.XConfig") == "configuration_x.py"
    assert module_file("pkg.modeling_x.XModel") == "pkg/modeling_x.py"
    assert module_file("org/repo--modeling_x.XModel") is None
    assert without_missing(auto_map, {"tokenization_x.XTokenizer"}) == {
        "AutoConfig": "configuration_x.XConfig", "AutoModel": "org/repo--modeling_x.XModel"}
    assert without_missing({"AutoTokenizer": ["a.Slow", "b.Fast"]}, {"a.Slow"}) == {"AutoTokenizer": [None, "b.Fast"]}


def test_native_class_by_architectures():
    """A model_type transformers lacks loads with the class of its first architecture it has."""
    kimi = native_of({"model_type": "kimi_k2", "architectures": ["NoSuchForCausalLM", "DeepseekV3ForCausalLM"]})
    assert (kimi.model_type, kimi.native_type, kimi.architecture) == ("kimi_k2", "deepseek_v3", "DeepseekV3ForCausalLM")
    assert native_of({"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"]}) is None  # its own
    assert native_of({"model_type": "foo_moe", "architectures": ["FooMoeForCausalLM"]}) is None


def test_model_only_remote_needs_the_flag(tmp_path, tiny_deepseek, data_dir):
    """A model_type and architectures transformers lacks: `uncurl eval` exits 2 naming the flag without
    it (no prompt, no code run); with it the repo's classes load and evaluate; pruning it still
    needs a family in uncurl's table."""
    src = repo(tmp_path, tiny_deepseek, "foo-moe", model_type="foo_moe")
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = ["FooMoeForCausalLM"]
    (src / "config.json").write_text(json.dumps(config))
    (src / "modeling_deepseek.py").write_text(CODE["modeling_deepseek.py"].replace('"kimi_k2"', '"foo_moe"'))
    args = ["eval", "--model", src, "--data-dir", data_dir, "--limit", 4, "--max-length", 64]
    refused = cli(args, tmp_path, stdin="y\n")
    assert refused.returncode == 2, refused.stderr[-3000:]
    message = " ".join(refused.stderr.split())
    assert "--trust-remote-code" in message and "foo_moe" in message and "modeling_deepseek.py" in message
    assert PROMPT not in refused.stdout + refused.stderr and ran(tmp_path) == []
    trusted = cli([*args, "--trust-remote-code", "--json"], tmp_path)
    assert trusted.returncode == 0, trusted.stderr[-3000:]
    assert "acc" in json.loads(trusted.stdout[trusted.stdout.index("{"):])
    assert "configuration_deepseek" in ran(tmp_path) and "modeling_deepseek" in ran(tmp_path)
    pruned = cli(["prune", "--model", src, "--keep", 4, "--data-dir", data_dir, "--out", tmp_path / "k4",
                  "--trust-remote-code", *FAST], tmp_path)
    assert pruned.returncode == 2 and "'foo_moe' is not supported" in " ".join(pruned.stderr.split()), pruned.stderr


def test_fp8_kimi_keeps_its_format_config_and_files(tmp_path, tiny_deepseek, data_dir):
    """Kimi-K2 as shipped is FP8 (block-scaled): pruned natively and written back in its format, with
    config.json the parent's (model_type kimi_k2, its quantization_config) and the files carried."""
    import re

    import torch
    from safetensors.torch import save_file
    from test_quant import blockwise_fp8, read_all

    src = repo(tmp_path, tiny_deepseek, "Kimi-K2-Instruct")
    block = [8, 8]
    tensors = {}
    for name, t in read_all(src).items():
        if re.search(r"\.(experts\.\d+\.\w+|self_attn\.\w+|mlp\.\w+_proj)\.weight$", name) and t.dim() == 2:
            tensors[name], tensors[name.removesuffix("weight") + "weight_scale_inv"] = blockwise_fp8(t, block)
        else:
            tensors[name] = t
    assert any(t.dtype == torch.float8_e4m3fn for t in tensors.values())
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": block}
    (src / "config.json").write_text(json.dumps(config, indent=2))
    out = tmp_path / "k4"
    res = CliRunner().invoke(app, ["prune", "--model", str(src), "--keep", "4", "--data-dir", str(data_dir),
                                   "--out", str(out), "--method", "reap", "--merge", "select", *FAST])
    assert res.exit_code == 0, res.output
    written = json.loads((out / "config.json").read_text())
    assert {k for k in config if config[k] != written.get(k)} | (set(written) - set(config)) == {"n_routed_experts"}
    assert written["model_type"] == "kimi_k2" and written["quantization_config"] == config["quantization_config"]
    same_bytes(src, out, [n for n in CODE if n != "tokenization_kimi.py"] + list(LICENCES))
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["model"]["format"] == report["model"]["format_before"] != "bfloat16"
    stored = read_all(out)
    assert {t.dtype for n, t in stored.items() if ".experts." in n and n.endswith(".weight")} == {torch.float8_e4m3fn}

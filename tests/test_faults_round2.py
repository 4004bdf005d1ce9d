"""Faults, round 2 (issue 30): every bad input ends in one line with exit 2 naming the file, field or
value and what is accepted, before the expensive work where it can be known; no command replaces or
modifies one of its inputs; nothing is written outside --out (nor left beside it).

The seeded generators below (templates, config values) stand in for a hypothesis search without a
new dependency: each case is checked against an independent truth (Python's own ``str.format``, the
JSON type of the value), and a failing case prints its seed and value.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from conftest import digest, leftovers, refused
from typer.testing import CliRunner

from uncurl import output, pipeline
from uncurl import tasks as T
from uncurl.adapters import ADAPTERS, tiny_config
from uncurl.cli import app
from uncurl.errors import UncurlError

from conftest import FAMILIES

runner = CliRunner()
FAST = ["--samples", "12", "--max-length", "64"]
PRUNE = [*FAST, "--no-plots"]
ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the model is loaded or profiled: the refusal must come first."""

    def forbidden(*a, **k):
        raise AssertionError("loaded or profiled before refusing")

    monkeypatch.setattr(pipeline, "load_model", forbidden)
    monkeypatch.setattr(pipeline, "profile_model", forbidden)


# --- 1. task files that are not UTF-8 ---------------------------------------------------------------


ROWS = [{"q": f"question {i}", "label": "yes" if i % 2 else "no", "n": i, "opts": ["a", "b"]} for i in range(8)]


def _jsonl(path: Path, rows=ROWS) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("where", ["jsonl", "csv", "data-dir", "task-file", "eval-file"])
def test_a_task_file_that_is_not_utf8_names_the_file_and_line(where, tmp_path, data_dir, no_work):
    latin1 = "café, naïve".encode("latin-1")  # what a spreadsheet saved in another encoding gives
    args, bad, line = ["--template", "{q}", "--choices", "yes,no"], None, 3
    if where in ("jsonl", "eval-file"):
        bad = tmp_path / "rows.jsonl"
        lines = [json.dumps(r).encode() for r in ROWS]
        lines[2] = b'{"q": "' + latin1 + b'", "label": "yes"}'
        bad.write_bytes(b"\n".join(lines) + b"\n")
        task = bad if where == "jsonl" else _jsonl(tmp_path / "good.jsonl")
        args = ["--task", task, *args] + (["--eval-file", bad, "--eval"] if where == "eval-file" else [])
    elif where == "csv":
        bad = tmp_path / "rows.csv"
        bad.write_bytes(b"q,label\nfirst,yes\n" + latin1.replace(b",", b";") + b",no\nthird,yes\nfourth,no\n")
        args = ["--task", bad, *args]
    elif where == "data-dir":
        shutil.copytree(data_dir / "superglue" / "rte", tmp_path / "data" / "superglue" / "rte")
        bad = tmp_path / "data" / "superglue" / "rte" / "train.jsonl"
        lines = bad.read_bytes().split(b"\n")
        lines[2] = lines[2].replace(b'"premise": "', b'"premise": "' + latin1, 1)
        bad.write_bytes(b"\n".join(lines))
        args = ["--data-dir", tmp_path / "data"]
    else:
        _jsonl(tmp_path / "rows.jsonl")
        bad, line = tmp_path / "task.yaml", 1
        bad.write_bytes(b"template: '" + latin1 + b" {q}'\nchoices: [yes, no]\nfile: rows.jsonl\n")
        args = ["--task", bad]
    before, out = digest(bad), tmp_path / "out"
    refused(run("prune", *args, "--out", out, *PRUNE), out, str(bad), f"line {line}", "not UTF-8",
            "save the file as UTF-8")
    assert digest(bad) == before


def test_a_routes_file_that_is_not_utf8_is_named(tmp_path, no_work, monkeypatch):
    from uncurl import load

    monkeypatch.setattr(load, "load_model", lambda *a, **k: pytest.fail("loaded before refusing"))
    bad = tmp_path / "inputs.jsonl"
    bad.write_bytes(b'"hello"\n"caf\xe9"\n')
    out = tmp_path / "out"
    refused(run("routes", "--file", bad, "--out", out, "--no-plots"), out, str(bad), "line 2", "not UTF-8")


# --- 2. templates that fail only when formatted ---------------------------------------------------


@pytest.mark.parametrize("template, needles", [
    ("{q!z}", ["{q!z}", "!z", "accepted: !r, !s, !a"]),  # a bad conversion
    ("{q.upper}", ["{q.upper}", "reads an attribute (.upper)"]),  # attribute access (printed a method's repr)
    ("{q.__class__.__name__}", ["reads an attribute"]),
    ("{q[40]}", ["{q[40]}", "IndexError", "q = 'question"]),  # an index out of range
    ("{opts[5]}", ["{opts[5]}", "IndexError"]),
    ("{q[a]}", ["{q[a]}", "TypeError"]),
    ("{q:d}", ["{q:d}", "format code 'd'", "q = 'question"]),  # a format spec for another type
    ("{n:s}", ["{n:s}", "format code 's'", "n = "]),
    ("{q:>>>}", ["{q:>>>}", "ValueError"]),
    ("{n:,.2q}", ["{n:,.2q}"]),
])
@pytest.mark.parametrize("command", ["prune", "eval"])
def test_a_template_that_fails_when_formatted_is_refused_before_the_work(template, needles, command, tmp_path,
                                                                         no_work, monkeypatch):
    monkeypatch.setattr("uncurl.load.load_model", lambda *a, **k: pytest.fail("loaded before refusing"))  # eval's
    task, out = _jsonl(tmp_path / "rows.jsonl"), tmp_path / "out"
    extra = ["--out", out, *PRUNE] if command == "prune" else ["--limit", 4]
    refused(run(command, "--task", task, "--template", template, "--choices", "yes,no", *extra),
            out if command == "prune" else None, *needles)


def _random_template(rng: random.Random) -> str:
    names = ["q", "n", "opts", "label", "missing"]
    parts = []
    for _ in range(rng.randint(1, 3)):
        field = rng.choice(names) + rng.choice(["", "", "[0]", "[1]", "[9]", "[x]", ".real", ".upper"])
        conv = rng.choice(["", "", "!r", "!s", "!a", "!z", "!"])
        spec = rng.choice(["", "", ">8", "d", "s", ".2f", "x", "^5", "=+4", ">>>", "{q}"])
        parts.append(rng.choice(["", "Q: ", "\n"]) + "{" + field + conv + (":" + spec if spec else "") + "}")
    return "".join(parts) + rng.choice(["", " {", " }", " {{}}"])


def test_seeded_templates_either_match_python_or_are_refused_in_one_line(tmp_path):
    """300 seeded random templates over real rows: each one gives exactly Python's own str.format of
    every row, or an UncurlError (never another exception); attribute access and bad conversions
    are always refused, even where Python would format them."""
    import string

    rows = ROWS
    task_file = _jsonl(tmp_path / "rows.jsonl", rows)
    for seed in range(300):
        template = _random_template(random.Random(seed))
        try:
            expected = [template.format(**r) for r in rows]
        except Exception:  # noqa: BLE001 - Python itself refuses some row: uncurl must refuse it
            expected = None
        try:  # what uncurl refuses though Python may format it: an attribute read, a conversion but r, s, a
            parsed = [(f, c) for _, f, _, c in string.Formatter().parse(template) if f is not None]
        except ValueError:
            parsed = []
        attribute = any("." in f or c not in (None, "r", "s", "a") for f, c in parsed)
        try:
            task = T.custom_task(task_file, template, ["yes", "no"], "label")
            got = [e.prompt for split in T.SPLITS for e in T.load_examples(task, split)]
        except UncurlError as err:
            assert "template" in str(err), (seed, template, err)  # it names the template (or its field)
            assert expected is None or attribute, (seed, template, err)
            continue
        assert expected is not None and not attribute, (seed, template)
        halves = T.halves(list(range(len(rows))), "calibration") + T.halves(list(range(len(rows))), "evaluation")
        assert got == [expected[i] for i in halves], (seed, template)


# --- 3. config.json values of the wrong type or sign ------------------------------------------------


def _keys(family: str, config: dict) -> tuple[dict, dict[str, str]]:
    """The dict holding ``family``'s MoE keys in a saved config.json (a wrapper's text_config) and
    each key as it is spelled there (the adapter's key, or transformers' alias of it)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    adapter, cls = ADAPTERS[family], CONFIG_MAPPING[family]
    holder = config["text_config"] if isinstance(config.get("text_config"), dict) else config
    if holder is not config:
        cls = cls.sub_configs["text_config"]
    aliases = getattr(cls, "attribute_map", {}) or {}
    spelled = {}
    for role, key in (("experts", adapter.expert_count_key), ("top_k", adapter.top_k_key), ("hidden", "hidden_size")):
        spelled[role] = key if key in holder else aliases.get(key, key)
        assert spelled[role] in holder, (family, key, sorted(holder))
    return holder, spelled


def _config_folder(tmp_path: Path, family: str, change) -> Path:
    folder = tmp_path / f"cfg-{family}"
    folder.mkdir(exist_ok=True)
    config = json.loads(tiny_config(family).to_json_string())
    holder, spelled = _keys(family, config)
    change(holder, spelled)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


BAD_VALUES = [("experts", "8", '"8" (a string)'), ("experts", True, "true (a boolean)"),
              ("experts", 8.0, "8.0 (a number with a fraction)"), ("experts", -8, ": -8;"),
              ("top_k", 0, ": 0;"), ("top_k", "2", '"2" (a string)'), ("hidden", -64, ": -64;"),
              ("hidden", 64.5, "64.5 (a number with a fraction)"), ("hidden", None, "null")]


@pytest.mark.parametrize("family", FAMILIES)
def test_config_values_of_the_wrong_type_or_sign_are_named_on_every_family(family, tmp_path, data_dir, no_work):
    """One bad value of each kind per family, in a folder holding only config.json: refused naming
    the key as the file spells it, before the weights are looked for."""
    rng = random.Random(family)
    for role, value, said in rng.sample(BAD_VALUES, 3):
        def change(holder, spelled):
            holder[spelled[role]] = value

        folder, out = _config_folder(tmp_path, family, change), tmp_path / "out"
        _, spelled = _keys(family, json.loads(tiny_config(family).to_json_string()))
        line = refused(run("prune", "--model", folder, "--data-dir", data_dir, "--out", out, *PRUNE), out,
                       f"{folder / 'config.json'}", f"'{spelled[role]}'", "whole number >= 1",
                       absent=("--top-k",))
        assert said in line, (family, role, value, line)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen3_vl_moe", "deepseek_v3"])
def test_a_top_k_above_the_expert_count_names_both_keys(family, tmp_path, data_dir, no_work):
    """The config says top-k 12 over 8 experts: refused naming both keys, with --top-k or without
    (not "keep at least 12", not a torch error after loading)."""
    def change(holder, spelled):
        holder[spelled["experts"]], holder[spelled["top_k"]] = 8, 12

    folder, out = _config_folder(tmp_path, family, change), tmp_path / "out"
    _, spelled = _keys(family, json.loads(tiny_config(family).to_json_string()))
    for flag in ([], ["--top-k", "2"]):
        refused(run("prune", "--model", folder, *flag, "--data-dir", data_dir, "--out", out, *PRUNE), out,
                f"'{spelled['top_k']}': 12 above '{spelled['experts']}': 8", "1..8", absent=("keep at least",))


@pytest.mark.parametrize("command", ["eval", "cost"])
def test_config_values_are_checked_by_every_command_that_loads(command, tmp_path, tiny_dirs, data_dir):
    model = tmp_path / "m"
    shutil.copytree(tiny_dirs("mixtral"), model)
    config = json.loads((model / "config.json").read_text())
    config["num_local_experts"] = "8"
    (model / "config.json").write_text(json.dumps(config))
    extra = ["--data-dir", data_dir, "--limit", 2] if command == "eval" else []
    refused(run(command, "--model", model, *extra), None, "'num_local_experts'", '"8" (a string)')


def test_seeded_config_values_are_accepted_exactly_when_whole_and_positive(tmp_path):
    """200 seeded values (strings, booleans, floats, nulls, lists, zero, negatives, whole numbers)
    for each key of three families: ``check_config_values`` accepts a config exactly when every value
    is a JSON whole number >= 1 and top-k <= the expert count, and otherwise names the key."""
    from uncurl.load import check_config_values

    pool = ["8", "", "two", True, False, None, 0, -1, -8, 1, 2, 3, 8, 64, 2.0, 0.5, 1e3, [8], {"n": 8}]
    rng = random.Random(30)
    for i in range(200):
        family = rng.choice(["mixtral", "qwen3_moe", "olmoe"])
        values = {role: rng.choice(pool) for role in ("experts", "top_k", "hidden")}

        def change(holder, spelled):
            for role, value in values.items():
                holder[spelled[role]] = value

        folder = _config_folder(tmp_path, family, change)
        whole = {r: isinstance(v, int) and not isinstance(v, bool) and v >= 1 for r, v in values.items()}
        ok = all(whole.values()) and values["top_k"] <= values["experts"]
        try:
            check_config_values(folder)
        except UncurlError as err:
            assert not ok, (i, family, values, err)
            _, spelled = _keys(family, json.loads(tiny_config(family).to_json_string()))
            bad = [r for r, w in whole.items() if not w] or ["top_k"]
            assert any(f"'{spelled[r]}'" in str(err) for r in bad), (i, family, values, err)
            continue
        assert ok, (i, family, values)


def test_keep_below_the_models_top_k_names_the_config_key(tmp_path, data_dir):
    out = tmp_path / "out"
    refused(run("prune", "--keep", 1, "--data-dir", data_dir, "--out", out, *PRUNE), out,
            "--keep 1 is below the router's top-k (2, the config's num_experts_per_tok)")


# --- 4. generation_config.json and pickled weights ---------------------------------------------------


@pytest.mark.parametrize("body, needle", [("{nope", "is not valid JSON"), ("[1, 2]", "is not a JSON object"),
                                          ('"greedy"', "is not a JSON object"), ("", "is not valid JSON")])
@pytest.mark.parametrize("command", ["prune", "eval"])
def test_a_generation_config_that_is_not_a_json_object_is_named(body, needle, command, tmp_path, tiny_dirs,
                                                                 data_dir):
    model = tmp_path / "m"
    shutil.copytree(tiny_dirs("mixtral"), model)
    (model / "generation_config.json").write_text(body)
    before, out = digest(model), tmp_path / "out"
    extra = ["--out", out, *PRUNE] if command == "prune" else ["--limit", 2]
    refused(run(command, "--model", model, "--data-dir", data_dir, *extra), out if command == "prune" else None,
            str(model / "generation_config.json"), needle, "generation settings")
    assert digest(model) == before


class _Payload:
    """What a hostile pytorch_model.bin carries: a global that runs when unpickled."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/uncurl-pwned",))


@pytest.fixture(scope="module")
def pickled(tmp_path_factory, tiny_dirs):
    folder = tmp_path_factory.mktemp("pickled") / "m"
    shutil.copytree(tiny_dirs("mixtral"), folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save({**state, "payload": _Payload()}, folder / "pytorch_model.bin")
    return folder


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, tiny_dirs, data_dir):
    """A prune of a copy of the tiny Mixtral, then the copy removed: the report names a parent that is gone."""
    root = tmp_path_factory.mktemp("pruned")
    shutil.copytree(tiny_dirs("mixtral"), root / "parent")
    res = run("prune", "--model", root / "parent", "--data-dir", data_dir, "--out", root / "k6", "--keep", 6, *PRUNE)
    assert res.exit_code == 0, res.output
    shutil.rmtree(root / "parent")
    return root


@pytest.mark.parametrize("command", ["prune", "eval", "cost", "monitor"])
def test_weights_the_safe_loader_refuses_are_one_line_in_every_command(command, pickled, pruned, tmp_path, data_dir):
    Path("/tmp/uncurl-pwned").unlink(missing_ok=True)
    before, out = digest(pickled), tmp_path / "out"
    args = {"prune": ["prune", "--model", pickled, "--data-dir", data_dir, "--out", out, *PRUNE],
            "eval": ["eval", "--model", pickled, "--data-dir", data_dir, "--limit", 2],
            "cost": ["cost", "--model", pickled],
            "monitor": ["monitor", "--pruned", pruned / "k6", "--parent", pickled, "--task", "superglue-cb",
                        "--data-dir", data_dir, "--samples", 4, "--out", out, "--no-plots"]}[command]
    refused(run(*args), out, f"model {pickled}", "torch's safe loader refused", "pytorch_model.bin",
            "never runs code from a checkpoint")
    assert not Path("/tmp/uncurl-pwned").exists() and digest(pickled) == before


def test_monitor_names_the_parent_the_report_names_not_model(pruned, tmp_path, data_dir):
    out = tmp_path / "out"
    refused(run("monitor", "--pruned", pruned / "k6", "--task", "superglue-cb", "--data-dir", data_dir,
                "--samples", 4, "--out", out, "--no-plots"), out,
            f"the parent {pruned / 'parent'} (named in --pruned's report.json; pass --parent DIR if it moved): "
            f"no such folder", absent=("--model",))
    (pruned / "parent").write_text("not a folder")
    try:
        refused(run("monitor", "--pruned", pruned / "k6", "--task", "superglue-cb", "--data-dir", data_dir,
                    "--samples", 4, "--out", out, "--no-plots"), out, "is a file, not a model folder",
                absent=("--model",))
    finally:
        (pruned / "parent").unlink()


# --- 5. a damaged --profile ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def profile(tmp_path_factory, data_dir):
    path = tmp_path_factory.mktemp("profile") / "rte.profile"
    res = run("profile", "--model", "builtin:mixtral", "--data-dir", data_dir, "--out", path, *FAST)
    assert res.exit_code == 0, res.output
    return path


def _edited(profile: Path, folder: Path, header=None, tensors=None) -> Path:
    with safe_open(str(profile), "pt") as f:
        meta, state = json.loads(f.metadata()["uncurl"]), {k: f.get_tensor(k) for k in f.keys()}
    raw = header(meta) if header else None
    if tensors:
        tensors(state)
    path = folder / "edited.profile"
    save_file(state, str(path), metadata={"uncurl": raw if isinstance(raw, str) else json.dumps(meta)})
    return path


def _layer1(name: str) -> str:
    return f"model.layers.1.mlp/{name}"


def _fill(name, value):
    return lambda s: s.__setitem__(_layer1(name), torch.full_like(s[_layer1(name)], value))


@pytest.mark.parametrize("header, tensors, needles", [
    (lambda h: "[1, 2]", None, ["metadata is a JSON list, not an object"]),
    (lambda h: '"x"', None, ["metadata is a JSON string, not an object"]),
    (lambda h: h.update(schema="2"), None, ['schema "2" (a string, not a whole number)']),
    (lambda h: h.update(schema=2.0), None, ["schema 2.0 (a number, not a whole number)"]),
    (lambda h: h.update(layers=[1]), None, ["names no MoE layers"]),
    (lambda h: h.update(task="superglue-rte"), None, ["'task' record", "not an object"]),
    (lambda h: h["layers"]["model.layers.1.mlp"].update(tokens="many"), None, ["lacks a whole index and token count"]),
    (None, _fill("counts", float("nan")), [_layer1("counts"), "NaN/Inf"]),
    (None, _fill("gram", float("inf")), [_layer1("gram"), "NaN/Inf"]),
    (None, _fill("counts", -1.0), [_layer1("counts"), "negative"]),
    (None, lambda s: s.pop(_layer1("gram")), ["lacks gram of layer model.layers.1.mlp"]),
    (None, lambda s: s.pop(_layer1("mass")), ["lacks mass of layer model.layers.1.mlp"]),
    (None, lambda s: s.__setitem__(_layer1("gram"), torch.zeros(3, 3, dtype=torch.float64)),
     [_layer1("gram"), "shape [3, 3], expected [8, 8]"]),
    (None, lambda s: s.__setitem__(_layer1("logit_sum"), torch.zeros(7, dtype=torch.float64)),
     ["shape [7], expected [8]"]),
])
def test_a_damaged_profile_is_refused_on_read_before_the_model_loads(header, tensors, needles, profile, tmp_path,
                                                                      data_dir, no_work):
    path = _edited(profile, tmp_path, header, tensors)
    before, out = digest(path), tmp_path / "out"
    refused(run("prune", "--profile", path, "--merge", "average", "--data-dir", data_dir, "--out", out, *PRUNE), out,
            f"--profile {path}", *needles)
    assert digest(path) == before


def test_only_the_expert_statistics_may_be_absent(profile, tmp_path):
    """llama4 and longcat_flash record no expert outputs: such a profile is whole, not damaged; one
    without a router statistic is damaged (it was read as zeros)."""
    from uncurl.stats import Profile

    path = _edited(profile, tmp_path, None,
                   lambda s: [s.pop(k) for k in list(s) if k.endswith(("ean_sum", "reap_sum"))])
    assert all(s.missing == {"ean_sum", "reap_sum"} for s in Profile.load(path).layers.values())
    for name in ("counts", "mass", "logit_sum", "gram", "logit_sample"):
        path = _edited(profile, tmp_path, None, lambda s: s.pop(_layer1(name)))
        with pytest.raises(UncurlError, match=f"lacks {name} of layer model.layers.1.mlp"):
            Profile.load(path)


def test_a_folder_or_fifo_as_profile_is_said_to_be_one(tmp_path, data_dir, no_work):
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "fifo")
    out = tmp_path / "out"
    for name, needle in (("folder", "is a folder; a profile is one file"), ("fifo", "is not a regular file")):
        refused(run("prune", "--profile", tmp_path / name, "--data-dir", data_dir, "--out", out, *PRUNE), out,
                f"--profile {tmp_path / name}", needle, absent=("no such file",))


def test_monitor_refuses_a_damaged_traffic_profile(profile, pruned, tmp_path):
    path = _edited(profile, tmp_path, None, _fill("counts", float("nan")))
    out = tmp_path / "out"
    refused(run("monitor", "--pruned", pruned / "k6", "--profile", path, "--out", out, "--no-plots"), out,
            f"--profile {path}", "NaN/Inf")


# --- 6. inputs are never outputs ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("shards")
    for i in range(2):
        res = run("profile", "--model", "builtin:mixtral", "--data-dir", data_dir, "--out", root / f"s{i}.profile",
                  "--shard", f"{i}/2", *FAST)
        assert res.exit_code == 0, res.output
    return root


@pytest.mark.parametrize("which", [0, 1])
def test_profile_merge_never_writes_over_one_of_its_shards(which, shards, tmp_path):
    before = digest(shards)
    files = [shards / "s0.profile", shards / "s1.profile"]
    target = files[which]
    res = run("profile-merge", "--overwrite", target, *files)
    refused(res, None, f"OUT {target} is one of the shards it adds", "choose another output file")
    assert digest(shards) == before and not leftovers(target)
    merged = run("profile-merge", tmp_path / "all.profile", *files)  # elsewhere it works
    assert merged.exit_code == 0, merged.output


def test_profile_never_writes_into_its_model_folder(tiny_dirs, tmp_path, data_dir, monkeypatch):
    from uncurl import load

    monkeypatch.setattr(load, "from_folder", lambda *a, **k: pytest.fail("loaded before refusing"))
    model = tmp_path / "m"
    shutil.copytree(tiny_dirs("mixtral"), model)
    before = digest(model)
    res = run("profile", "--model", model, "--data-dir", data_dir, "--out", model / "rte.profile", *FAST)
    refused(res, model / "rte.profile", f"--out {model / 'rte.profile'} is inside the input model folder")
    assert digest(model) == before


# --- 7. --out: its hidden names, a signal as it is claimed ----------------------------------------------


@pytest.mark.parametrize("command, size", [("prune", 231), ("prune", 240), ("profile", 235)])
def test_an_out_whose_hidden_staging_name_is_too_long_is_refused_up_front(command, size, tmp_path, data_dir, no_work,
                                                                           monkeypatch):
    from uncurl import load

    monkeypatch.setattr(load, "load_model", lambda *a, **k: pytest.fail("loaded before refusing"))
    out = tmp_path / ("x" * size)
    extra = PRUNE if command == "prune" else FAST
    refused(run(command, "--data-dir", data_dir, "--out", out, *extra), out, f"its name is {size} bytes",
            "255-byte limit", "at most 229 bytes")
    assert output.check_out(tmp_path / ("y" * 229), overwrite=False)  # the longest name accepted


@pytest.mark.parametrize("command", ["prune", "profile"])
def test_a_sigterm_as_the_lock_is_taken_leaves_no_lock(command, tmp_path, data_dir, monkeypatch, no_work):
    """SIGTERM the moment the lock file exists, before it is locked (a script that kills the run as
    soon as .NAME.lock appears): exit 143, nothing left beside --out."""
    real = output.fcntl.flock

    def flock(fd, how):
        if how & output.fcntl.LOCK_EX:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(fd, how)

    monkeypatch.setattr(output.fcntl, "flock", flock)
    out = tmp_path / "sub" / "out"
    res = run(command, "--data-dir", data_dir, "--out", out, *(PRUNE if command == "prune" else FAST))
    assert res.exit_code == 143, res.output
    assert "stopped by SIGTERM" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "sub").exists()  # the folder it made for --out, and the lock in it, are gone


# --- 8. nothing written outside --out -------------------------------------------------------------------


def test_a_run_writes_nothing_in_home_tmpdir_or_hf_home(tmp_path, data_dir):
    """A fresh HOME, TMPDIR and HF_HOME (XDG_CACHE_HOME unset): a prune with --no-plots and a routes
    run with its heat map (matplotlib) leave them as they were, and nothing beside --out."""
    home, tmp, hf, work = (tmp_path / n for n in ("home", "tmp", "hf", "work"))
    for folder in (home, tmp, hf, work):
        folder.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "MPLCONFIGDIR",
                                                              "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    env.update(HOME=str(home), TMPDIR=str(tmp), HF_HOME=str(hf), PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    for args in (["prune", "--out", work / "k4", *PRUNE], ["routes", "--out", work / "routes", "--samples", 4]):
        proc = subprocess.run([sys.executable, "-m", "uncurl", *map(str, args), "--data-dir", str(data_dir)],
                              env=env, cwd=work, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
    for folder in (home, tmp, hf):
        assert list(folder.rglob("*")) == [], (folder, list(folder.rglob("*")))
    assert sorted(p.name for p in work.iterdir()) == ["k4", "routes"]
    assert (work / "routes" / "heatmap.png").is_file()

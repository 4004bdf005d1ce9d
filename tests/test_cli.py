"""The CLI end to end through Typer's runner: success paths, reuse of profiles, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from uncurl import pipeline
from uncurl.cli import app
from uncurl.errors import CheckpointCheckError
from uncurl.load import build_tiny, byte_tokenizer

runner = CliRunner()
FAST = ["--samples", "12", "--max-length", "64"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def nothing_written(out):
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return not out.exists() and not leftovers


def test_prune_end_to_end(tmp_path, data_dir):
    out = tmp_path / "k4"
    res = run("prune", "--model", "builtin:qwen2_moe", "--task", "superglue-rte", "--keep", 4, "--data-dir", data_dir,
              "--out", out, *FAST)
    assert res.exit_code == 0, res.output
    assert str(out / "report" / "report.md") in res.output
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["schema_version"] == 1
    assert {"command", "versions", "seed", "timings_s", "model", "task", "layers", "checks", "files"} <= set(report)
    assert report["model"]["experts_before"] == 8 and report["model"]["experts_after"] == 4
    assert report["model"]["params_after"] < report["model"]["params_before"]
    assert report["merge"] == "fit" and report["pipeline"]["layer_by_layer"]  # the default: auto, fitted layer by layer
    assert {"load", "layers", "verify"} <= set(report["timings_s"])
    assert report["task"]["calibration_examples"] == 12 and report["task"]["tokens"] > 0
    for name in ("usage.png", "groups.png", "report.md"):
        assert (out / "report" / name).stat().st_size > 0
    assert "--keep 4" in report["command"]


def test_multimodal_wrapper_end_to_end_with_eval(tmp_path, data_dir, tiny_dirs):
    """A vision-language MoE folder (qwen3_vl_moe) through the CLI with --eval: the output is the same
    ...ForConditionalGeneration with its processor file, evaluated before and after."""
    src = tiny_dirs("qwen3_vl_moe")
    out = tmp_path / "vl"
    res = run("prune", "--model", src, "--keep", 4, "--data-dir", data_dir, "--out", out, "--eval",
              "--eval-limit", 8, "--json", *FAST)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    assert {"before", "after", "drop"} <= set(summary["eval"])
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3VLMoeForConditionalGeneration"]
    assert config["text_config"]["num_local_experts"] == 4 and "vision_config" in config
    assert (out / "preprocessor_config.json").read_bytes() == (src / "preprocessor_config.json").read_bytes()


def test_profile_then_prune_reuses_it_without_a_forward(tmp_path, data_dir, monkeypatch):
    prof = tmp_path / "rte.profile"
    res = run("profile", "--model", "builtin:mixtral", "--data-dir", data_dir, "--out", prof, *FAST)
    assert res.exit_code == 0, res.output
    direct = run("prune", "--model", "builtin:mixtral", "--keep", 3, "--data-dir", data_dir, "--out", tmp_path / "a", *FAST)
    assert direct.exit_code == 0, direct.output

    def no_forward(*a, **k):
        raise AssertionError("prune --profile must not profile again")

    monkeypatch.setattr(pipeline, "profile_model", no_forward)
    # the default merge (auto: fit) reads the calibration texts again to fit on, so --data-dir here too
    reused = run("prune", "--model", "builtin:mixtral", "--keep", 3, "--profile", prof, "--data-dir", data_dir,
                 "--out", tmp_path / "b", *FAST)
    assert reused.exit_code == 0, reused.output
    a = json.loads((tmp_path / "a" / "report" / "report.json").read_text())
    b = json.loads((tmp_path / "b" / "report" / "report.json").read_text())
    assert [layer["groups"] for layer in a["layers"]] == [layer["groups"] for layer in b["layers"]]
    assert b["task"]["fingerprint"] == a["task"]["fingerprint"]


def test_listing_commands_and_help():
    res = run("tasks")
    assert res.exit_code == 0 and "superglue-rte" in res.output and "piqa" in res.output
    res = run("families")
    assert res.exit_code == 0 and all(f in res.output for f in ("mixtral", "deepseek_v3", "gpt_oss"))
    res = run("prune", "--help")
    assert res.exit_code == 0
    for text in ("Pruning", "Task data", "--keep", "--method", "--router-rows", "--data-dir"):
        assert text in res.output


def test_readme_family_table_is_uncurl_families():
    """README's family tables are `uncurl families --markdown`, as the pinned transformers prints it."""
    from pathlib import Path

    import transformers

    root = Path(__file__).resolve().parents[1]
    pinned = next(line.split("==")[1].strip() for line in (root / "constraints.txt").read_text().splitlines()
                  if line.startswith("transformers=="))
    if transformers.__version__ != pinned:
        pytest.skip(f"README's table is written with transformers {pinned}, this is {transformers.__version__}")
    res = run("families", "--markdown")
    assert res.exit_code == 0, res.output
    assert res.output.strip() in (root / "README.md").read_text()


def test_readme_option_table_states_the_defaults_prune_uses():
    """The README's option rows for --method, --merge and --router name the defaults the code has."""
    from pathlib import Path

    from uncurl.pipeline import DEFAULT_MERGE, DEFAULT_METHOD, DEFAULT_ROUTER

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for option, default in (("--method", DEFAULT_METHOD), ("--merge", DEFAULT_MERGE), ("--router", DEFAULT_ROUTER)):
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{option}`"))
        assert row.split("|")[2].strip() == f"`{default}`", row[:80]


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory):
    """A folder of an unsupported family and one of a MoE family with every layer dense."""
    from transformers import AutoConfig

    root = tmp_path_factory.mktemp("odd")
    AutoConfig.for_model("llama", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, vocab_size=300).save_pretrained(root / "llama")
    model, tok = build_tiny("qwen2_moe", seed=0, mlp_only_layers=[0, 1])
    model.save_pretrained(root / "dense")
    tok.save_pretrained(root / "dense")
    return root


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--model", "builtin:llama"], "model family 'llama' is not supported; supported families: "),
        (["--model", "{odd}/llama"], "model family 'llama' is not supported"),
        (["--model", "{odd}/dense"], "no MoE layers found"),
        (["--model", "nobody/no-such-moe"], "Hub is unreachable"),
        (["--keep", "0"], "--keep 0 is out of range"),
        (["--keep", "9"], "--keep 9 is out of range"),
        (["--keep", "1"], "below the router's top-k"),
        (["--keep", "2", "--top-k", "3"], "--top-k 3 is above this model's own top-k (2)"),
        (["--model", "builtin:deepseek_v3", "--keep", "3"], "does not fit grouped routing"),
        (["--task", "superglue-nope"], "superglue-nope"),
        (["--data-dir", "{tmp}/empty"], "superglue/rte/train.jsonl"),
        (["--method", "magic"], "--method 'magic'"),
        (["--merge", "blend"], "--merge 'blend'"),
        (["--router", "max"], "--router 'max'"),
        (["--device", "tpu"], "--device 'tpu'"),
        (["--device-map", "everywhere"], "--device-map 'everywhere'"),
        (["--device-map", "auto", "--device", "cpu"], "leave --device at auto"),
        (["--max-memory", "cpu=1GB"], "--max-memory only applies with --device-map"),
        (["--device-map", "auto"], "--device-map is for checkpoints on disk or the Hub"),
        (["--device-map", "auto", "--max-memory", "gpu0=1GB"], "device 'gpu0' is not a GPU index"),
        (["--device-map", "auto", "--max-memory", "lots"], "expected DEVICE=AMOUNT pairs"),
        (["--profile", "{tmp}/missing.profile"], "no such file"),
    ],
)
def test_bad_input_exits_2_names_the_problem_and_writes_nothing(args, needle, tmp_path, data_dir, odd_models):
    (tmp_path / "empty").mkdir()
    args = [a.format(odd=odd_models, tmp=tmp_path) for a in args]
    if "--data-dir" not in args:
        args += ["--data-dir", str(data_dir)]
    out = tmp_path / "out"
    res = run("prune", *args, "--out", out, *FAST)
    assert res.exit_code == 2, res.output
    assert needle in " ".join(res.output.split()), res.output
    assert nothing_written(out)


def test_task_file_with_no_rows(tmp_path):
    (tmp_path / "superglue" / "rte").mkdir(parents=True)
    (tmp_path / "superglue" / "rte" / "train.jsonl").write_text("")
    res = run("prune", "--data-dir", tmp_path, "--out", tmp_path / "out", *FAST)
    assert res.exit_code == 2 and "no data" in res.output
    assert nothing_written(tmp_path / "out")


def test_occupied_out_is_refused_then_replaced_with_overwrite(tmp_path, data_dir):
    out = tmp_path / "out"  # an earlier uncurl output (what --overwrite replaces; see test_faults_out.py)
    (out / "report").mkdir(parents=True)
    (out / "report" / "report.json").write_text('{"schema_version": 1, "command": "uncurl prune --out out"}')
    (out / "config.json").write_text("{}")
    (out / "stale.txt").write_text("old")
    res = run("prune", "--data-dir", data_dir, "--out", out, *FAST)
    assert res.exit_code == 2 and "already holds a checkpoint" in res.output and "--overwrite" in res.output
    assert (out / "stale.txt").exists()
    res = run("prune", "--data-dir", data_dir, "--out", out, "--overwrite", "--no-plots", *FAST)
    assert res.exit_code == 0, res.output
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()
    # --no-plots: the report without its PNGs, and report.json lists only what was written
    assert sorted(p.name for p in (out / "report").iterdir()) == ["report.json", "report.md"]
    assert json.loads((out / "report" / "report.json").read_text())["files"] == {"json": "report.json",
                                                                                 "markdown": "report.md"}


def test_out_inside_the_input_folder_is_refused(tmp_path, data_dir, tiny_dirs):
    src = tiny_dirs("mixtral")
    res = run("prune", "--model", src, "--data-dir", data_dir, "--out", src / "pruned", *FAST)
    assert res.exit_code == 2 and "inside the input model folder" in res.output
    assert not (src / "pruned").exists()


def test_failed_check_exits_3_and_leaves_no_partial_folder(tmp_path, data_dir, monkeypatch):
    def failing(*a, **k):
        raise CheckpointCheckError("the pruned checkpoint failed its checks: simulated")

    monkeypatch.setattr(pipeline, "verify_checkpoint", failing)
    out = tmp_path / "out"
    res = run("prune", "--data-dir", data_dir, "--out", out, *FAST)
    assert res.exit_code == 3 and "simulated" in res.output
    assert nothing_written(out)


def test_custom_task_file(tmp_path):
    rows = [{"q": f"question {i}", "label": "yes" if i % 2 else "no"} for i in range(10)]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    res = run("prune", "--task", path, "--template", "{q}\nAnswer:", "--choices", "yes,no", "--keep", 6,
              "--out", tmp_path / "out", *FAST)
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "report" / "report.json").read_text())
    assert report["task"]["name"] == "mine" and report["task"]["calibration_examples"] == 5  # one seeded half
    assert "disjoint halves" in report["task"]["split"]
    res = run("prune", "--task", path, "--out", tmp_path / "o2", *FAST)
    assert res.exit_code == 2 and "--template" in res.output


def test_byte_tokenizer_round_trips():
    tok = byte_tokenizer()
    text = "Prémisse: ünïcode ✓\nAnswer: True"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert torch.tensor(tok(text)["input_ids"]).max() < 256

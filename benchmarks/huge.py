"""`make bench` part `huge` (opt-in: `--only huge`): a model larger than this machine's RAM, pruned for real.

    python -m benchmarks.run --only huge --huge-dir /work/bigtwin      # ~32 GB written once, then reused

1. Writes a seeded random-weight twin of Qwen3-30B-A3B's shape (qwen3_moe: hidden 2048, 128 experts of
   moe_intermediate_size 768, top-8, 32 attention heads and 4 KV heads of 128, the real vocabulary of
   151,936, bf16) with ``--huge-layers`` decoder layers (default 25 of the real 48: 32.4 GB, 30.2 GiB), in the
   real checkpoint's layout (one ``mlp.experts.{j}.{gate,up,down}_proj.weight`` per expert), one shard per
   layer, written tensor by tensor (a safetensors header, then each tensor made and written: never more than
   one expert matrix in memory), with ``model.safetensors.index.json``, ``config.json`` and uncurl's byte
   tokenizer (only 258 of the 151,936 ids are ever used). A finished twin is marked by ``twin.json`` and reused.
2. Measures the disk: sequential read (page cache dropped first) and write (``O_DIRECT``) throughput of a
   4 GiB file next to the twin. The floor of a prune is one read of the checkpoint plus one write of the
   pruned checkpoint at those speeds.
3. Runs ``uncurl prune --keep K --device-map auto --max-memory cpu=4GiB`` on it, in a fresh process, with
   ``--merge select`` and with the default merge, the page cache dropped before each (when this process may
   write /proc/sys/vm/drop_caches). Samples the process tree every 0.5 s: peak RSS, peak anonymous RSS
   (RssAnon: what the page cache cannot take back), and /proc/<pid>/io read_bytes / write_bytes (storage
   I/O the process caused). Records the machine's load average beside each run (it is shared).

Results go to benchmarks/results/huge.json after every step (a later run resumes: finished runs are kept
unless --huge-rerun).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch

# Qwen3-30B-A3B's config.json (Qwen/Qwen3-30B-A3B), all but the number of layers
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
    "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
    "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936,
    "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "norm_topk_prob": True,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "tie_word_embeddings": False, "attention_bias": False,
    "hidden_act": "silu", "initializer_range": 0.02, "router_aux_loss_coef": 0.001, "output_router_logits": False,
    "use_sliding_window": False, "sliding_window": None, "max_window_layers": 48, "attention_dropout": 0.0,
    "torch_dtype": "bfloat16", "use_cache": True,
}
REAL_LAYERS = 48


def layer_tensors(c: dict, i: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of decoder layer ``i``'s tensors, as Qwen3-30B-A3B's checkpoint names them."""
    h, e, inter = c["hidden_size"], c["num_experts"], c["moe_intermediate_size"]
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    p = f"model.layers.{i}."
    out = [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
           (p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
           (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q)),
           (p + "self_attn.q_norm.weight", (c["head_dim"],)), (p + "self_attn.k_norm.weight", (c["head_dim"],)),
           (p + "mlp.gate.weight", (e, h))]
    for j in range(e):
        out += [(p + f"mlp.experts.{j}.gate_proj.weight", (inter, h)), (p + f"mlp.experts.{j}.up_proj.weight", (inter, h)),
                (p + f"mlp.experts.{j}.down_proj.weight", (h, inter))]
    return out


def outer_tensors(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    return [("model.embed_tokens.weight", (c["vocab_size"], c["hidden_size"])), ("model.norm.weight", (c["hidden_size"],)),
            ("lm_head.weight", (c["vocab_size"], c["hidden_size"]))]


def twin_bytes(layers: int, c: dict = QWEN3_30B_A3B) -> int:
    shapes = [s for i in range(layers) for _, s in layer_tensors(c, i)] + [s for _, s in outer_tensors(c)]
    return sum(2 * torch.Size(s).numel() for s in shapes)


def _make(name: str, shape: tuple, gen: torch.Generator, std: float) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, std, generator=gen)


def write_shard(path: Path, tensors: list[tuple[str, tuple]], gen: torch.Generator, std: float) -> int:
    """A safetensors file of ``tensors`` (bf16), each made and written in turn; returns its bytes.
    Written to ``path``.partial and renamed, so a shard on disk is always whole."""
    header, offset = {}, 0
    for name, shape in tensors:
        n = 2 * torch.Size(shape).numel()
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-aligned
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for name, shape in tensors:
            f.write(_make(name, shape, gen, std).view(torch.uint8).numpy())
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(path)
    return 8 + len(head) + offset


def write_twin(folder: Path, layers: int, seed: int = 0, log=print) -> dict:
    """The twin in ``folder`` (written unless ``twin.json`` says it is already there, same layers and
    seed); returns twin.json's content."""
    from uncurl.load import byte_tokenizer

    marker = folder / "twin.json"
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done["layers"] == layers and done["seed"] == seed:
            return done
        raise SystemExit(f"{folder} holds another twin ({done['layers']} layers, seed {done['seed']}); "
                         f"remove it or pick another --huge-dir")
    folder.mkdir(parents=True, exist_ok=True)
    tok = byte_tokenizer()
    c = {**QWEN3_30B_A3B, "num_hidden_layers": layers, "bos_token_id": None, "eos_token_id": tok.eos_token_id,
         "pad_token_id": tok.pad_token_id}
    shards = [(f"model-{i + 1:05d}-of-{layers + 1:05d}.safetensors", layer_tensors(c, i)) for i in range(layers)]
    shards.append((f"model-{layers + 1:05d}-of-{layers + 1:05d}.safetensors", outer_tensors(c)))
    weight_map, start, total = {}, time.perf_counter(), 0
    for k, (name, tensors) in enumerate(shards):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + k)  # per shard: a shard rewritten is the same
        if not (folder / name).is_file():
            write_shard(folder / name, tensors, gen, c["initializer_range"])
        total += sum(2 * torch.Size(s).numel() for _, s in tensors)
        weight_map.update({t: name for t, _ in tensors})
        log(f"twin: shard {k + 1}/{len(shards)} {name} ({total / 1e9:.1f} GB, {time.perf_counter() - start:.0f} s)")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(c, indent=2) + "\n")
    tok.save_pretrained(folder)
    done = {"layers": layers, "seed": seed, "bytes": total, "of_real_layers": REAL_LAYERS,
            "vocab": "real (151,936); byte tokenizer: ids 0-257 used",
            "write_seconds": round(time.perf_counter() - start, 1)}
    marker.write_text(json.dumps(done, indent=2) + "\n")
    return done


def drop_caches() -> bool:
    """Drop the page cache (root only), so what a run reads comes from the disk; whether it could."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def disk_speed(folder: Path, size: int = 4 << 30, block: int = 16 << 20) -> dict:
    """Sequential write (O_DIRECT: the page cache bypassed) and read (page cache dropped first, else
    O_DIRECT) of a ``size`` file in ``folder``, in bytes/s; the file is removed."""
    import mmap

    path = folder / "_disk_speed.tmp"
    buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(block))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT)
        start = time.perf_counter()
        for _ in range(size // block):
            os.write(fd, buf)
        os.fsync(fd)
        write = size / (time.perf_counter() - start)
        os.close(fd)
        dropped = drop_caches()
        fd = os.open(path, os.O_RDONLY | (0 if dropped else os.O_DIRECT))
        start = time.perf_counter()
        while os.readv(fd, [buf]) > 0:
            pass
        read = size / (time.perf_counter() - start)
        os.close(fd)
    finally:
        path.unlink(missing_ok=True)
    return {"read_bytes_per_s": round(read), "write_bytes_per_s": round(write), "file_bytes": size,
            "read_after": "page cache dropped" if dropped else "O_DIRECT"}


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _status_kb(pid: int, keys=("VmRSS:", "RssAnon:", "RssFile:", "RssShmem:")) -> dict:
    got = dict.fromkeys(keys, 0)
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(None, 1)[0]
            if key in got:
                got[key] = int(line.split()[1])
    except OSError:
        pass
    return got


def _io(pid: int) -> dict:
    try:
        return {k: int(v) for k, v in (line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())}
    except OSError:
        return {}


def measured_run(cmd: list[str], env: dict, log_path: Path, watch_dir: Path | None = None, every: float = 0.5) -> dict:
    """Run ``cmd``; every ``every`` s sample its process tree: summed VmRSS / RssAnon / RssFile (peaks),
    /proc/<pid>/io of each process (last values, summed; the main process's read just before it is
    reaped: waitid WNOWAIT), the free space of ``watch_dir``'s disk (its minimum: temporary files)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    peak = {"rss": 0, "anon": 0, "file": 0}
    last_io: dict[int, dict] = {}
    free0 = os.statvfs(watch_dir).f_bavail * os.statvfs(watch_dir).f_frsize if watch_dir else 0
    min_free = free0
    start = time.perf_counter()
    while True:
        done = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        pids = _tree(proc.pid)
        kb = [_status_kb(p) for p in pids]
        peak["rss"] = max(peak["rss"], sum(k["VmRSS:"] for k in kb))
        peak["anon"] = max(peak["anon"], sum(k["RssAnon:"] for k in kb))
        peak["file"] = max(peak["file"], sum(k["RssFile:"] + k["RssShmem:"] for k in kb))
        for p in pids:
            io = _io(p)
            if io:
                last_io[p] = io
        if watch_dir:
            st = os.statvfs(watch_dir)
            min_free = min(min_free, st.f_bavail * st.f_frsize)
        if done is not None:
            break
        time.sleep(every)
    seconds = time.perf_counter() - start
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    rc = proc.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the run's own CPU time (its children's too)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    total = {k: sum(io.get(k, 0) for io in last_io.values()) for k in ("read_bytes", "write_bytes", "rchar", "wchar")}
    return {"rc": rc, "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1), "peak_rss_bytes": peak["rss"] * 1024,
            "peak_anon_rss_bytes": peak["anon"] * 1024, "peak_file_rss_bytes": peak["file"] * 1024,
            **total, "temp_disk_peak_bytes": free0 - min_free if watch_dir else None}


def prune_command(folder: Path, out: Path, merge: str | None, keep: int, samples: int, max_length: int,
                  max_memory: str) -> list[str]:
    data = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not data.is_dir():
        data = Path("/work/shared/data")
    cmd = [sys.executable, "-m", "uncurl", "prune", "--model", str(folder), "--task", "corpus", "--data-dir", str(data),
           "--samples", str(samples), "--max-length", str(max_length), "--keep", str(keep),
           "--device-map", "auto", "--max-memory", max_memory, "--out", str(out), "--overwrite", "--no-plots"]
    return cmd + (["--merge", merge] if merge else [])


def commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True).stdout
        return head.strip() + ("+dirty" if dirty.strip() else "")
    except OSError:
        return "unknown"


def floor_seconds(read_bytes: int, write_bytes: int, disk: dict) -> float:
    return read_bytes / disk["read_bytes_per_s"] + write_bytes / disk["write_bytes_per_s"]


def huge(folder: Path, layers: int, keep: int, samples: int, max_length: int, max_memory: str, result_path: Path,
         merges=("select", None), rerun: bool = False) -> dict:
    """The part: the twin (written once), the disk's speed, then one prune per merge (None: the
    default), each recorded in ``result_path`` as soon as it ends."""
    result = json.loads(result_path.read_text()) if result_path.is_file() else {}

    def save():
        result_path.parent.mkdir(parents=True, exist_ok=True)
        result_path.write_text(json.dumps(result, indent=2) + "\n")

    model = folder / f"qwen3-30b-a3b-{layers}l"
    twin = write_twin(model, layers, log=lambda s: print(s, flush=True))
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    result["twin"] = {**twin, "folder": str(model), "shape": "Qwen3-30B-A3B (qwen3_moe): hidden 2048, 128 experts of "
                      "768, top-8, 32 heads / 4 KV heads of 128, bf16", "ram_bytes": ram,
                      "over_ram": round(twin["bytes"] / ram, 2)}
    if rerun or "disk" not in result:
        result["disk"] = {**disk_speed(folder), "when": time.strftime("%Y-%m-%d %H:%M"),
                          "load_average": os.getloadavg()}
        save()
    print("disk:", result["disk"], flush=True)
    runs = result.setdefault("runs", {})
    for merge in merges:
        name = merge or "default"
        if name in runs and runs[name].get("rc") == 0 and not rerun:
            continue
        out = folder / f"pruned-{name}"
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1"}
        cmd = prune_command(model, out, merge, keep, samples, max_length, max_memory)
        dropped = drop_caches()
        load_before = os.getloadavg()
        print(f"huge: prune --merge {name} ...", flush=True)
        got = measured_run(cmd, env, folder / f"prune-{name}.log", watch_dir=folder)
        written = sum(f.stat().st_size for f in out.glob("*.safetensors")) if out.is_dir() else 0
        report_file = out / "report" / "report.json"
        report = json.loads(report_file.read_text()) if report_file.is_file() else {}
        floor = floor_seconds(twin["bytes"], written, result["disk"])
        runs[name] = {**got, "merge": name, "keep": keep, "samples": samples, "max_length": max_length,
                      "max_memory": max_memory, "command": " ".join(cmd[1:]), "page_cache_dropped": dropped,
                      "commit": commit(), "when": time.strftime("%Y-%m-%d %H:%M"),
                      "load_average_before": load_before, "load_average_after": os.getloadavg(),
                      "checkpoint_bytes": twin["bytes"], "written_checkpoint_bytes": written,
                      "floor_seconds": round(floor, 1), "over_floor": round(got["seconds"] / floor, 2),
                      "read_over_checkpoint": round(got["read_bytes"] / twin["bytes"], 3),
                      "stage_seconds": report.get("timings_s"), "offloaded_bytes": report.get("model", {}).get("offloaded_bytes"),
                      "offload_reads_bytes": report.get("offload_reads_bytes"),
                      "pipeline": report.get("pipeline")}
        save()
        print(f"huge: {name}: {runs[name]['seconds']} s = {runs[name]['over_floor']}x the floor, peak RSS "
              f"{got['peak_rss_bytes'] / 2**30:.2f} GiB (anon {got['peak_anon_rss_bytes'] / 2**30:.2f}), read "
              f"{got['read_bytes'] / 1e9:.1f} GB", flush=True)
        if out.is_dir() and runs[name]["rc"] == 0:
            import shutil
            shutil.rmtree(out)  # the figures are kept; the pruned copies are not needed
    return result

"""Host-RAM peak of loading a base model: streamed shard by shard (model.load: stream) vs from_pretrained + quantize.

    python bench/load_memory.py build /tmp/llama1b            # random ~1.1B Llama (TinyLlama shapes), bf16, 4 shards
    python bench/load_memory.py measure /tmp/llama1b           # both paths, each in a fresh process, NF4 on the CPU
    python bench/load_memory.py measure /tmp/llama1b --json out.json
    python bench/load_memory.py measure path/to/model.gguf    # a GGUF file: streamed through gguf's reader

Each path runs in its own subprocess (a fresh heap) that imports everything first, records its RSS, loads the model
with ``quant: nf4`` (double quant, bf16 compute, device cpu: the host holds the whole quantized model, the worst
case for the streamed path) and reads the kernel's peak RSS (``VmHWM``; ``ru_maxrss`` is the same number). Reported:
the peak, the peak minus the RSS before loading (``extra``), the quantized model's size (every parameter, buffer and
quant-state tensor, by storage), the largest shard, and the target of issue 16: peak extra <= 1.5 x (quantized model
+ largest shard). Writing the checkpoint does not instantiate a model: tensors are drawn one at a time.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

SHAPES = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
              num_key_value_heads=4, vocab_size=32000)  # TinyLlama-1.1B's shapes: 1.10B parameters


def build(out: Path, shards: int = 4) -> None:
    import torch
    import transformers
    from safetensors.torch import save_file

    cfg = transformers.LlamaConfig(**SHAPES, tie_word_embeddings=False, max_position_embeddings=2048)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(out)
    h, inter = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * h // cfg.num_attention_heads
    names: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (cfg.vocab_size, h))]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        names += [(f"{p}.self_attn.q_proj.weight", (h, h)), (f"{p}.self_attn.k_proj.weight", (kv, h)),
                  (f"{p}.self_attn.v_proj.weight", (kv, h)), (f"{p}.self_attn.o_proj.weight", (h, h)),
                  (f"{p}.mlp.gate_proj.weight", (inter, h)), (f"{p}.mlp.up_proj.weight", (inter, h)),
                  (f"{p}.mlp.down_proj.weight", (h, inter)), (f"{p}.input_layernorm.weight", (h,)),
                  (f"{p}.post_attention_layernorm.weight", (h,))]
    names += [("model.norm.weight", (h,)), ("lm_head.weight", (cfg.vocab_size, h))]
    total = sum(math.prod(s) for _, s in names)
    per_shard = math.ceil(total / shards)
    g = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    buf: dict[str, torch.Tensor] = {}
    size, k = 0, 0

    def flush() -> None:
        nonlocal buf, size, k
        k += 1
        fname = f"model-{k:05d}-of-{shards:05d}.safetensors"
        save_file(buf, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in buf})
        print(f"wrote {fname}: {size * 2 / 2**20:.0f} MiB", flush=True)
        buf, size = {}, 0

    for name, shape in names:
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        buf[name] = t
        size += t.numel()
        if size >= per_shard:
            flush()
    if buf:
        flush()
    if k != shards:  # name the files by their real count
        for i in range(1, k + 1):
            old = out / f"model-{i:05d}-of-{shards:05d}.safetensors"
            new = out / f"model-{i:05d}-of-{k:05d}.safetensors"
            old.rename(new)
        weight_map = {n: f.replace(f"-of-{shards:05d}", f"-of-{k:05d}") for n, f in weight_map.items()}
    index = {"metadata": {"total_size": total * 2}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    print(f"{total / 1e9:.3f}B parameters in {k} shards at {out}")


_CHILD = r"""
import json, sys, torch, transformers, bitsandbytes, safetensors, accelerate
from transformers.models.llama import modeling_llama
from slimtune.bench.memory import current_rss, _proc_status, _trim_heap
from slimtune.models.load import ModelConfig, QuantConfig, prepare_loaded
from slimtune.models.streaming import safetensors_files, stream_model
path, mode = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
_trim_heap()
before = current_rss()
mc, qc = ModelConfig(name=path), QuantConfig(mode="nf4", compute_dtype="bfloat16")
dev = torch.device("cpu")
gguf = path.endswith(".gguf")
if mode == "stream" and gguf:
    from pathlib import Path
    from slimtune.models.streaming import stream_gguf
    model, why = stream_gguf(Path(path), mc, qc, device=dev, dtype=torch.bfloat16)
    assert model is not None, why
elif mode == "stream":
    model, why = stream_model(safetensors_files(path, mc), mc, qc, device=dev, dtype=torch.bfloat16)
    assert model is not None, why
else:
    import os
    extra = {"gguf_file": os.path.basename(path)} if gguf else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path) if gguf else path,
                                                              dtype=torch.bfloat16, **extra)
    model = prepare_loaded(model, None, qc, device=dev, source=path).model
peak = _proc_status("VmHWM")
seen, size = set(), 0
tensors = [t for t in list(model.parameters()) + list(model.buffers())]
for p in model.parameters():
    qs = getattr(p, "quant_state", None)
    while qs is not None:
        tensors += [t for t in (qs.absmax, qs.code, getattr(qs, "offset", None)) if torch.is_tensor(t)]
        qs = getattr(qs, "state2", None)
for t in tensors:
    st = t.untyped_storage()
    if st.data_ptr() not in seen:
        seen.add(st.data_ptr()); size += st.nbytes()
print(json.dumps({"mode": mode, "rss_before": before, "peak": peak, "model_bytes": size}))
"""


def measure(path: Path, modes: tuple[str, ...] = ("stream", "full")) -> dict:
    shards = [path] if path.suffix == ".gguf" else sorted(path.glob("*.safetensors"))
    largest = max(f.stat().st_size for f in shards)
    out: dict = {"path": str(path), "shards": len(shards), "largest_shard_bytes": largest}
    for mode in modes:
        res = subprocess.run([sys.executable, "-c", _CHILD, str(path), mode], capture_output=True, text=True,
                             env={"OMP_NUM_THREADS": "1", **__import__("os").environ})
        if res.returncode != 0:
            sys.exit(f"{mode}: {res.stderr.strip().splitlines()[-1]}")
        r = json.loads(res.stdout.strip().splitlines()[-1])
        r["extra"] = r["peak"] - r["rss_before"]
        out[mode] = r
    nf4 = out[modes[0]]["model_bytes"]
    out["target_bytes"] = int(1.5 * (nf4 + largest))
    if "stream" in out:
        out["stream_ratio"] = out["stream"]["extra"] / (nf4 + largest)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write a random ~1.1B bf16 Llama checkpoint in shards")
    b.add_argument("out", type=Path)
    b.add_argument("--shards", type=int, default=4)
    m = sub.add_parser("measure", help="peak host RSS of both load paths")
    m.add_argument("path", type=Path)
    m.add_argument("--json", type=Path)
    m.add_argument("--modes", default="stream,full", help="comma-separated: stream, full")
    args = ap.parse_args()
    if args.cmd == "build":
        build(args.out, args.shards)
        return
    modes = tuple(args.modes.split(","))
    res = measure(args.path, modes)
    mib = 2**20
    for mode in modes:
        r = res[mode]
        print(f"{mode:6s}: peak RSS {r['peak'] / mib:8.0f} MiB, before load {r['rss_before'] / mib:6.0f} MiB, "
              f"extra {r['extra'] / mib:8.0f} MiB")
    print(f"quantized model {res['stream']['model_bytes'] / mib:.0f} MiB, largest shard "
          f"{res['largest_shard_bytes'] / mib:.0f} MiB; target extra <= {res['target_bytes'] / mib:.0f} MiB; "
          f"streamed extra = {res['stream_ratio']:.2f} x (model + shard)")
    if "full" in res:
        print(f"full / stream extra = {res['full']['extra'] / res['stream']['extra']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()

"""Greedy completions from llama.cpp itself (the prebuilt `xllamacpp` wheel), run as a script in a subprocess so a
test can bound it with a timeout: ``python llamacpp_run.py REQUEST.json`` prints one JSON line.

REQUEST: {"model": path, "lora": path or null, "prompts": [text, ...], "n_predict": int, "n_probs": int}. The answer
holds, per prompt, the generated token ids and, for each generated position, llama.cpp's top ``n_probs`` (token id,
log-prob) pairs. The server listens on a loopback port of its own; it never samples (temperature 0, top-k 1).
"""

from __future__ import annotations

import json
import sys


def main(request_path: str) -> None:
    import xllamacpp as x

    req = json.loads(open(request_path).read())
    params = x.CommonParams()
    params.model.path = req["model"]
    params.n_ctx, params.n_parallel, params.n_gpu_layers, params.warmup = 512, 1, 0, False
    params.cpuparams.n_threads = 1
    if req.get("lora"):
        lora = x.CommonAdapterLoraInfo(req["lora"], 1.0)
        params.lora_adapters = [lora]
    server = x.Server(params)
    out = []
    for prompt in req["prompts"]:
        r = server.handle_completions({"prompt": prompt, "n_predict": req["n_predict"], "temperature": 0, "top_k": 1,
                                       "n_probs": req["n_probs"], "cache_prompt": False, "return_tokens": True})
        steps = r["choices"][0]["logprobs"]["content"]
        out.append({"tokens": [s["id"] for s in steps],
                    "top": [[[t["id"], t["logprob"]] for t in s["top_logprobs"]] for s in steps]})
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])

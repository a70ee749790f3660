"""Scoring throughput (choices/s): flexora_jax ``loglikelihoods`` vs lm-evaluation-harness's HF model.

Like with like: the pretrained tinystories260k model (llama2.c stories260K, converted once by
``flexora_jax.convert_llama2c``; lm-eval's ``HFLM`` loads the same directory with transformers), the
same ``(context, continuation)`` requests (the first n test examples of piqa, arc_easy, hellaswag and
boolq, every choice one request), the same context (512 tokens, left truncation) and batch size.
Both sides start from strings (tokenisation included) and end with float log-likelihoods:

- ours: ``flexora_jax.evaluation.loglikelihoods`` (what ``evaluate`` runs), timed cold (first call
  after clearing the jit cache: tracing + compiling one program per length bucket) and warm;
- lm-eval: ``HFLM.loglikelihood`` on ``Instance`` requests, torch in inference mode, with as many
  threads as cores and with 1 thread (the reference is whichever is faster in that run: under
  contention OpenMP's spinning barriers can make the all-core setting several times slower).

The warm runs are timed round-robin in one process (``harness.interleaved``). ``speedup`` is
ours(warm) / lm-eval in choices/s; ``speedup_with_compile`` charges our whole compile to one pass.

    python -m benchmarks.bench_eval [--n 200] [--batch-size 32] [--repeats 2] [--smoke]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from benchmarks import harness  # noqa: E402

TASKS = ("piqa", "arc_easy", "hellaswag", "boolq")
SMOKE_TASKS = ("piqa", "arc_easy")
TINYSTORIES = "tinystories260k"
_MODEL_CACHE: dict[str, Any] = {}


def tinystories(data_dir: str | os.PathLike | None = None) -> tuple[Any, Any, Any, Path]:
    """(config, params, tokenizer, hf_dir) of the pretrained tinystories260k model, converted once per process."""
    import flexora_jax
    from flexora_jax.tasks import default_data_dir

    src = Path(data_dir) if data_dir is not None else default_data_dir()
    key = str(src)
    if key not in _MODEL_CACHE:
        out = Path(tempfile.mkdtemp(prefix="tinystories260k_"))
        model_dir = src / TINYSTORIES
        flexora_jax.convert_llama2c(model_dir / "checkpoint_legacy.bin", model_dir / "tok512.model", out)
        config, params = flexora_jax.load_model(out)
        _MODEL_CACHE[key] = (config, params, flexora_jax.load_tokenizer(out), out)
    return _MODEL_CACHE[key]


def build_requests(tasks_: tuple[str, ...], n: int, data_dir: str | None = None) -> tuple[list[tuple[str, str]], dict]:
    """Every choice of the first ``n`` test examples of each task as one ``(context, continuation)`` request."""
    from flexora_jax import tasks

    requests, per_task = [], {}
    for name in tasks_:
        recs = tasks.load_records(name, "test", data_dir=data_dir)[:n]
        reqs = [req for rec in recs for req in rec.requests()]
        per_task[name] = {"examples": len(recs), "choices": len(reqs)}
        requests += reqs
    return requests, per_task


def token_stats(tokenizer: Any, requests: list[tuple[str, str]], max_length: int, batch_size: int) -> dict:
    """Request lengths and the tokens each side computes over.

    Ours: the choices of an example packed into one row (``evaluation._packs``), rows padded to the
    scoring buckets in fixed batches; lm-eval: one row per request, padded to its batch's longest.
    """
    from flexora_jax import evaluation
    from flexora_jax.data import bucket_of

    windows, _ = evaluation.request_windows(tokenizer, requests, max_length)
    lengths = np.array([len(p) + len(c) - 1 for p, c in windows])
    packs = sorted((p.length for p in evaluation._packs(windows, max_length, True)), reverse=True)
    buckets = evaluation.score_buckets(max_length)
    ours = 0
    bucket_use: dict[int, int] = {}
    for i in range(0, len(packs), batch_size):
        width = bucket_of(packs[i], buckets)
        bucket_use[width] = bucket_use.get(width, 0) + 1
        ours += batch_size * width  # fixed batch: the last one is padded with empty rows
    order = np.sort(lengths)[::-1]
    lm = sum(len(order[i : i + batch_size]) * int(order[i]) for i in range(0, len(order), batch_size))
    real = int(lengths.sum())
    return {
        "requests": len(requests),
        "rows_packed": len(packs),
        "real_tokens": real,
        "mean_len": float(lengths.mean()),
        "p50_len": float(np.median(lengths)),
        "max_len": int(lengths.max()),
        "truncated": int(np.sum(lengths >= max_length)),
        "ours_padded_tokens": int(ours),
        "lm_eval_padded_tokens": int(lm),
        "ours_padding_ratio": ours / real,
        "lm_eval_padding_ratio": lm / real,
        "batches_per_bucket": {str(k): v for k, v in sorted(bucket_use.items())},
    }


def measure(
    tasks_: tuple[str, ...],
    n: int,
    batch_size: int,
    repeats: int,
    threads: list[int] | None = None,
    data_dir: str | None = None,
) -> dict[str, Any]:
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from flexora_jax import evaluation

    for name in ("lm_eval", "lm-eval", "lm_eval.models.huggingface"):
        logging.getLogger(name).setLevel(logging.ERROR)  # one truncation warning per long request otherwise
    config, params, tokenizer, hf_dir = tinystories(data_dir)
    requests, per_task = build_requests(tasks_, n, data_dir)
    max_length = config.max_position_embeddings
    lm = HFLM(pretrained=str(hf_dir), device="cpu", batch_size=batch_size, max_length=max_length)
    instances = [Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i) for i, r in enumerate(requests)]

    def ours():
        return evaluation.loglikelihoods(
            config, params, tokenizer, requests, batch_size=batch_size, max_length=max_length, progress=False
        )

    # Cold: tracing + compiling every bucket's program + one pass (the persistent cache is not used here).
    evaluation._score_packed.clear_cache()
    t0 = time.perf_counter()
    got = ours()
    cold_s = time.perf_counter() - t0
    programs = evaluation._score_packed._cache_size()

    def lm_fn(n_threads):
        def fn():
            torch.set_num_threads(n_threads)
            return lm.loglikelihood(instances, disable_tqdm=True)

        return fn

    cores = os.cpu_count() or 1
    fns = {"flexora_jax": ours}
    for t in sorted(set(threads or [cores, 1]), reverse=True):
        fns[f"lm_eval_{t}t"] = lm_fn(t)
    ref = fns[next(k for k in fns if k != "flexora_jax")]()
    ref_ll = np.array([o[0] for o in ref])
    max_diff = float(np.max(np.abs(got.logprob - ref_ll)))
    greedy_agree = float(np.mean(got.is_greedy == np.array([o[1] for o in ref])))
    timings = harness.interleaved(fns, repeats, warmup=0)  # ours is warm (cold pass above); torch needs none
    torch.set_num_threads(cores)
    jax_t = timings.pop("flexora_jax")
    best = min(timings, key=lambda k: timings[k]["median_s"])
    n_req = len(requests)
    warm_cps = n_req / jax_t["median_s"]
    cold_cps = n_req / cold_s
    ref_cps = n_req / timings[best]["median_s"]
    return {
        "tasks": per_task,
        "n_per_task": n,
        "batch_size": batch_size,
        "max_length": max_length,
        "requests": n_req,
        "tokens": token_stats(tokenizer, requests, max_length, batch_size),
        "max_abs_loglikelihood_diff": max_diff,
        "is_greedy_agreement": greedy_agree,
        "flexora_jax": {
            **jax_t,
            "choices_per_s": warm_cps,
            "cold_s": cold_s,
            "cold_choices_per_s": cold_cps,
            "compile_s_estimate": cold_s - jax_t["median_s"],
            "compiled_programs": programs,
        },
        "lm_eval_variants": {k: {**v, "choices_per_s": n_req / v["median_s"]} for k, v in timings.items()},
        "lm_eval": {**timings[best], "variant": best, "choices_per_s": ref_cps},
        "speedup": warm_cps / ref_cps,
        "speedup_with_compile": cold_cps / ref_cps,
    }


def run(
    smoke: bool = False,
    out_dir: str | None = None,
    command: str | None = None,
    n: int = 200,
    batch_size: int = 32,
    repeats: int = 2,
    tasks_: tuple[str, ...] | None = None,
    threads: list[int] | None = None,
    data_dir: str | None = None,
) -> dict[str, Any]:
    """Measure; writes ``eval.json`` (``eval_smoke.json`` in smoke mode) and returns the payload."""
    begin = harness.start(smoke)
    if smoke:
        tasks_, n, batch_size, repeats, threads = tasks_ or SMOKE_TASKS, 4, 8, 1, threads or [1]
    row = measure(tuple(tasks_ or TASKS), n, batch_size, repeats, threads, data_dir)
    payload = {
        "command": command or "python -m benchmarks.bench_eval" + (" --smoke" if smoke else ""),
        "model": "tinystories260k (hidden 64, 5 layers, 8 heads / 4 KV heads, head_dim 8, vocab 512, context 512)",
        "rows": [row],
    }
    harness.write_result("eval_smoke" if smoke else "eval", payload, out_dir, start=begin)
    return payload


def table(d: dict[str, Any]) -> str:
    """The Markdown table of an ``eval.json`` payload (for RESULTS.md)."""
    lines = [
        "| requests (n/task x tasks) | batch | flexora_jax choices/s warm (cold, incl. compile) | "
        "lm-eval HFLM choices/s | speedup warm (incl. compile) | compile s | padded tokens ours / lm-eval "
        "| max abs ll diff | command | date | machine |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    m = d["machine"]
    for r in d["rows"]:
        j, t, tok = r["flexora_jax"], r["lm_eval"], r["tokens"]
        lines.append(
            f"| {r['requests']} ({r['n_per_task']} x {', '.join(r['tasks'])}) | {r['batch_size']} | "
            f"{j['choices_per_s']:.1f} ({j['cold_choices_per_s']:.1f}) | {t['choices_per_s']:.1f} "
            f"[{t['variant']}] | **{r['speedup']:.2f}x** ({r['speedup_with_compile']:.2f}x) | "
            f"{j['compile_s_estimate']:.1f} | {tok['ours_padded_tokens']} / {tok['lm_eval_padded_tokens']} | "
            f"{r['max_abs_loglikelihood_diff']:.1e} | `{d['command']}` | {m['date']} | "
            f"{m['cpu']}, {m['cpu_count']} cores, {harness.load_text(d)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="4 examples of 2 tasks, seconds (what the tests run)")
    p.add_argument("--n", type=int, default=200, help="test examples per task")
    p.add_argument("--tasks", nargs="*", default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, nargs="*", default=None, help="torch thread counts (default: cores and 1)")
    p.add_argument("--out-dir", default=None)
    a = p.parse_args(argv)
    out = run(
        a.smoke,
        a.out_dir,
        harness.command_line("benchmarks.bench_eval", argv),
        a.n,
        a.batch_size,
        a.repeats,
        tuple(a.tasks) if a.tasks else None,
        a.threads,
    )
    print(table({"machine": harness.machine_info(), **out}))


if __name__ == "__main__":
    main()

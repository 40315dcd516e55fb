"""The GPU path, checkable on a bare single-GPU machine: torch and transformers, no vLLM, Ray, pytest or internet.

    python tests/gpu/checks.py                 # on the GPU: every check, a JSON line each, exit 1 if one failed
    python tests/gpu/checks.py --device cpu    # the same code over gloo on the CPU (a dry run of the checks)

It needs this checkout and the warm tiny policy (``.cache/warm``, 4 MB: carried along, since the machine cannot
build it). Checks:

- ``fsdp2_bf16``: the policy trainer sharded with FSDP2 over a one-rank process group (nccl on CUDA), bf16
  compute with fp32 master weights, gradient checkpointing; two SFT steps on trajectories with page images stay
  finite and lower the NLL.
- ``logprobs_vs_fp32``: the sharded bf16 trainer's log-probs of those trajectories against a plain fp32 forward of
  the same weights, within bf16's precision.
- ``maxsim``: exact MaxSim scores on the device against the CPU for 2,000 random pages, and the same top 10.
- ``faiss_gpu``: with FAISS's GPU build installed, an IVF shard index moved to the GPU by the retriever's loader
  finds the same token neighbours as on the CPU, and approximate search returns the same top 10 (reported absent
  without faiss or its GPU build).
- ``flash_attention``: with flash-attn installed, its log-probs against SDPA's (otherwise reported as absent).
- ``offpolicy_step``: a GRPO step trained one version stale, as sampling ahead trains (``algo.max_staleness=1``):
  behaviour log-probs from the sharded bf16 trainer before an update, the step's own (proximal) pass after it,
  truncated token importance weights between them (``algo.is_level=token``); the off-policy metrics the job logs,
  finite, and the step's seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import vrag_rl  # noqa: E402,F401  (the torchvision hook)
from vrag_rl.agent.chat import ChatEncoder  # noqa: E402
from vrag_rl.agent.prompt import PromptConfig, build_reference_messages  # noqa: E402
from vrag_rl.agent.trajectory import Trajectory  # noqa: E402
from vrag_rl.learner.batch import forward_logprobs  # noqa: E402
from vrag_rl.learner.config import OptimConfig, TrainerConfig  # noqa: E402
from vrag_rl.learner.payloads import Batch, Objective, RankShare  # noqa: E402
from vrag_rl.learner.policy import PolicyTrainer  # noqa: E402
from vrag_rl.retrieval.maxsim import maxsim, pad_queries, plan_chunks  # noqa: E402

POLICY = Path(os.environ.get("VRAG_RL_CACHE", ROOT / ".cache")) / "warm"
PAGES = ROOT / "data" / "synthetic-small" / "pages"
ANSWERS = ["Muxford", "40", "Rosur Noril", "9"]


def trajectories(policy: Path, logprobs: list[torch.Tensor] | None = None) -> list[Trajectory]:
    """One page shown with a question, then an answer turn: four of them, with images (as training sees them);
    ``logprobs``: the answer turns' sampled log-probs."""
    from transformers import AutoProcessor

    encoder = ChatEncoder(AutoProcessor.from_pretrained(policy))
    out = []
    for k, (page, answer) in enumerate(zip(sorted(PAGES.glob("*.jpg"))[:4], ANSWERS)):
        with Image.open(page) as im:
            image = im.convert("RGB").resize((224, 308))
        encoded = encoder.encode_images([image])
        messages = build_reference_messages(f"Question {k}: what does the page say?", 1, PromptConfig())
        ids, enc = encoder.prompt(messages, encoded.images)
        t = Trajectory()
        t.add_prompt(ids, enc.images, enc.pixel_values, enc.grids)
        reply = encoder.tokenizer(f"<think>It is on the page.</think>\n<answer>{answer}</answer>")["input_ids"]
        t.add_model_turn(reply + [encoder.eos_token_id], None if logprobs is None else logprobs[k].tolist())
        out.append(t)
    return out


def start_group(device: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)


def sharded_config(device: str, attn: str = "sdpa") -> TrainerConfig:
    return TrainerConfig(
        num_gpus=1 if device == "cuda" else 0,
        param_dtype="bfloat16",
        gradient_checkpointing=True,
        attn_implementation=attn,
        optim=OptimConfig(lr=1e-3, warmup_steps=0),
    )


def sharded_trainer(device: str, attn: str = "sdpa") -> PolicyTrainer:
    return PolicyTrainer.for_model(str(POLICY), sharded_config(device, attn), Objective(), total_steps=10)


def whole(batch: list[Trajectory]) -> RankShare:
    """The batch as one rank's share: one micro-batch of all of it."""
    everything = list(range(len(batch)))
    return RankShare(Batch(batch), [(everything, 1.0)], everything, Batch(batch).response_tokens)


def check_fsdp2_bf16(device: str, batch: list[Trajectory]) -> dict:
    trainer = sharded_trainer(device)
    assert trainer.sharded and trainer.world_size == 1
    first = trainer.sft_update(whole(batch))
    trainer.end_step()
    second = trainer.sft_update(whole(batch))
    assert all(np.isfinite(v) for v in (*first.values(), *second.values())), (first, second)
    assert second["nll"] < first["nll"], (first["nll"], second["nll"])
    return {"nll": [first["nll"], second["nll"]], "grad_norm": first["grad_norm"]}


def check_logprobs_vs_fp32(device: str, batch: list[Trajectory]) -> dict:
    from transformers import AutoModelForImageTextToText

    trainer = sharded_trainer(device)
    bf16 = trainer.logprobs(whole(batch))
    fp32_model = AutoModelForImageTextToText.from_pretrained(POLICY, dtype=torch.float32).to(device).eval()
    data = {k: v.to(device) for k, v in trainer._batch(batch).items()}
    with torch.no_grad():
        logp = forward_logprobs(fp32_model, data, 1.0, False, trainer.banned).float().cpu()
    fp32 = [logp[i][data["response_mask"][i].bool().cpu()] for i in range(len(batch))]
    diffs = torch.cat([(a - b).abs() for a, b in zip(bf16, fp32)])
    assert diffs.mean() < 0.05 and diffs.max() < 0.5, (float(diffs.mean()), float(diffs.max()))
    return {"mean_abs_diff": float(diffs.mean()), "max_abs_diff": float(diffs.max()), "tokens": int(diffs.numel())}


def check_offpolicy_step(device: str, batch: list[Trajectory]) -> dict:
    from vrag_rl.algo.config import AlgoConfig
    from vrag_rl.job.step import add_logprobs
    from vrag_rl.learner.trainer import LocalTrainer

    algo = AlgoConfig(kl_coef=0.0, is_level="token")
    trainer = LocalTrainer(sharded_config(device), str(POLICY), Objective(algo), total_steps=10)
    stale = trajectories(POLICY, trainer.logprobs(batch))  # sampled by version 0
    trainer.sft_update(batch)
    trainer.end_step()  # the trainer at version 1
    sync()
    t0 = time.perf_counter()
    inputs = Batch(stale, [1.0, -1.0, 1.0, -1.0])
    offpolicy = add_logprobs(inputs, trainer, algo)
    update = trainer.grpo_update(inputs)
    trainer.end_step()
    sync()
    seconds = time.perf_counter() - t0
    assert all(np.isfinite(v) for v in (*offpolicy.values(), *update.values())), (offpolicy, update)
    assert offpolicy["mismatch_token_abs_mean"] > 0 and 0 < offpolicy["is_ess"] <= 1, offpolicy  # a real gap
    assert trainer.weights_finite()
    return {"step_s": round(seconds, 3), "pg_loss": update["pg_loss"], **{k: round(v, 4) for k, v in offpolicy.items()}}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def random_pages(seed: int) -> tuple[np.ndarray, torch.Tensor, list[torch.Tensor]]:
    """Token counts and unit token vectors (d=128) of 2,000 random pages, and 16 queries of 20 tokens."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(40, 120, (2000,), generator=gen).numpy()
    vectors = torch.nn.functional.normalize(torch.randn(int(lengths.sum()), 128, generator=gen), dim=-1)
    queries = [torch.nn.functional.normalize(torch.randn(20, 128, generator=gen), dim=-1) for _ in range(16)]
    return lengths, vectors, queries


def check_maxsim(device: str) -> dict:
    lengths, vectors, queries = random_pages(0)
    chunks = plan_chunks(lengths, 65_536)
    cpu = maxsim(vectors, chunks, len(lengths), pad_queries(queries, 128))
    on_device = maxsim(vectors.to(device), chunks, len(lengths), pad_queries(queries, 128, device)).cpu()
    torch.testing.assert_close(on_device, cpu, atol=1e-4, rtol=1e-5)
    same = [
        set(cpu[:, q].topk(10).indices.tolist()) == set(on_device[:, q].topk(10).indices.tolist()) for q in range(16)
    ]
    assert all(same), same
    return {"pages": len(lengths), "max_abs_diff": float((on_device - cpu).abs().max())}


def check_faiss_gpu(device: str) -> dict:
    """IVF candidates from FAISS's GPU build against its CPU build: the same neighbours, the same reranked pages."""
    from vrag_rl.retrieval import approx
    from vrag_rl.retrieval.types import IndexConfig, Shard

    try:
        faiss = approx.import_faiss()
    except ImportError:
        return {"skipped": "faiss is not installed"}
    if device == "cuda" and (not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1):
        return {"skipped": "this FAISS has no GPU support"}
    import tempfile

    lengths, vectors, queries = random_pages(1)
    queries = pad_queries(queries, 128)
    cfg = IndexConfig(ivf_codec="Flat", nlist=256, nprobe=16, k_tokens=256, n_rerank=64)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shard.faiss"
        approx.build_and_save(vectors.numpy(), cfg, path)
        cpu_index, gpu_index = approx.load(path, "cpu"), approx.load(path, device)  # on the CPU: a dry run
    assert device == "cpu" or not isinstance(gpu_index, type(cpu_index)), type(gpu_index)
    rows = queries.reshape(-1, 128).numpy()
    cpu_sims, cpu_ids = cpu_index.search(rows, cfg.k_tokens, params=approx._params(cpu_index, cfg))
    gpu_sims, gpu_ids = gpu_index.search(rows, cfg.k_tokens, params=approx._params(gpu_index, cfg))
    np.testing.assert_allclose(gpu_sims, cpu_sims, atol=1e-4)
    overlap = np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(cpu_ids, gpu_ids)])
    assert overlap > 0.999, overlap  # only ties at the k-th similarity may differ
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    positions = np.arange(len(lengths))
    chunks = plan_chunks(lengths, cfg.chunk_tokens)
    pages = []
    for index, where in ((cpu_index, "cpu"), (gpu_index, device)):
        shard = Shard(0, vectors.to(where), positions, offsets, chunks, index)
        pages.append([ids.tolist() for ids, _ in approx.search(shard, queries.to(where), cfg, 10)])
    assert pages[0] == pages[1], pages
    return {"index": type(gpu_index).__name__, "neighbour_overlap": float(overlap), "queries": len(pages[0])}


def check_flash_attention(device: str, batch: list[Trajectory]) -> dict:
    import importlib.util

    if device != "cuda" or importlib.util.find_spec("flash_attn") is None:
        return {"skipped": "flash-attn is not installed" if device == "cuda" else "flash-attn 2 needs CUDA"}
    plan = [(list(range(len(batch))), 1.0)]
    sdpa = sharded_trainer(device, "sdpa").logprobs(batch, plan, 1.0)
    flash = sharded_trainer(device, "flash_attention_2").logprobs(batch, plan, 1.0)
    diffs = torch.cat([(a - b).abs() for a, b in zip(sdpa, flash)])
    assert diffs.max() < 0.1, float(diffs.max())
    return {"max_abs_diff_vs_sdpa": float(diffs.max())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    device = p.parse_args().device
    if device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device"}))
        return 1
    info = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
    print(json.dumps(info), flush=True)
    start_group(device)
    batch = trajectories(POLICY)
    checks = {
        "fsdp2_bf16": lambda: check_fsdp2_bf16(device, batch),
        "logprobs_vs_fp32": lambda: check_logprobs_vs_fp32(device, batch),
        "maxsim": lambda: check_maxsim(device),
        "faiss_gpu": lambda: check_faiss_gpu(device),
        "flash_attention": lambda: check_flash_attention(device, batch),
        "offpolicy_step": lambda: check_offpolicy_step(device, batch),
    }
    failed = 0
    for name, check in checks.items():
        t0 = time.perf_counter()
        try:
            found = check()
            result = {"check": name, "ok": "skipped" if "skipped" in found else True, **found}
        except Exception as err:  # every check reports, whatever the first one did
            failed += 1
            result = {"check": name, "ok": False, "error": f"{type(err).__name__}: {err}"}
        print(json.dumps(result | {"seconds": round(time.perf_counter() - t0, 2)}), flush=True)
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

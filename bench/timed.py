"""The simulated GPUs of ``bench/projection.py``: a timing model of Qwen2.5-VL-7B on H100s (``TimingModel``), rollout
engines that batch continuously and sleep each scheduler step (``TimedEngine``), a search that adds the retriever's
latency, trainer ranks that sleep each pass (``TimedTrainer``), and the rollout workers on threads as the job's
pool runs them on Ray (``Pool``: calls in order, or weight updates beside a running batch). Sleeps are simulated
seconds times ``Clock.scale``."""

from __future__ import annotations

import math
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import torch

import vrag_rl  # noqa: F401  (torchvision shim first)
from vrag_rl.agent.chat import ChatEncoder
from vrag_rl.learner.payloads import Batch
from vrag_rl.rollout.agent_loop import AgentLoop
from vrag_rl.rollout.engine import Generation, RolloutEngine
from vrag_rl.rollout.records import derive_seed
from vrag_rl.rollout.worker import WeightSync, in_task_order, split_by_group

RECORDED_MAX_TOKENS = 96  # the tiny recipe's turn limit, which the replayed turns were sampled under


@dataclass
class TimingModel:
    # NVIDIA H100 SXM5 datasheet: 989.4 TFLOP/s dense bf16, 3.35 TB/s HBM3
    peak_flops: float = 989.4e12
    hbm_bytes_per_s: float = 3.35e12
    # Qwen2.5-VL-7B-Instruct's config.json: 28 layers, 4 KV heads of 128 dims; 7.6e9 language-model parameters and a
    # 0.67e9-parameter vision encoder (8.3e9 in all)
    llm_params: float = 7.6e9
    vision_params: float = 0.67e9
    kv_bytes_per_token: float = 28 * 2 * 4 * 128 * 2  # layers x (K, V) x heads x dims x bf16 bytes
    image_tokens: int = 512  # per page or crop at the recipe's image budget (max_pixels = 512 x 28 x 28)
    patches_per_image_token: int = 4  # the vision encoder runs on 14 x 14 patches, merged 2 x 2 into a token
    # Assumptions, not measured here: decode reads at 70% of HBM bandwidth, prefill runs at 50% of peak, a vLLM
    # scheduler step costs 3 ms of CPU besides, prefill chunks of 8192 tokens
    decode_bandwidth_eff: float = 0.7
    prefill_mfu: float = 0.5
    step_overhead_s: float = 0.003
    prefill_chunk: int = 8192
    # Trainer MFU 40%: the Llama 3 paper reports 38-43% bf16 MFU for its training on H100s
    train_mfu: float = 0.4
    sync_bytes_per_s: float = 5e9  # the weights from the trainer ranks through the object store to the engines
    search_base_s: float = 0.05  # a search batch's fixed cost
    search_per_query_s: float = 0.022  # bench/README.md: ~11 q/s per 2-core shard at 100k pages; 4 shards

    @property
    def params(self) -> float:
        return self.llm_params + self.vision_params

    def engine_step_s(self, decoding: int, context_tokens: int, prefill_tokens: int, image_tokens: int) -> float:
        memory = (2 * self.llm_params + context_tokens * self.kv_bytes_per_token) / (
            self.hbm_bytes_per_s * self.decode_bandwidth_eff
        )
        flops = 2 * self.llm_params * (decoding + prefill_tokens)
        flops += 2 * self.vision_params * image_tokens * self.patches_per_image_token
        return max(memory, flops / (self.peak_flops * self.prefill_mfu)) + self.step_overhead_s

    def sync_s(self) -> float:
        return 2 * self.params / self.sync_bytes_per_s

    def search_s(self, queries: int) -> float:
        return self.search_base_s + self.search_per_query_s * queries


class Clock:
    """Simulated seconds, slept scaled; busy time per GPU kind."""

    def __init__(self, scale: float):
        self.scale = scale
        self.lock = threading.Lock()
        self.busy = {"rollout": 0.0, "trainer": 0.0}

    def spend(self, kind: str, seconds: float, gpus: int = 1) -> None:
        time.sleep(seconds * self.scale)
        with self.lock:
            self.busy[kind] = self.busy.get(kind, 0.0) + seconds * gpus

    def now(self) -> float:
        return time.perf_counter() / self.scale


def scaled_tokens(n: int, limit: int) -> int:
    return min(limit, math.ceil(n * limit / RECORDED_MAX_TOKENS))


@dataclass
class Turn:
    """A turn under way on a ``TimedEngine``, in the 7B recipe's tokens."""

    key: object
    generation: Generation
    prefill: int  # new prompt tokens still to prefill (the rest of the context is cached)
    images: int  # new images in them, for the vision encoder
    decode: int  # tokens still to decode
    context: int  # tokens in the KV cache


class TimedEngine(RolloutEngine):
    """One rollout GPU: replays recorded turns, batching continuously, each scheduler step slept as long as the
    timing model says; ``advance`` runs steps until a turn finishes (at most ``max_jump`` steps, so that turns
    arriving meanwhile wait for no more than that)."""

    def __init__(self, recorded, encoder: ChatEncoder, model: TimingModel, clock: Clock, limit: int, max_jump=16):
        self.recorded, self.tokenizer, self.model, self.clock = recorded, encoder.tokenizer, model, clock
        self.image_token_id, self.limit, self.max_jump = encoder.image_token_id, limit, max_jump
        self.stop_token_ids = [self.tokenizer.convert_tokens_to_ids("<|im_end|>")]
        self.turn_of: dict[int, tuple[int, int]] = {}  # per-turn seed -> (task seed, turn)
        self.seen: dict[int, tuple[int, int, int]] = {}  # task seed -> (text tokens, images, context) in the cache
        self.under_way: list[Turn] = []

    def expect(self, tasks) -> None:
        for task in tasks:
            for turn in range(1, 8):
                self.turn_of[derive_seed(task.seed, turn)] = (task.seed, turn)

    def _replay(self, task_seed: int, turn: int) -> tuple[str, int]:
        turns = self.recorded[task_seed % len(self.recorded)]
        if turn - 1 < len(turns):
            return turns[turn - 1]["text"], turns[turn - 1]["tokens"]
        return "<answer>unknown</answer><|im_end|>", 8  # the replayed trajectory had ended: answer

    def advance(self, new, sampling):
        for key, r in new:
            task_seed, turn = self.turn_of[r.seed]
            text, tokens = self._replay(task_seed, turn)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            finish = "stop" if ids and ids[-1] in self.stop_token_ids else "length"
            seen_text, seen_images, context = self.seen.get(task_seed, (0, 0, 0))
            text_now = sum(1 for i in r.prompt_ids if i != self.image_token_id)
            images = len(r.images) - seen_images
            prefill = text_now - seen_text + images * self.model.image_tokens
            decode = scaled_tokens(tokens, self.limit)
            self.seen[task_seed] = (text_now + len(ids), len(r.images), context + prefill + decode)
            self.under_way.append(
                Turn(key, Generation(ids, [0.0] * len(ids), finish), prefill, images, decode, context)
            )
        done, spent = [], 0.0
        for _ in range(self.max_jump):
            if not self.under_way or done:
                break
            spent += self._step(done)
        self.clock.spend("rollout", spent)
        return done

    def _step(self, done: list) -> float:
        """One scheduler step: prefill chunks first, one token for every turn past its prefill; its seconds."""
        prefilled, image_tokens, decoding, context = 0, 0, 0, 0
        for turn in self.under_way:
            if turn.prefill > 0:
                take = min(turn.prefill, self.model.prefill_chunk - prefilled)
                turn.prefill, turn.context, prefilled = turn.prefill - take, turn.context + take, prefilled + take
                if turn.prefill == 0:
                    image_tokens += turn.images * self.model.image_tokens
            else:
                turn.decode, turn.context, decoding = turn.decode - 1, turn.context + 1, decoding + 1
                context += turn.context
        for turn in [t for t in self.under_way if t.prefill == 0 and t.decode <= 0]:
            self.under_way.remove(turn)
            done.append((turn.key, turn.generation))
        return self.model.engine_step_s(decoding, context, prefilled, image_tokens)

    @property
    def running(self) -> int:
        return len(self.under_way)

    def abort(self, key) -> None:
        self.under_way = [turn for turn in self.under_way if turn.key is not key]

    def generate(self, requests, sampling):
        raise NotImplementedError("the projection runs the per-trajectory loop only")

    def update_weights(self, named_tensors) -> int:
        for _ in named_tensors:
            pass
        self.clock.spend("rollout", self.model.sync_s())
        return int(2 * self.model.params)


class TimedSearch:
    """BM25 over the bundled corpus, answering after the retriever's latency."""

    def __init__(self, retriever, model: TimingModel, clock: Clock):
        self.retriever, self.model, self.clock = retriever, model, clock

    def search(self, queries, top_k, mode):
        time.sleep(self.model.search_s(len(queries)) * self.clock.scale)
        return self.retriever.search(queries, top_k=top_k, mode=mode)

    def page_path(self, page_id):
        return self.retriever.page_path(page_id)


def settle(future: Future, fn) -> None:
    """``fn()``'s result, or its exception, into ``future``."""
    try:
        future.set_result(fn())
    except BaseException as err:  # noqa: BLE001 (handed to the caller)
        future.set_exception(err)


def on_thread(fn) -> Future:
    future: Future = Future()
    threading.Thread(target=settle, args=(future, fn), daemon=True).start()
    return future


class Worker(threading.Thread):
    """One rollout worker: batches and weight updates in the order given, as a Ray actor runs its calls."""

    def __init__(self, loop: AgentLoop, engine: TimedEngine):
        super().__init__(daemon=True)
        self.loop, self.engine, self.calls = loop, engine, queue.Queue()
        self.start()

    def run(self) -> None:
        while True:
            call, future = self.calls.get()
            settle(future, call)

    def call(self, fn) -> Future:
        future: Future = Future()
        self.calls.put((fn, future))
        return future

    def rollout(self, tasks, sampling):
        self.engine.expect(tasks)
        return self.loop.run(tasks, sampling)

    def update(self, version: int) -> int:
        return self.loop.update_weights(iter(()), version, timeout_s=600)


@dataclass
class Pool:
    """The rollout workers as ``RolloutBackend``: in-order calls, or weight updates beside a running batch
    (``partial``) at its next turn boundary."""

    workers: list[Worker]
    partial: bool

    def submit(self, tasks, sampling):
        chunks = split_by_group(tasks, len(self.workers))
        futures = [
            w.call(lambda w=w, c=c: w.rollout([tasks[i] for i in c], sampling)) for w, c in zip(self.workers, chunks)
        ]
        return PoolResult(len(tasks), chunks, futures)

    def rollout(self, tasks, sampling):
        return self.submit(tasks, sampling).result()

    def update_weights(self, buckets, version: int) -> WeightSync:
        for _ in buckets:
            pass
        t0 = time.perf_counter()
        if self.partial:  # on threads of their own, as the worker actors' "weights" concurrency group
            futures = [on_thread(lambda w=w: w.update(version)) for w in self.workers]
        else:
            futures = [w.call(lambda w=w: w.update(version)) for w in self.workers]
        nbytes = [f.result() for f in futures][0]
        return WeightSync(time.perf_counter() - t0, nbytes)


@dataclass
class PoolResult:
    size: int
    chunks: list[list[int]]
    futures: list[Future]

    def result(self):
        return in_task_order(self.size, self.chunks, [f.result() for f in self.futures])


class TimedTrainer:
    """The trainer GPUs (``learner.trainer.Trainer``): each pass sleeps the timing model's time for its tokens."""

    def __init__(self, model: TimingModel, clock: Clock, gpus: int, limit: int, image_token_id: int):
        self.model, self.clock, self.gpus, self.limit, self.image_token_id = model, clock, gpus, limit, image_token_id
        self.tokens_trained = 0

    def tokens(self, trajectories) -> int:
        """Tokens at the 7B recipe's scale: scaled turns, images at the recipe's budget, the rest as recorded."""
        total = 0
        for t in trajectories:
            responses = sum(scaled_tokens(n, self.limit) for n in t.turn_lengths)
            text = sum(1 for i in t.input_ids if i != self.image_token_id) - sum(t.response_mask)
            total += responses + text + len(t.images) * self.model.image_tokens
        return total

    def logprobs(self, trajectories, reference=False):
        self.clock.spend("trainer", 2 * self.model.params * self.tokens(trajectories) / self._flops(), self.gpus)
        return [torch.zeros(sum(t.response_mask)) for t in trajectories]

    def grpo_update(self, batch: Batch) -> dict[str, float]:
        tokens = self.tokens(batch.trajectories)
        self.tokens_trained += tokens
        self.clock.spend("trainer", 8 * self.model.params * tokens / self._flops(), self.gpus)
        return {"skipped_updates": 0.0, "loss": 0.0}

    def _flops(self) -> float:
        return self.gpus * self.model.train_mfu * self.model.peak_flops

    def end_step(self) -> float:
        return 1e-6

    def weights_finite(self) -> bool:
        return True

    def weight_buckets(self, bucket_bytes: int):
        yield {}

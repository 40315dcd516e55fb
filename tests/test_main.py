"""The main job as users run it: ``python -m vrag_rl.main +recipe=tiny_cpu`` in a subprocess, shortened.

One straight run of 2 GRPO steps (real Ray cluster, vLLM CPU rollout worker, retriever and reward actors, two
FSDP2 trainer ranks), and the same run killed during checkpoint saves and resumed: metrics and final weights
equal; batches sampled ahead, killed with batches under way and resumed; the same job on DeepSpeed ZeRO-3 ranks.
The policy starts from the warm-started tiny policy, so that rollouts search and crop and updates move weights.
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # runs the main job (Ray, vLLM, FSDP) in subprocesses

ROOT = Path(__file__).resolve().parents[1]
SHORT = [
    "+recipe=tiny_cpu",
    "sft.steps=0",
    "algo.prompts_per_step=2",
    "algo.group_size=2",
    "run.val_every=2",
    "run.save_every=1",
    "sampling.max_tokens=64",
]


def job_args(warm_policy, tiny_dirs) -> list[str]:
    """The short tiny run from the warm policy, searching by reciprocal rank fusion of BM25, ColQwen2 and the
    kit's single-vector CLIP index."""
    tiny = tiny_dirs["policy"].parent
    dense = [f"models.dense={tiny_dirs['clip']}", "rollout.agent.search_mode=hybrid"]
    return [*SHORT, f"models.policy={warm_policy}", f"models.tiny_dir={tiny}", *dense]


def run_main(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vrag_rl.main", *overrides], cwd=ROOT, capture_output=True, text=True, timeout=900
    )


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [
        {k: v for k, v in r.items() if not k.startswith(("time/", "perf/tokens", "perf/weight_sync_s"))} for r in rows
    ]


def weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "export" / "model.safetensors")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, warm_policy, tiny_dirs):
    out = tmp_path_factory.mktemp("straight")
    proc = run_main(*job_args(warm_policy, tiny_dirs), "run.steps=2", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


def test_run_writes_metrics_checkpoints_plot_wandb_and_export(straight):
    out, proc = straight
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for key in (
        "train/reward",
        "train/ndcg",
        "train/invalid_rate",
        "actor/entropy",
        "actor/grad_norm",
        "actor/pg_clipfrac",
        "perf/weight_sync_bytes",
        "val/reward",
        "val/synthetic/reward",
        "val/table/overall_questions/f1",  # the evaluation report's Table 1 cells, from the evaluation's code
        "val/table/overall_datasets/ndcg@10",
    ):
        assert key in rows[-1], key
    assert any(k.startswith("val/table/synthetic/") for k in rows[-1])
    assert rows[0]["train/searches"] > 0 and rows[0]["actor/grad_norm"] > 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert "GRPO steps" in proc.stdout and (out / "summary.json").exists()
    assert "retriever modes: visual, text, dense, hybrid" in proc.stderr + proc.stdout


def test_a_kill_during_a_save_then_a_resume_reproduce_the_straight_run(straight, tmp_path, warm_policy, tiny_dirs):
    """SIGKILL once step 2's checkpoint is committed and before anything was pruned or exported after it (see
    ``kill_during_save.py``), then a resume: the run ends with the straight run's metrics and weights. (A save cut
    before its commit leaves a temporary folder that a resume ignores: ``job/test_checkpoint.py``.)"""
    out, _ = straight
    common = [*job_args(warm_policy, tiny_dirs), "run.steps=2", f"hydra.run.dir={tmp_path}"]
    checkpoints = tmp_path / "checkpoints"
    killed = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "kill_during_save.py"), "2", *common],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    assert not (tmp_path / "export").exists()
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000001", "step-000002"]
    resumed = run_main(*common)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stderr + resumed.stdout and "step 2" in resumed.stderr + resumed.stdout
    assert metrics(tmp_path) == metrics(out)
    got, want = weights(tmp_path), weights(out)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_other_settings_or_resume_false_in_a_used_directory_stop_at_start(straight, warm_policy, tiny_dirs):
    out, _ = straight
    logged = (out / "metrics.jsonl").read_text()
    common = job_args(warm_policy, tiny_dirs)
    other = run_main(*common, "run.steps=3", "algo.clip_high=0.28", f"hydra.run.dir={out}")
    assert other.returncode != 0 and "algo.clip_high: 0.2 -> 0.28" in other.stderr
    fresh = run_main(*common, "run.steps=3", "run.resume=false", f"hydra.run.dir={out}")
    assert fresh.returncode != 0 and "already holds a run" in fresh.stderr
    assert (out / "metrics.jsonl").read_text() == logged  # nothing of the run was touched
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]


def sampling_workers(pid: int) -> list:
    """The job's rollout worker processes that are inside a rollout call (Ray names the process after it)."""
    import psutil

    found = []
    try:
        for p in psutil.Process(pid).children(recursive=True):
            try:
                if "RolloutWorker.rollout" in " ".join(p.cmdline()):
                    found.append(p)
            except psutil.Error:  # gone meanwhile
                pass
    except psutil.Error:
        pass
    return found


def start_job(args: list[str], run_dir: Path, log: Path) -> subprocess.Popen:
    """The main job in the background, its output in ``log`` (a file, not a pipe nobody reads while the job runs)."""
    return subprocess.Popen(
        [sys.executable, "-m", "vrag_rl.main", *args, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )


def run_killing_a_sampling_worker(args: list[str], run_dir: Path, after_rows: int) -> tuple[int, str, int | None]:
    """The main job, with its rollout worker SIGKILLed once ``metrics.jsonl`` holds ``after_rows`` rows and the
    worker is inside a rollout call; the job's return code and output, and the pid killed."""
    import os

    log = run_dir.parent / f"{run_dir.name}-job.log"
    job = start_job(args, run_dir, log)
    killed, deadline, rows = None, time.monotonic() + 600, run_dir / "metrics.jsonl"
    while killed is None and job.poll() is None and time.monotonic() < deadline:
        logged = rows.is_file() and rows.read_text().count("\n") >= after_rows
        busy = sampling_workers(job.pid)
        if logged and busy:
            killed = busy[0].pid
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.02)
    job.wait(timeout=900)
    return job.returncode, log.read_text(), killed


def test_a_rollout_worker_killed_mid_step_costs_nothing(straight, tmp_path, warm_policy, tiny_dirs):
    """SIGKILL of the rollout worker while it samples step 2: Ray starts it again, the current weights are
    streamed in, the batch is sampled again, and the run ends with the straight run's metrics and weights."""
    out, _ = straight
    code, output, killed = run_killing_a_sampling_worker(
        [*job_args(warm_policy, tiny_dirs), "run.steps=2"], tmp_path, after_rows=1
    )
    assert killed is not None, "never saw step 2's rollout: " + output[-3000:]
    assert code == 0, output[-4000:]
    assert "sampling the batch again" in output
    assert metrics(tmp_path) == metrics(out)
    got, want = weights(tmp_path), weights(out)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_sampling_ahead_killed_with_batches_under_way_resumes_and_loses_no_group(tmp_path, warm_policy, tiny_dirs):
    """``algo.max_staleness=1`` with partial rollouts, a checkpoint at step 2; SIGKILL of the job while step 3
    samples (step 4's batch already submitted), a resume from step 2, and in the resumed run a SIGKILL of its rollout
    worker while step 3 or 4 samples. The ledger holds each step's questions as the sampler drew them, once each;
    step 2 trained on turns one version old, step 3 sampled after the checkpoint, and step 4's batch, lost with the
    worker, was sampled again with the newest weights."""
    from omegaconf import OmegaConf

    from vrag_rl.data.records import holdout_split, load_qa
    from vrag_rl.job.lookahead import read_ledger
    from vrag_rl.job.sampler import EpochSampler

    args = [a for a in job_args(warm_policy, tiny_dirs) if not a.startswith(("run.save_every", "run.val_every"))]
    args += ["algo.max_staleness=1", "rollout.partial=true", "run.steps=4", "run.save_every=2", "run.val_every=0"]
    log = tmp_path.parent / f"{tmp_path.name}-killed.log"
    job = start_job(args, tmp_path, log)
    deadline = time.monotonic() + 600
    while not ((tmp_path / "checkpoints" / "step-000002").is_dir() and sampling_workers(job.pid)):
        assert job.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    job.kill()
    job.wait(timeout=60)
    code, output, killed = run_killing_a_sampling_worker(args, tmp_path, after_rows=2)
    assert killed is not None and code == 0, output[-4000:]
    assert "resumed from" in output and "sampling the batch again" in output

    cfg = OmegaConf.load(tmp_path / ".hydra" / "config.yaml")  # the run's own settings
    train, _ = holdout_split(load_qa(cfg.data.corpus), cfg.data.holdout_every)
    train = train[: cfg.data.max_grpo_questions]  # what GRPO draws from
    sampler = EpochSampler(len(train), cfg.seed)
    want = [[train[i].qid for i in sampler.take(2)] for _ in range(4)]
    ledger = read_ledger(tmp_path / "ledger.jsonl")
    assert [e["step"] for e in ledger] == [1, 2, 3, 4] and [e["qids"] for e in ledger] == want
    assert [r["offpolicy/staleness_max"] for r in metrics(tmp_path)] == [0.0, 1.0, 0.0, 0.0]
    assert all(r["offpolicy/dropped_groups"] == 0 for r in metrics(tmp_path))


def test_the_export_serves_the_agent_behind_vllm_serve(straight, tmp_path, tiny_dirs, bundled_corpus, bundled_index):
    """The production shape, every part its own process on 127.0.0.1: the exported checkpoint under a real ``vllm
    serve``, the page search API, and ``python -m vrag_rl.serve`` in front of both (the policy as an endpoint, the
    export's own processor framing the turns, searches over HTTP), asked through the openai client."""
    from contextlib import ExitStack

    import openai
    from serve_process import ServeProcess

    from vrag_rl.vllm_server import ServerProcess, VLLMServer, free_port

    export = (straight[0] / "export").resolve()
    port = free_port("127.0.0.1")
    search = [sys.executable, "-m", "vrag_rl.retrieval.api", "--corpus", str(bundled_corpus), "--index"]
    search += [str(bundled_index), "--model", str(tiny_dirs["retriever"]), "--port", str(port)]
    with ExitStack() as stack:
        api = ServerProcess(search, f"http://127.0.0.1:{port}", tmp_path / "search.log", cwd=ROOT)
        stack.callback(api.stop)
        extra = ["--limit-mm-per-prompt", '{"image": 8}', "--seed", "0"]
        policy = VLLMServer(export, "export", tmp_path / "vllm.log", max_model_len=4096, extra_args=extra)
        stack.callback(policy.stop)
        args = ["--endpoint", policy.base_url(), "--endpoint-model", "export", "--processor", str(export)]
        args += ["--retriever-model", str(tiny_dirs["retriever"]), "--search-url", api.url]
        agent = ServeProcess(args, tmp_path / "serve.log")
        stack.callback(agent.stop)
        with openai.OpenAI(base_url=agent.url + "/v1", api_key="unused", max_retries=0, timeout=300) as client:
            question = [{"role": "user", "content": "Who founded Lagas Dynamics?"}]
            reply = client.chat.completions.create(model="vrag-agent", messages=question)
    result = reply.model_extra["vrag"]  # a result, not an error: every turn came from the endpoint
    assert result["type"] == "result" and result["turns"] and result["turns"][0]["action"] == "search"
    assert result["turns"][0]["views"], "the search API found a page"
    assert reply.choices[0].message.content == (result["answer"] or "")


def test_the_whole_job_runs_under_deepspeed_and_its_export_runs_on_vllm(tmp_path, warm_policy, tiny_dirs):
    """``trainer.backend=deepspeed`` (ZeRO-3, two gloo ranks) through the whole job: GRPO steps with weights
    streamed into the vLLM rollout engine, validation, checkpoints, export; the export runs the agent on
    vLLM (``vrag_rl.watch``). Resume under DeepSpeed is checked bit for bit in ``learner/test_zero.py``. Its
    steps are on-policy (one mini-batch) and take their old log-probs from the update (``old_logprobs=update``):
    no log-prob pass runs (there is no KL term either), and every ratio is exactly 1."""
    args = [*job_args(warm_policy, tiny_dirs), "trainer.backend=deepspeed", "algo.mini_batches=1"]
    args.append("algo.old_logprobs=update")
    proc = run_main(*args, "run.steps=2", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["actor/skipped_updates"] == 0.0
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["time/logprobs_s"] < 0.01 and r["actor/ppo_kl"] == 0.0 for r in logged)
    assert rows[-1]["actor/grad_norm"] > 0 and "val/reward" in rows[-1]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    assert (tmp_path / "checkpoints" / "step-000002" / "trainer" / "zero").is_dir()  # DeepSpeed's own format

    watch = [sys.executable, "-m", "vrag_rl.watch", "--policy", str(tmp_path / "export"), "--questions", "1"]
    proc = subprocess.run([*watch, "--out", str(tmp_path / "watch")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = [json.loads(line) for line in (tmp_path / "watch" / "trajectories.jsonl").read_text().splitlines()]
    assert record["turns"]


def test_bad_key_and_bad_value_fail_at_start_with_the_key_named(tmp_path):
    """As the command line shows them: an unknown key and an unknown recipe. The same schema's value checks run in
    this process through Hydra's compose (``tests/job/test_cleanup.py`` has the search mode a corpus lacks)."""
    from tests.job.test_cleanup import config

    proc = run_main("+recipe=tiny_cpu", f"hydra.run.dir={tmp_path}", "algo.no_such_key=1")
    assert proc.returncode != 0 and "no_such_key" in proc.stderr
    proc = run_main("+recipe=no_such_recipe", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0 and "no_such_recipe" in proc.stderr
    with pytest.raises(Exception, match="answer_metric"):
        config(["+recipe=tiny_cpu", "reward.answer_metric=vibes"])
    with pytest.raises(Exception, match="run.steps"):
        config(["+recipe=tiny_cpu", "run.steps=many"])
    assert not (tmp_path / "metrics.jsonl").exists()

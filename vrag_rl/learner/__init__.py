"""The learner: the policy being trained, on one process or on Ray ranks (FSDP2 or DeepSpeed ZeRO).

It takes typed values (``payloads``), computes log-probs and GRPO and SFT updates, saves and loads its state,
and hands out its weights as buckets of named tensors. It knows nothing of rollouts or of the job: the job's
controller streams those buckets into the rollout engines.
"""

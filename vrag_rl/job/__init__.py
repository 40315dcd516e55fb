"""The main job (``python -m vrag_rl.main``): the GRPO controller (``grpo``), its schema (``config``), the supervised
warm start (``sft``), checkpoints, tracking and plots, the multi-node watch, and the cached warm policy (``warm``)."""

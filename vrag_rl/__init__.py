"""vrag-rl: reinforcement learning for vision-language agents that search, crop and answer over page images."""

from vrag_rl import compat

compat.install()

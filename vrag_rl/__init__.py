"""vrag-rl: reinforcement learning for vision-language agents that search, crop and answer over page images.

Importing the package installs the torchvision import hook (``compat``), which must run before transformers
imports torchvision. ``make env`` also writes a ``.pth`` file that installs it in every interpreter of the
environment; this import covers installs made without it (``pip install -e '.[cpu]'``), where the processors of
transformers and colpali-engine would otherwise fail to import beside a CPU-only torch. The hook is lazy and
does nothing where torchvision imports normally (GPU machines).
"""

from vrag_rl import compat

compat.install()

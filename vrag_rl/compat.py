"""Make torchvision importable next to a CPU-only torch.

PyPI's torchvision wheels are CUDA builds; beside a ``torch+cpu`` their compiled extension does not load
and ``import torchvision`` dies in ``_meta_registrations`` with "operator torchvision::nms does not
exist". transformers' Qwen2.5-VL processor and colpali-engine only need torchvision's pure-Python parts,
so defining the two missing op schemas and importing again is enough; only ``torchvision.ops`` stays
unusable. Where torchvision imports normally (GPU machines) the first import succeeds and nothing else
happens.

``install()`` is lazy: it hooks the first ``import torchvision`` instead of importing torchvision (seconds)
up front. It runs from ``vrag_rl/__init__.py`` and, on CPU installs, from a ``.pth`` file in site-packages
(``write_pth()``, run by ``make env``), because processes that never import this package need
it too: vLLM inspects model classes in a fresh ``python -m vllm...`` subprocess, Ray starts workers.
"""

import importlib
import importlib.abc
import importlib.util
import sys

_MISSING_OP = "torchvision::nms does not exist"
_fragment = None  # the schema library must stay alive for the life of the process


class _TorchvisionImportHook(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finder for the first ``import torchvision``: performs the import itself, then hands over the module."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)  # one shot: the real finders serve the retried import and submodules
        _import_with_schemas()
        real = sys.modules["torchvision"].__spec__
        spec = importlib.util.spec_from_loader(fullname, self, origin=real.origin, is_package=True)
        spec.submodule_search_locations = real.submodule_search_locations
        spec.has_location = real.has_location
        return spec

    def create_module(self, spec):
        return sys.modules["torchvision"]

    def exec_module(self, module):
        pass


def _import_with_schemas() -> None:
    global _fragment
    try:
        importlib.import_module("torchvision")
        return
    except RuntimeError as err:
        if _MISSING_OP not in str(err):
            raise
    import torch

    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    _fragment = torch.library.Library("torchvision", "FRAGMENT")
    _fragment.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _fragment.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    importlib.import_module("torchvision")


def install() -> None:
    if "torchvision" in sys.modules or any(isinstance(f, _TorchvisionImportHook) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _TorchvisionImportHook())


PTH_NAME = "vrag_rl_torchvision_cpu.pth"


def write_pth() -> str:
    """Make every interpreter of this environment install the hook at start-up (cheap: torch loads lazily)."""
    import sysconfig
    from pathlib import Path

    path = Path(sysconfig.get_paths()["purelib"]) / PTH_NAME
    path.write_text("import vrag_rl.compat; vrag_rl.compat.install()\n")
    return str(path)

"""torchvision next to a CPU torch: every interpreter of the environment can import it (vrag_rl/compat.py)."""

import subprocess
import sys


def test_fresh_interpreter_imports_torchvision_without_importing_vrag_rl_first():
    # vLLM inspects model classes in such a fresh interpreter; Ray workers start like this too.
    code = (
        "import torchvision, torchvision.transforms.v2, importlib.util, sys\n"
        "from transformers import Qwen2_5_VLProcessor\n"
        "assert importlib.util.find_spec('torchvision').submodule_search_locations\n"
        "assert not any(type(f).__name__ == '_TorchvisionImportHook' for f in sys.meta_path)\n"
        "print(torchvision.__version__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_install_is_idempotent_once_torchvision_is_loaded():
    import torchvision  # noqa: F401

    from vrag_rl import compat

    before = list(sys.meta_path)
    compat.install()
    assert sys.meta_path == before

"""The package's layers, read from the source (AST, nothing imported): imports only go down, and no cycles.

Layers, lowest first (a unit imports only units of lower layers, and modules of its own unit):

    0  compat, choice, flat_settings, chat_api,          foundations
       progress, http_guard
    1  agent, algo                                      the protocol, the RL math
    2  data                                             corpora, records, converters, expert trajectories
    3  reward, retrieval
    4  models                                           the tiny kit, the training-side forward
    5  rollout, learner                                 engines, the agent loop, workers; the policy trained on
                                                        ranks (neither knows the other: weights move through
                                                        the job's controller)
    6  evaluation, serving                              per-question scores and the report; the agent served
    7  job                                              the GRPO controller, SFT data and loop, checkpoints,
                                                        tracking, the warm start
    8  cli                                              the options (and tiny defaults) the entry points share
    9  main, watch, eval, serve                         entry points: never imported by the library
   10  vrag_rl (the package root)                       installs the compat hook before anything runs

Imports inside functions and under ``TYPE_CHECKING`` count like any other: a lazy import is still a
dependency. Beside the layer rule, no two modules may import each other, directly or around a longer loop.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vrag_rl"
LAYERS = {
    "vrag_rl": 10,
    "vrag_rl.compat": 0,
    "vrag_rl.choice": 0,
    "vrag_rl.flat_settings": 0,
    "vrag_rl.chat_api": 0,
    "vrag_rl.vllm_server": 0,
    "vrag_rl.http_guard": 0,
    "vrag_rl.progress": 0,
    "vrag_rl.agent": 1,
    "vrag_rl.algo": 1,
    "vrag_rl.data": 2,
    "vrag_rl.reward": 3,
    "vrag_rl.retrieval": 3,
    "vrag_rl.models": 4,
    "vrag_rl.rollout": 5,
    "vrag_rl.learner": 5,
    "vrag_rl.evaluation": 6,
    "vrag_rl.serving": 6,
    "vrag_rl.job": 7,
    "vrag_rl.cli": 8,
    "vrag_rl.main": 9,
    "vrag_rl.watch": 9,
    "vrag_rl.eval": 9,
    "vrag_rl.serve": 9,
}


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package at ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(path: Path, name: str, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported package module, line) for every import of the package in one file."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                anchor = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` depends on pkg.mod when that is a module, else on pkg itself.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found += [(t, node.lineno) for t in dict.fromkeys(targets) if t == "vrag_rl" or t.startswith("vrag_rl.")]
    return found


def unit(module: str) -> str:
    """The layered unit a module belongs to: the longest key of LAYERS that is a prefix of it."""
    matches = [u for u in LAYERS if module == u or module.startswith(u + ".")]
    return max(matches, key=len)


def graph(root: Path) -> tuple[dict[str, Path], dict[str, list[tuple[str, int]]]]:
    modules = module_names(root)
    return modules, {m: imports(p, m, modules) for m, p in modules.items()}


def layer_violations(root: Path) -> list[str]:
    """``file:line: a imports b`` for each import that does not go down (or stay in its own unit)."""
    modules, edges = graph(root)
    unplaced = [m for m in modules if unit(m) == "vrag_rl" and m != "vrag_rl"]
    problems = [f"{modules[m]}: module {m} has no layer (add it to LAYERS)" for m in unplaced]
    for source, targets in edges.items():
        for target, line in targets:
            a, b = unit(source), unit(target)
            if a != b and LAYERS[b] >= LAYERS[a]:
                problems.append(
                    f"{modules[source]}:{line}: {source} (layer {LAYERS[a]}) imports {target} (layer {LAYERS[b]})"
                )
    return problems


def cycles(root: Path) -> list[str]:
    """Each import cycle among the package's modules once, as ``a -> b -> ... -> a`` with file:line of each hop."""
    modules, edges = graph(root)
    lines = {(s, t): line for s, ts in edges.items() for t, line in ts}
    succ = {m: sorted({t for t, _ in ts if t in modules and t != m}) for m, ts in edges.items()}
    found, seen = [], set()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in succ[m]:
            if state.get(n) == 1:
                loop = path[path.index(n) :] + [n]
                key = frozenset(loop)
                if key not in seen:
                    seen.add(key)
                    hops = [f"{modules[a].name}:{lines[(a, b)]}" for a, b in zip(loop, loop[1:])]
                    found.append(" -> ".join(loop) + f" ({', '.join(hops)})")
            elif n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(modules):
        if m not in state:
            visit(m, [m])
    return found


def test_imports_only_go_down():
    assert layer_violations(PACKAGE) == []


def test_no_import_cycles():
    assert cycles(PACKAGE) == []


def test_every_package_and_entry_point_has_a_layer():
    units = {unit(m) for m in module_names(PACKAGE)}
    assert units == set(LAYERS)


def planted(tmp_path: Path, edits: dict[str, str]) -> Path:
    """A copy of the package with lines appended to some of its files."""
    root = tmp_path / "vrag_rl"
    shutil.copytree(PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__"))
    for rel, line in edits.items():
        path = root / rel
        path.write_text(path.read_text() + line + "\n")
    return root


def test_a_planted_upward_import_is_caught_with_file_and_line(tmp_path):
    root = planted(tmp_path, {"agent/prompt.py": "from vrag_rl.job.grpo import run  # planted"})
    line = len((root / "agent/prompt.py").read_text().splitlines())
    problems = layer_violations(root)
    assert len(problems) == 1
    assert problems[0].startswith(f"{root / 'agent/prompt.py'}:{line}: vrag_rl.agent.prompt (layer 1) imports")
    # An entry point imported by the library is an upward import too, even from inside a function.
    root = planted(tmp_path / "2", {"job/sft.py": "def f():\n    from vrag_rl import watch"})
    assert [p for p in layer_violations(root) if "imports vrag_rl.watch" in p]


def test_the_learner_knows_neither_the_rollout_layer_nor_the_job(tmp_path):
    """Weights leave the learner as buckets the controller streams into the engines; nothing else may join them."""
    for n, line in enumerate(
        ["from vrag_rl.rollout.worker import WeightSync", "from vrag_rl.job.guard import SkipGuard"]
    ):
        root = planted(tmp_path / str(n), {"learner/trainer.py": line + "  # planted"})
        assert [p for p in layer_violations(root) if "vrag_rl.learner.trainer (layer 5) imports" in p]
    root = planted(tmp_path / "back", {"rollout/worker.py": "from vrag_rl.learner.payloads import Batch  # planted"})
    assert [p for p in layer_violations(root) if "vrag_rl.rollout.worker (layer 5) imports" in p]


def test_a_planted_cycle_is_caught(tmp_path):
    root = planted(tmp_path, {"retrieval/fusion.py": "from vrag_rl.retrieval.base import BaseRetriever  # planted"})
    fusion_line = len((root / "retrieval/fusion.py").read_text().splitlines())
    base = (root / "retrieval/base.py").read_text().splitlines()
    base_line = next(n for n, text in enumerate(base, 1) if "retrieval.fusion import" in text)
    loop = "vrag_rl.retrieval.base -> vrag_rl.retrieval.fusion -> vrag_rl.retrieval.base"
    assert cycles(root) == [f"{loop} (base.py:{base_line}, fusion.py:{fusion_line})"]

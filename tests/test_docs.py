"""Documentation that cannot rot: what README.md and docs/*.md tell a reader to type is checked against the code.

- README.md is a front door: at most 200 lines, opening with the two commands (``make demo``, ``make test``).
- Every ``python -m vrag_rl.X ...`` command (in code blocks, continuation lines joined, and in inline code), and
  every ``launch/slurm.sbatch ...`` line, names a runnable module whose argparse parser knows each ``--flag``
  (a subcommand's flags are checked against its subparser, and a flag's value against its ``choices``). The
  parser is taken from the module's own ``main()`` at the moment it would parse, so nothing runs.
- Every Hydra override given to the main job (``key=value``, ``+recipe=NAME``, ``+judge=X``, ``hydra.*``),
  and every override written in prose as inline code (``trainer.backend=deepspeed``), names a key of the schema
  ``vrag_rl.job.config.TrainConfig`` (``judge.*``: ``JudgeConfig``; ``hydra.*``: Hydra's own ``HydraConf``), a
  recipe file or a registered option.
- Relative links, repository paths in inline code (``vrag_rl/job/grpo.py``), cited tests (``[`learner/test_zero.py`]``)
  and dotted names (``vrag_rl.retrieval.local.LocalRetriever``) exist.

Each mistake is reported with its file and line. The last test plants mistakes and checks that they are caught.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import importlib
import re
import shlex
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 200
TWO_COMMANDS = [
    "```bash",
    "make demo   # sets up .venv (CPU stack) and runs the main job on its built-in default: tiny models, "
    "bundled corpus",
    "make test   # sets up .venv (CPU stack) and runs the tests",
    "```",
]
MAIN = "vrag_rl.main"
GROUPS = ("recipe", "judge")  # Hydra config groups the main job registers (vrag_rl/main.py)
REPO_DIRS = ("vrag_rl", "tests", "bench", "recipes", "launch", "conf", "docs", "data", ".ci")
SEPARATORS = {"|", "||", "&&", ";", ">", ">>", "2>&1", "&"}


def doc_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def where(path: Path, line: int) -> str:
    try:
        return f"{path.relative_to(ROOT)}:{line}"
    except ValueError:
        return f"{path}:{line}"


# ---- reading a markdown file -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Snippet:
    """A piece of code the reader is shown: a logical line of a fenced block, or an inline code span."""

    where: str
    text: str
    inline: bool


def snippets(path: Path) -> list[Snippet]:
    """Fenced code, a logical line at a time (lines ending in ``\\`` joined), and inline code, paragraph by paragraph
    (a span may wrap), each with the line it starts on."""
    out: list[Snippet] = []
    lines = path.read_text().splitlines()
    fence = None  # the opening fence while inside a code block
    pending, start = "", 0
    paragraph: list[tuple[int, str]] = []

    def flush_paragraph() -> None:
        if not paragraph:
            return
        first = paragraph[0][0]
        text = "\n".join(line for _, line in paragraph)
        for m in re.finditer(r"(`+)(.+?)\1", text, re.S):
            line = first + text.count("\n", 0, m.start())
            out.append(Snippet(where(path, line), " ".join(m.group(2).split()), inline=True))
        paragraph.clear()

    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if fence is None and stripped.startswith("```"):
            flush_paragraph()
            fence = stripped[: len(stripped) - len(stripped.lstrip("`"))]
            continue
        if fence is not None:
            if stripped.startswith(fence) and not stripped.strip("`"):
                fence = None
                continue
            if not pending:
                start = number
            if stripped.endswith("\\"):
                pending += stripped[:-1] + " "
                continue
            out.append(Snippet(where(path, start), pending + stripped, inline=False))
            pending = ""
            continue
        if stripped:
            paragraph.append((number, line))
        else:
            flush_paragraph()
    flush_paragraph()
    return out


def tokens(text: str) -> list[str]:
    """Shell words of one command line, its comment cut off."""
    text = re.split(r"(?:^|\s)#", text, maxsplit=1)[0]
    try:
        return shlex.split(text)
    except ValueError:  # an unbalanced quote in prose: plain words are enough to find flags
        return text.split()


# ---- commands ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Command:
    where: str
    module: str
    args: tuple[str, ...]


def commands(snips: list[Snippet]) -> list[Command]:
    """Every ``python -m vrag_rl...`` (any interpreter path) and ``launch/slurm.sbatch`` (the main job) shown."""
    found = []
    for s in snips:
        words = tokens(s.text)
        for i, w in enumerate(words):
            if w == "-m" and i > 0 and re.search(r"python[\d.]*$", words[i - 1]) and i + 1 < len(words):
                module, rest = words[i + 1], words[i + 2 :]
            elif w.endswith("launch/slurm.sbatch"):
                module, rest = MAIN, words[i + 1 :]
            else:
                continue
            if not module.startswith("vrag_rl") or module.endswith("..."):  # "python -m vrag_rl..." names them all
                continue
            args = []
            for a in rest:
                if a in SEPARATORS:
                    break
                args.append(a)
            found.append(Command(s.where, module, tuple(args)))
    return found


class _Parsed(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


@functools.cache
def parser_of(module: str) -> argparse.ArgumentParser:
    """The parser ``module``'s ``main()`` builds, caught as it is about to parse: the program itself never runs."""

    def caught(self, *args, **kwargs):
        raise _Parsed(self)

    main = importlib.import_module(module).main
    with mock.patch.object(argparse.ArgumentParser, "parse_args", caught):
        try:
            main()
        except _Parsed as p:
            return p.parser
    raise AssertionError(f"{module}.main() returned without parsing arguments")


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser] | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return None


def module_file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__main__.py"):
        if path.is_file():
            return path
    return None


def check_flags(parser: argparse.ArgumentParser, args: list[str], label: str, at: str) -> list[str]:
    """Each ``--flag`` known to ``parser`` (a value checked against its choices); the first positional word picks
    the subcommand, whose own parser checks the rest."""
    errors = []
    subs = subparsers(parser)
    i = 0
    while i < len(args):
        a = args[i]
        i += 1
        if a.startswith("-") and len(a) > 1 and not re.fullmatch(r"-\d.*", a):
            flag, eq, value = a.partition("=")
            action = parser._option_string_actions.get(flag)
            if action is None:
                known = ", ".join(sorted(s for s in parser._option_string_actions if s.startswith("--")))
                errors.append(f"{at}: `{label}` has no flag {flag} (it knows: {known})")
                continue
            if not eq and action.nargs != 0 and i < len(args) and not args[i].startswith("--"):
                value = args[i]  # the flag's value, not a positional
                i += 1
            choices = {str(c) for c in action.choices or ()}
            if choices and re.fullmatch(r"[a-z0-9_.-]+", value) and value not in choices:  # not a PLACEHOLDER
                errors.append(f"{at}: `{label} {flag}` takes one of {sorted(choices)}, not {value}")
        elif subs is not None and a != "...":
            if a not in subs:
                return errors + [f"{at}: `{label}` has no subcommand {a} (it has: {', '.join(subs)})"]
            return errors + check_flags(subs[a], args[i:], f"{label} {a}", at)
    return errors


def check_command(cmd: Command) -> list[str]:
    path = module_file(cmd.module)
    if path is None:
        return [f"{cmd.where}: no module {cmd.module}"]
    if "__main__" not in path.read_text():
        return [f"{cmd.where}: {cmd.module} cannot run as `python -m` (no __main__ block)"]
    if cmd.module == MAIN:
        from hydra._internal.utils import get_args_parser

        flags = [a for a in cmd.args if a.startswith("-")]
        overrides = [a for a in cmd.args if "=" in a and not a.startswith("-")]
        errors = check_flags(get_args_parser(), flags, f"python -m {MAIN}", cmd.where)
        return errors + [e for a in overrides for e in check_override(a, cmd.where)]
    return check_flags(parser_of(cmd.module), list(cmd.args), f"python -m {cmd.module}", cmd.where)


# ---- Hydra overrides -----------------------------------------------------------------------------------------------
def _unwrap(t):
    """The dataclass (or other type) behind ``X | None``."""
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        dcs = [a for a in args if dataclasses.is_dataclass(a)]
        return dcs[0] if dcs else args[0]
    return t


def schema_has(cls, parts: list[str]) -> bool:
    """Whether the dotted key ``parts`` exists in the dataclass schema ``cls`` (anything goes below a dict or Any)."""
    names = {f.name for f in dataclasses.fields(cls)}
    if parts[0] not in names:
        return False
    t = _unwrap(typing.get_type_hints(cls)[parts[0]])
    if len(parts) == 1:
        return True
    if dataclasses.is_dataclass(t):
        return schema_has(t, parts[1:])
    return t is typing.Any or t is dict or typing.get_origin(t) is dict


@functools.cache
def judge_options() -> frozenset[str]:
    from hydra.core.config_store import ConfigStore

    importlib.import_module(MAIN)  # registers the options
    return frozenset(name.removesuffix(".yaml") for name in ConfigStore.instance().list("judge"))


OVERRIDE = re.compile(r"(\+{0,2}|~)([A-Za-z_][\w]*(?:\.[\w]+)*)(?:=(.*))?")


def check_override(text: str, at: str) -> list[str]:
    from hydra.conf import HydraConf

    from vrag_rl.job.config import TrainConfig

    m = OVERRIDE.fullmatch(text)
    if m is None:
        return [f"{at}: `{text}` is not a Hydra override"]
    plus, key, value = m.groups()
    parts = key.split(".")
    if plus and key in GROUPS:
        if key == "recipe" and not (ROOT / "recipes" / f"{value}.yaml").is_file():
            return [f"{at}: `{text}`: no recipes/{value}.yaml"]
        if key == "judge" and value not in judge_options():
            return [f"{at}: `{text}`: judge options are {sorted(judge_options())}"]
        return []
    if parts[0] == "hydra":
        schema, ok = "HydraConf", len(parts) > 1 and schema_has(HydraConf, parts[1:])
    else:
        schema, ok = "TrainConfig", schema_has(TrainConfig, parts)
    return [] if ok else [f"{at}: `{text}`: no key {key} in the schema ({schema})"]


def prose_overrides(snips: list[Snippet]) -> list[tuple[str, str]]:
    """(where, override) for inline code made only of overrides whose key starts at a top-level schema field."""
    from vrag_rl.job.config import TrainConfig

    heads = {f.name for f in dataclasses.fields(TrainConfig)} | {"hydra"}
    found = []
    for s in snips:
        if not s.inline or "python" in s.text or "sbatch" in s.text:
            continue
        words = s.text.split()
        matches = [OVERRIDE.fullmatch(w) for w in words]
        if words and all(m and m.group(3) is not None for m in matches):
            if any(m.group(2).split(".")[0] in heads or (m.group(1) and m.group(2) in GROUPS) for m in matches):
                found += [(s.where, w) for w in words]
    return found


# ---- links, paths and names -----------------------------------------------------------------------------------------
def defined_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def check_reference(text: str, at: str) -> list[str]:
    """A repository path, a cited test or a dotted ``vrag_rl`` name in inline code must exist."""
    text = text.rstrip(".,;:")
    if "..." in text:
        return []
    if re.fullmatch(r"(?:\w+/)*test_\w+\.py", text) and not text.startswith("tests/"):
        return [] if (ROOT / "tests" / text).is_file() else [f"{at}: cited test tests/{text} does not exist"]
    if re.fullmatch(rf"(?:{'|'.join(map(re.escape, REPO_DIRS))})/[\w./*-]*", text):
        if re.search(r"[A-Z]{2,}", text):  # a placeholder: recipes/NAME.yaml
            return []
        exists = any(ROOT.glob(text)) if "*" in text else (ROOT / text).exists()
        return [] if exists else [f"{at}: `{text}` does not exist"]
    m = re.fullmatch(r"(vrag_rl(?:\.\w+)*)(?:\(.*\))?", text)
    if m:
        parts = m.group(1).split(".")
        for n in range(len(parts), 0, -1):
            base = ROOT.joinpath(*parts[:n])
            path = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
            if path.is_file():
                rest = parts[n:]
                if rest and rest[0] not in defined_names(path):
                    return [f"{at}: `{text}`: {'.'.join(parts[:n])} defines no {rest[0]}"]
                return []
        return [f"{at}: `{text}`: no such module"]
    return []


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives a markdown file's headings."""
    heads = re.findall(r"^#+\s+(.+?)\s*$", path.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def check_links(path: Path) -> list[str]:
    """Relative links (and their #anchors, into markdown files) must exist."""
    errors = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        for target in re.findall(r"\]\(([^)\s]+)\)", line):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            dest = path.parent / file if file else path
            if not dest.exists():
                errors.append(f"{where(path, number)}: link to {target}, which does not exist")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                errors.append(f"{where(path, number)}: link to {target}, which has no heading #{anchor}")
    return errors


def check_file(path: Path) -> tuple[list[str], int, int]:
    """(errors, commands checked, overrides checked) for one markdown file."""
    snips = snippets(path)
    cmds = commands(snips)
    errors = [e for c in cmds for e in check_command(c)]
    prose = prose_overrides(snips)
    errors += [e for at, text in prose for e in check_override(text, at)]
    errors += [e for s in snips if s.inline for e in check_reference(s.text, s.where)]
    errors += check_links(path)
    n_overrides = len(prose) + sum(
        1 for c in cmds if c.module == MAIN for a in c.args if "=" in a and not a.startswith("-")
    )
    return errors, len(cmds), n_overrides


# ---- the tests -------------------------------------------------------------------------------------------------------
def test_readme_is_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; at most {MAX_README_LINES}"
    assert lines[: len(TWO_COMMANDS)] == TWO_COMMANDS, "README.md must open with the two commands"


def test_documented_commands_overrides_and_paths_exist():
    errors, n_commands, n_overrides = [], 0, 0
    for path in doc_files():
        e, c, o = check_file(path)
        errors += e
        n_commands += c
        n_overrides += o
    assert not errors, "\n".join(errors)
    assert n_commands >= 40 and n_overrides >= 20, (n_commands, n_overrides)  # the collectors found the docs' code


def test_planted_mistakes_are_caught(tmp_path):
    doc = tmp_path / "planted.md"
    doc.write_text(
        "```bash\n"
        "python -m vrag_rl.watch --questions 2 --no-such-flag\n"
        "python -m vrag_rl.eval run --method agent \\\n"
        "    --corpus c --method-typo x\n"
        "python -m vrag_rl.eval rerun eval/agent\n"
        "python -m vrag_rl.retrieval.ocr corpus --source telepathy\n"
        "python -m vrag_rl.nothing_here --x\n"
        ".venv/bin/python -m vrag_rl.main +recipe=tiny_cpu trainer.no_such_key=1 +recipe=nope +judge=oracle \\\n"
        "    hydra.run.dir=runs/x hydra.no_such=1\n"
        "```\n"
        "\n"
        "Prose: `algo.no_such_knob=3`, `trainer.backend=deepspeed`, a cited [`learner/test_nothing.py`],\n"
        "`vrag_rl/trainer/grpo.py`, `vrag_rl.job.grpo.no_such_function`, [a link](nowhere.md) and\n"
        "[an anchor](planted.md#no-such-heading).\n"
    )
    errors, n_commands, n_overrides = check_file(doc)
    expected = [
        ("planted.md:2", "no flag --no-such-flag"),
        ("planted.md:3", "no flag --method-typo"),
        ("planted.md:5", "no subcommand rerun"),
        ("planted.md:6", "not telepathy"),
        ("planted.md:7", "no module vrag_rl.nothing_here"),
        ("planted.md:8", "no key trainer.no_such_key"),
        ("planted.md:8", "no recipes/nope.yaml"),
        ("planted.md:8", "+judge=oracle"),
        ("planted.md:8", "no key hydra.no_such"),
        ("planted.md:12", "no key algo.no_such_knob"),
        ("planted.md:12", "tests/learner/test_nothing.py"),
        ("planted.md:13", "vrag_rl/trainer/grpo.py"),
        ("planted.md:13", "defines no no_such_function"),
        ("planted.md:13", "link to nowhere.md"),
        ("planted.md:14", "no heading #no-such-heading"),
    ]
    for line, words in expected:
        assert any(e.split(": ", 1)[0].endswith(line) and words in e for e in errors), (line, words, errors)
    assert len(errors) == len(expected), errors  # the good parts (hydra.run.dir, trainer.backend=...) pass
    assert (n_commands, n_overrides) == (6, 8)

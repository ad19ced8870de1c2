"""The docs cannot go stale.

``docs/configuration.md`` is what ``sipa config-reference`` prints now, and every
command in ``README.md`` and ``docs/**/*.md`` still works as written, checked
without running it:

- ``dvc ...``: parsed by DVC's own parser; for ``dvc exp run -S/--set-param``
  each override is applied by DVC's own code (``dvc.utils.hydra``) to a copy of
  its params file, then the stage that owns the section checks the result with
  its own ``read_config`` (unknown key, type, range, choices, the stage's own
  rules); the override is applied once more as written, so a key the file does
  not write without ``+`` (which DVC refuses) and a sweep without ``--queue``
  are caught too;
- ``sipa ...`` (and ``python -m sipa_core.cli ...``): parsed by the real parser
  (``sipa_core.cli.build_parser``), never run;
- ``make ...``: every target is a rule of the Makefile;
- ``python X.py ...``, ``bash X.sh``: the file exists; a Python script with an
  argparse parser is run up to its ``parse_args``, which is replaced by an
  exception carrying the parser, and the flags are parsed by it;
  ``python -m pytest PATH``: the paths exist;
- relative Markdown links resolve to files, and their ``#anchors`` to headings.

Commands come from fenced ``bash``/``sh``/``shell``/``console`` blocks (``$ ``
prompts, ``\\`` continuations, ``;``/``&&``/``||``/``|``, comments, env
assignments, redirections) and from inline code spans that start with one of
those tools. An inline span may name a command without its arguments
(``sipa score --checkpoint``, ``dvc exp run -S``): a missing last argument or a
missing required one is not an error there. A span written as a synopsis
(``sipa plan [FILE] [--json]``, ``--params <file>``, ``ARGS=...``) has its
command, subcommand and option names checked only.

Not checked: other commands (git, cp, pip, torchrun's own options), whether a
command succeeds when run (a path key's file existing, a GPU, the network),
the output shown in console blocks, and the scripts outside stages/,
benchmarks/ and scripts/ beyond their existence.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import re
import runpy
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import unquote

import pytest
from dvc.cli.parser import DvcParser, get_main_parser
from dvc.exceptions import InvalidArgumentError
from dvc.utils.cli_parse import to_path_overrides
from dvc.utils.hydra import apply_overrides, get_hydra_sweeps, to_hydra_overrides
from hydra.errors import OverrideParseException

from sipa_core import pipeline
from sipa_core.cli import build_parser, main
from sipa_core.config_reference import configuration_reference
from sipa_core.errors import SipaError
from sipa_core.params import Field, check_section, load_yaml
from sipa_core.pipeline import SETTINGS, STAGES
from sipa_core.stage_runner import Stage
from sipa_core.train.recipe import check_recipe

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "configuration.md"
SCRIPT_DIRS = {"stages", "benchmarks", "scripts"}  # whose scripts' parsers are reached (see script_parser)
SHELL_LANGS = {"bash", "sh", "shell", "console", "shell-session", "zsh"}
TOOLS = {"dvc", "sipa", "make", "python", "python3", "bash", "sh", "torchrun"}


# ---------------------------------------------------------------- extraction


@dataclass(frozen=True)
class Command:
    file: str
    line: int
    text: str  # one shell line (continuations joined), as written
    inline: bool  # an inline code span (may be a mention), not a fenced block

    def where(self) -> str:
        return f"{self.file}:{self.line}"


def doc_files() -> list[Path]:
    files = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("**/*.md"))
    return [f for f in files if f.is_file()]


def _fences(lines: list[str]):
    """(start index, end index, language, indentation) of each fenced block."""
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)", lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.groups()
        j = i + 1
        while j < len(lines) and not re.match(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[j]):
            j += 1
        yield i, j, lang.lower(), len(indent)
        i = j + 1


def _strip_comment(line: str) -> str:
    """The line without its shell comment (a ``#`` outside quotes that starts a word)."""
    quote = None
    for k, c in enumerate(line):
        if quote:
            if c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c == "#" and (k == 0 or line[k - 1].isspace()):
            return line[:k]
    return line


def _block_commands(body: list[tuple[int, str]], lang: str, file: str) -> list[Command]:
    out, pending, start = [], "", None
    for number, raw in body:
        line = raw.strip()
        if not pending:
            if lang in ("console", "shell-session"):
                if not line.startswith("$ "):
                    continue  # output
                line = line[2:]
            elif line.startswith("$ "):
                line = line[2:]
            start = number
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        text = (pending + line).strip()
        pending = ""
        if text:
            out.append(Command(file, start, text, inline=False))
    return out


# An inline code span: backticks, text within one paragraph, as many backticks.
_CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)((?:(?!\n[ \t]*\n).)+?)(?<!`)\1(?!`)", flags=re.S)
# Link targets: [text](target "title"), ![alt](target), [label]: target, <img src=...>, <a href=...>.
_LINKS = [re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)"),
          re.compile(r"(?m)^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)"),
          re.compile(r"<(?:img|a)\s[^>]*?(?:src|href)=\"([^\"]+)\"")]


def commands_in(text: str, file: str) -> list[Command]:
    """Every shell command of a Markdown text: fenced shell blocks, and inline spans starting with a tool."""
    lines = text.splitlines()
    prose = list(lines)
    out = []
    for i, j, lang, indent in _fences(lines):
        if lang in SHELL_LANGS:
            body = [(k + 1, line[indent:] if line[:indent].isspace() else line.lstrip())
                    for k, line in enumerate(lines[i + 1:j], start=i + 1)]
            out += _block_commands(body, lang, file)
        for k in range(i, min(j + 1, len(lines))):
            prose[k] = ""
    flat = "\n".join(prose)
    for m in _CODE_SPAN.finditer(flat):
        span = " ".join(m.group(2).split())
        words = span.removeprefix("$ ").split()
        first = next((w for w in words if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", w)), "")
        if _tool(first):
            out.append(Command(file, flat.count("\n", 0, m.start()) + 1, span.removeprefix("$ "), inline=True))
    return sorted(out, key=lambda c: c.line)


def _tool(word: str) -> str | None:
    name = word.rsplit("/", 1)[-1]
    if re.fullmatch(r"python3(\.\d+)?", name):
        return "python"
    return name if name in TOOLS else None


def simple_commands(text: str) -> list[list[str]]:
    """The simple commands of one shell line, as argv lists (env assignments, ``time``, redirections
    dropped). A line shlex cannot split raises ValueError."""
    lex = shlex.shlex(_strip_comment(text), posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    lex.commenters = ""
    tokens = list(lex)
    out, argv, skip = [], [], False
    for k, tok in enumerate(tokens):
        if skip:
            skip = False
        elif tok in ("&&", "||", ";", "|", "&", "(", ")", ";;", "|&"):
            out.append(argv)
            argv = []
        elif set(tok) <= set("<>&") and tok:
            skip = True  # a redirection and its target
            if argv and argv[-1].isdigit() and k and tokens[k - 1] == argv[-1]:
                argv.pop()  # the descriptor of 2>file
        else:
            argv.append(tok)
    out.append(argv)
    cleaned = []
    for argv in out:
        while argv and (re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]) or argv[0] in ("time", "nohup", "env")):
            argv = argv[1:]
        if argv:
            cleaned.append(argv)
    return cleaned


_SYNOPSIS = re.compile(r"<[^<>]+>|\[--?[A-Za-z]|\[[A-Z][A-Z_]+\]|\.\.\.|(?<![\w$.=\[,/-])[A-Z][A-Z_]{2,}(?![\w=])")


def is_synopsis(text: str) -> bool:
    """Placeholders (outside quotes and comments): ``<file>``, ``[--json]``, ``[FILE]``, ``...``, ``IMG_PER_S``."""
    return bool(_SYNOPSIS.search(re.sub(r"'[^']*'|\"[^\"]*\"", "''", _strip_comment(text))))


def _redirection(text: str, k: int) -> bool:
    """Whether the ``&`` or ``|`` at ``k`` belongs to a redirection (``2>&1``, ``&>file``, ``>|file``)."""
    before, after = text[k - 1:k] if k else "", text[k + 1:k + 2]
    return (text[k] == "&" and (before in ("<", ">") or after == ">")) or (text[k] == "|" and before == ">")


def segments(text: str) -> list[str]:
    """A shell line cut at its control operators (``&&``, ``||``, ``;``, ``|``, ``&``) outside quotes
    and outside the [brackets] of a synopsis; comments dropped."""
    text = _strip_comment(text)
    out, start, quote, depth, k = [], 0, None, 0, 0
    while k < len(text):
        c = text[k]
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "[":
            depth += 1
        elif c == "]":
            depth = max(depth - 1, 0)
        elif depth == 0 and c in ";|&" and not _redirection(text, k):
            out.append(text[start:k])
            k += 2 if text[k:k + 2] in ("&&", "||", ";;", "|&") else 1
            start = k
            continue
        k += 1
    out.append(text[start:])
    return [seg.strip() for seg in out if seg.strip()]


# ---------------------------------------------------------------- parsers


class _ParseError(Exception):
    pass


class _Captured(BaseException):
    def __init__(self, parser):
        self.parser = parser


def _raise_error(self, message, *args, **kwargs):
    raise _ParseError(message)


@contextlib.contextmanager
def _quiet_parsers():
    """argparse (and DVC's parser) raise _ParseError instead of printing usage and exiting."""
    saved = argparse.ArgumentParser.error, DvcParser.error
    argparse.ArgumentParser.error = DvcParser.error = _raise_error
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        argparse.ArgumentParser.error, DvcParser.error = saved


def parse(parser, argv: list[str], inline: bool):
    """(namespace or None, problem or None)."""
    with _quiet_parsers():
        try:
            return parser.parse_args(argv), None
        except _ParseError as err:
            message = str(err)
        except SystemExit as err:  # --help, --version
            if err.code in (0, None):
                return None, None
            message = f"exit status {err.code}"
    if inline:
        m = re.match(r"argument (\S+): expected (one|at least one) argument", message)
        if (m and argv and argv[-1] in m.group(1).split("/")) or "arguments are required" in message:
            return None, None  # a mention of the command, not a full invocation
    return None, message


def _chain(parser, words: list[str]) -> tuple[list[str], argparse.ArgumentParser]:
    """The leading words that name subcommands, and the (sub)parser they select."""
    chain = []
    for word in words:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or word not in subs[0].choices:
            break
        chain.append(word)
        parser = subs[0].choices[word]
    return chain, parser


def synopsis_problems(parser, words: list[str], text: str) -> list[str]:
    """A synopsis: its subcommand words (``words``: the plain words after the tool) and option names exist."""
    chain, sub = _chain(parser, words)
    problems = []
    if len(chain) < len(words) and any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
        problems.append(f"unknown subcommand {words[len(chain)]!r}")
    for flag in re.findall(r"(?<![\w-])--?[A-Za-z][\w-]*", text):
        if flag not in sub._option_string_actions:
            problems.append(f"unknown option {flag}")
    return problems


@lru_cache(maxsize=None)
def sipa_parser():
    return build_parser()


@lru_cache(maxsize=None)
def dvc_parser():
    return get_main_parser()


@lru_cache(maxsize=None)
def make_targets() -> frozenset[str]:
    targets = set()
    for line in (ROOT / "Makefile").read_text().splitlines():
        m = re.match(r"^([^\s:#=$][^:=#]*?)\s*::?(?![=])", line)
        if m and not line.startswith("\t"):
            targets.update(t for t in m.group(1).split() if not t.startswith(".") and "%" not in t and "$" not in t)
    return frozenset(targets)


@lru_cache(maxsize=None)
def script_parser(path: Path):
    """The argparse parser a Python script builds before anything else, or None when it has none
    reachable: the script is run as ``__main__`` with ``parse_known_args`` raising, which stops it
    before it does any work. Only the scripts of ``SCRIPT_DIRS`` that call ``parse_args`` or
    ``stage_main`` and have an ``if __name__ == "__main__"`` are run that way (each builds its parser
    first thing; a script that ran to its end would fail this test)."""
    if path.parent.name not in SCRIPT_DIRS or path.parent.parent != ROOT:
        return None
    source = path.read_text()
    tree = ast.parse(source)
    calls = {n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", None)
             for n in ast.walk(tree) if isinstance(n, ast.Call)}
    if not (calls & {"parse_args", "parse_known_args", "stage_main"}) or "__main__" not in source:
        return None
    saved = argparse.ArgumentParser.parse_known_args, list(sys.path)

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    argparse.ArgumentParser.parse_known_args = capture
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(str(path), run_name="__main__")
    except _Captured as got:
        return got.parser
    finally:
        argparse.ArgumentParser.parse_known_args = saved[0]
        sys.path[:] = saved[1]
    raise AssertionError(f"{path}: ran to the end without parsing its arguments")


# ---------------------------------------------------------------- checks


def read_section(path: Path, section: str) -> None:
    """Check one section of a params file as the pipeline does (a stage's, or a settings section)."""
    if section in SETTINGS:
        check_section(load_yaml(path).get(section), SETTINGS[section][1], file=path, section=section)
    else:
        STAGES[section].read_config(str(path))


def set_param_problems(overrides: list[str], queue: bool) -> list[str]:
    """``dvc exp run -S`` overrides: DVC applies them; the owning stage checks the result."""
    path_overrides = to_path_overrides(overrides)
    problems = []
    for path, ovs in path_overrides.items():
        if not (ROOT / path).is_file():
            problems.append(f"{path}: no such params file")
        for ov in ovs:
            key = ov.lstrip("~+").partition("=")[0]
            if key.split(".")[0] not in {**SETTINGS, **STAGES}:
                problems.append(f"{key}: {key.split('.')[0]!r} is not a pipeline section "
                                f"(sections: {', '.join([*SETTINGS, *STAGES])})")
    if problems:
        return problems
    try:
        sweep = any(o.is_sweep_override() for ovs in path_overrides.values() for o in to_hydra_overrides(ovs))
    except OverrideParseException as err:
        return [f"not an override DVC can parse: {str(err).splitlines()[0]}"]
    if sweep and not queue:
        problems.append("a sweep override needs --queue (DVC: sweep overrides can't be used without `--queue`)")
    combos = get_hydra_sweeps(path_overrides) if sweep else [path_overrides]
    with tempfile.TemporaryDirectory() as tmp:
        for n, combo in enumerate(combos):
            for path, ovs in combo.items():
                forced, strict = Path(tmp, f"{n}f", path), Path(tmp, f"{n}s", path)
                for copy in (forced, strict):
                    copy.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(ROOT / path, copy)
                # 1. every key added even where the file does not write it: the stage's own check.
                try:
                    apply_overrides(forced, [o if o.startswith("~") else "++" + o.lstrip("+") for o in ovs])
                except InvalidArgumentError as err:
                    problems.append(f"{' '.join(ovs)}: {_cause(err)}")
                    continue
                stage_problems = []
                for section in dict.fromkeys(o.lstrip("~+").split(".")[0] for o in ovs):
                    try:
                        read_section(forced, section)
                    except SipaError as err:
                        stage_problems.append(str(err).replace(str(forced), path))
                problems += stage_problems
                # 2. each as written: DVC refuses to set a key the file does not write (it needs +key=value)
                # and to add one it does (it needs key=value); a key the stage refused is not said twice.
                for ov in ovs:
                    key = ov.lstrip("~+").partition("=")[0]
                    if any(f"{key}:" in p for p in stage_problems):
                        continue
                    shutil.copyfile(ROOT / path, strict)
                    try:
                        apply_overrides(strict, [ov])
                    except InvalidArgumentError as err:
                        problems.append(f"DVC refuses {ov}: {_cause(err)}")
    return list(dict.fromkeys(problems))


def _cause(err: BaseException) -> str:
    cause = err.__cause__ or err
    return " ".join(str(cause).split())


def command_problems(cmd: Command) -> list[str]:
    """Every problem of one documented command line."""
    problems = []
    for segment in segments(cmd.text):
        if is_synopsis(segment):
            problems += synopsis_command_problems(segment)
            continue
        try:
            argvs = simple_commands(segment)
        except ValueError as err:
            problems += [] if cmd.inline else [f"cannot split it as a shell line: {err}"]
            continue
        for argv in argvs:
            problems += argv_problems(argv, cmd.inline)
    return problems


def argv_problems(argv: list[str], inline: bool) -> list[str]:
    """The problems of one simple command (the tools this file knows; any other command passes)."""
    tool, args = _tool(argv[0]), argv[1:]
    if tool == "python" and args[:2] == ["-m", "sipa_core.cli"]:
        tool, args = "sipa", args[2:]
    if tool == "torchrun":  # its own options, then the script and the script's
        script = next((k for k, a in enumerate(args) if a.endswith(".py")), None)
        tool, args = "python", ([] if script is None else args[script:])
    if tool == "python":
        return python_problems(args, inline)
    if tool in ("bash", "sh"):
        script = next((a for a in args if not a.startswith("-")), None)
        return [f"{script}: no such file"] if script and not (ROOT / script).is_file() else []
    if tool == "sipa":
        return [p for p in [parse(sipa_parser(), args, inline)[1]] if p]
    if tool == "make":
        return make_problems(args)
    if tool == "dvc":
        return dvc_problems(args, inline)
    return []


def synopsis_command_problems(text: str) -> list[str]:
    """A command written as a synopsis (placeholders, [optional] parts): names only."""
    words = text.split()
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        words = words[1:]
    tool, rest = _tool(words[0]), words[1:]
    if tool == "python" and rest[:2] == ["-m", "sipa_core.cli"]:
        tool, rest = "sipa", rest[2:]
    plain = []
    for word in rest:
        if not re.fullmatch(r"[a-z][\w-]*", word):
            break
        plain.append(word)
    if tool == "sipa":
        return synopsis_problems(sipa_parser(), plain, " ".join(rest))
    if tool == "dvc":
        return synopsis_problems(dvc_parser(), plain, " ".join(rest))
    if tool == "make":
        return make_problems(plain)
    if tool in ("python", "bash", "sh") and rest and re.search(r"\.(py|sh)$", rest[0]):
        if not (ROOT / rest[0]).is_file():
            return [f"{rest[0]}: no such file"]
        parser = script_parser((ROOT / rest[0]).resolve()) if tool == "python" else None
        return [f"{rest[0]}: {p}" for p in synopsis_problems(parser, [], " ".join(rest[1:]))] if parser else []
    return []


def dvc_problems(args: list[str], inline: bool) -> list[str]:
    ns, problem = parse(dvc_parser(), args, inline)
    if problem:
        return [problem]
    if ns is not None and getattr(ns, "set_param", None):
        return set_param_problems(ns.set_param, bool(getattr(ns, "queue", False)))
    return []


def make_problems(args: list[str]) -> list[str]:
    problems, after_option = [], None
    for arg in args:
        option, after_option = after_option, None
        if arg in ("-C", "-f", "-I", "-o", "-W", "--file", "--directory"):
            after_option = "value"
        elif arg in ("-j", "--jobs", "-l", "--load-average"):
            after_option = "number"  # optional: a word that is not a number is a target
        elif option == "value" or (option == "number" and re.fullmatch(r"[\d.]+", arg)):
            continue
        elif arg.startswith("-") or "=" in arg:
            continue
        elif arg not in make_targets():
            problems.append(f"no target {arg!r} in the Makefile (targets: {', '.join(sorted(make_targets()))})")
    return problems


def python_problems(args: list[str], inline: bool) -> list[str]:
    if args[:2] == ["-m", "pytest"]:
        return [f"{a}: no such test file" for a in args[2:] if not a.startswith("-") and
                a.split("::")[0].startswith("tests") and not (ROOT / a.split("::")[0]).exists()]
    script = next((a for a in args if not a.startswith("-")), None)
    if args[:1] in (["-m"], ["-c"]) or script is None or not script.endswith(".py"):
        return []
    if not (ROOT / script).is_file():
        return [f"{script}: no such file"]
    parser = script_parser((ROOT / script).resolve())
    if parser is None:
        return []
    return [f"{script}: {p}" for p in [parse(parser, args[args.index(script) + 1:], inline)[1]] if p]


def _slug(heading: str) -> str:
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@lru_cache(maxsize=None)
def anchors_of(path: Path) -> frozenset[str]:
    return anchors_in(path.read_text())


def anchors_in(text: str) -> frozenset[str]:
    """The anchors GitHub gives the headings of a Markdown text (and its explicit <a name/id>)."""
    lines = text.splitlines()
    inside = set()
    for i, j, _, _ in _fences(lines):
        inside.update(range(i, j + 1))
    seen, out = {}, set()
    for k, line in enumerate(lines):
        m = re.match(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m and k not in inside:
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
        out.update(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", line))
    return frozenset(out)


def link_problems(text: str, file: str, path: Path) -> list[tuple[int, str]]:
    """(line, problem) of each relative link that does not resolve."""
    lines = text.splitlines()
    prose = list(lines)
    for i, j, _, _ in _fences(lines):
        for k in range(i, min(j + 1, len(lines))):
            prose[k] = ""
    flat = _CODE_SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), "\n".join(prose))
    out = []
    targets = sorted((m.start(), m.group(1)) for pattern in _LINKS for m in pattern.finditer(flat))
    for start, target in targets:
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):
            continue  # http:, https:, mailto:
        file_part, _, anchor = target.partition("#")
        line = flat.count("\n", 0, start) + 1
        if not file_part:
            if anchor not in anchors_in(text):
                out.append((line, f"link {target}: no heading with that anchor in {file}"))
            continue
        dest = (path.parent / unquote(file_part)).resolve()
        if not dest.exists():
            out.append((line, f"link {target}: no such file"))
        elif anchor and dest.suffix == ".md" and anchor not in anchors_of(dest):
            out.append((line, f"link {target}: no heading with that anchor in {dest.relative_to(ROOT)}"))
    return out


def stale_in(text: str, file: str, path: Path | None = None) -> list[str]:
    """Every stale command and broken link of a Markdown text: ``file:line: `command`: why``."""
    out = []
    for cmd in commands_in(text, file):
        out += [f"{cmd.where()}: `{cmd.text}`: {p}" for p in command_problems(cmd)]
    out += [f"{file}:{line}: {p}" for line, p in link_problems(text, file, path or ROOT / file)]
    return out


# ---------------------------------------------------------------- tests


def test_configuration_reference_is_current():
    expected = configuration_reference()
    actual = REFERENCE.read_text() if REFERENCE.is_file() else None
    assert actual == expected, (
        f"{REFERENCE.relative_to(ROOT)} is out of date with the stage schemas; regenerate it with "
        f"`.venv/bin/sipa config-reference > docs/configuration.md` (and commit it)")


def test_config_reference_check_says_one_line(tmp_path, capsys):
    stale = tmp_path / "configuration.md"
    stale.write_text(REFERENCE.read_text().replace("| `compare_widths` |", "| `compare` |"))
    assert main(["config-reference", "--check", str(stale)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out of date" in err and "sipa config-reference >" in err, err
    assert main(["config-reference", "--check", str(tmp_path / "absent.md")]) == 1
    assert "not found" in capsys.readouterr().err
    assert main(["config-reference"]) == 0
    assert capsys.readouterr().out.startswith("# Configuration reference")


def test_the_reference_follows_the_registry(monkeypatch):
    """A new stage, key or nested schema appears without a change to the generator."""
    schema = {"knob": Field(int, 3, min=1, max=9, help="a new key"), "recipe": Field(dict, {}),
              "inner": Field(dict, {})}
    inner = {"depth": Field(float, 0.5, min=0, min_exclusive=True, nullable=True)}

    def read_config(path):
        cfg = check_section(load_yaml(path).get("extra"), schema, file=path, section="extra")
        check_recipe(cfg["recipe"], file=path, section="extra.recipe")
        cfg["inner"] = check_section(cfg["inner"], inner, file=path, section="extra.inner")
        return cfg

    monkeypatch.setitem(pipeline.STAGES, "extra", Stage("extra", "A new stage.\n\nMore.", read_config, None, None))
    text = configuration_reference()
    assert "\n## extra\n\nA new stage.\n" in text and "- [extra](#extra)" in text
    assert "| `knob` | integer | `3` | [1, 9] |  | a new key |" in text
    assert "keys: [extra.inner](#extrainner)" in text and "keys: [shared recipe keys](#shared-recipe-keys)" in text
    assert "\n### extra.inner\n" in text and "| `depth` | number | `0.5` | > 0 | yes |  |" in text
    assert "`quantize.recipe`, `extra.recipe`: each" in text


def test_every_documented_command_and_link_is_current():
    files = doc_files()
    assert files, "no README.md or docs/*.md found"
    stale = []
    for path in files:
        name = str(path.relative_to(ROOT))
        stale += stale_in(path.read_text(), name, path)
    assert not stale, f"{len(stale)} stale command(s)/link(s) in the docs:\n" + "\n".join(stale)


def test_the_docs_hold_commands_to_check():
    """The extractor finds the commands of each kind (a broken extractor would pass everything)."""
    cmds = [c for path in doc_files() for c in commands_in(path.read_text(), path.name)]
    tools = {_tool(seg.split()[0]) for c in cmds for seg in segments(c.text)}
    assert {"dvc", "sipa", "make"} <= tools, tools


STALE_DOC = """\
# A stale page

Try a smaller comparison:

```bash
dvc exp run -S quantize.compare=[]
```

Count it with `sipa score --no-such-flag` and rebuild it with `make no-such-target`.

```console
$ dvc exp run -S prune.scope=typo \\
    -S prune.method=gradual
$ sipa check-params params.yaml && make test ARGS="-k docs"
ok
$ python benchmarks/throughput.py --no-such-option
$ python stages/nope.py --params params.yaml
```

Also `dvc exp run -S nosection.key=1`, `dvc exp run -S 'prune.schedule=[0.7,0.5]'`,
`dvc exp run -S prune.epochs=1,2` and [the guide](no/such/file.md), [a heading](#no-such-heading).
These are fine: `dvc exp run -S 'prune.schedule=[0.5,0.7]' -S +prune.method=gradual`,
`dvc exp run --queue -S prune.epochs=1,2`, `sipa score --checkpoint` (a mention), `make -j 2 repro ARGS=...`,
`sipa plan [FILE] [--throughput IMG_PER_S | --measure] [--json]`, `python stages/prune.py --params <file>`,
`dvc exp run -S accelerate.recipe.lr=0.01` and [the heading](#a-stale-page).
"""


def test_the_checker_catches_stale_commands():
    """Proof the test can fail: a renamed key, an unknown flag, a missing target, and more."""
    stale = stale_in(STALE_DOC, "STALE.md", ROOT / "STALE.md")
    text = "\n".join(stale)

    def reported(line: int, command: str, why: str) -> bool:
        where = f"STALE.md:{line}: " + (f"`{command}" if command else "")
        return any(s.startswith(where) and why in s for s in stale)

    assert reported(6, "dvc exp run -S quantize.compare=[]", "quantize.compare: unknown key"), text
    assert "did you mean quantize.compare_widths" in text, text
    assert reported(9, "sipa score --no-such-flag", "unrecognized arguments: --no-such-flag"), text
    assert reported(9, "make no-such-target", "no target 'no-such-target'"), text
    assert reported(12, "dvc exp run -S prune.scope=typo", "prune.scope: 'typo' is not one of"), text
    assert not reported(12, "dvc exp run -S prune.scope=typo", "DVC refuses prune.scope"), text  # said once
    assert reported(16, "python benchmarks/throughput.py", "unrecognized arguments: --no-such-option"), text
    assert reported(17, "python stages/nope.py", "stages/nope.py: no such file"), text
    assert reported(20, "dvc exp run -S nosection.key=1", "is not a pipeline section"), text
    assert reported(20, "dvc exp run -S 'prune.schedule=[0.7,0.5]'", "targets must increase"), text
    assert reported(21, "dvc exp run -S prune.epochs=1,2", "needs --queue"), text
    assert reported(21, "", "link no/such/file.md: no such file"), text
    assert reported(21, "", "link #no-such-heading: no heading"), text
    # prune.method is not written in params.yaml: DVC needs +prune.method=gradual
    assert reported(12, "dvc exp run -S prune.scope=typo -S prune.method=gradual",
                    "DVC refuses prune.method=gradual: Could not override 'prune.method'"), text
    assert not [s for s in stale if re.match(r"STALE\.md:2[2-5]:", s)], text  # the good ones pass
    assert len(stale) == 12, text


@pytest.mark.parametrize("line, expected", [
    ("$ OMP_NUM_THREADS=1 dvc queue start -j 2  # two workers", [["dvc", "queue", "start", "-j", "2"]]),
    ("cp profiles/cpu.yaml params.yaml && dvc repro; make test 2>&1 | tail -3",
     [["cp", "profiles/cpu.yaml", "params.yaml"], ["dvc", "repro"], ["make", "test"], ["tail", "-3"]]),
    ("sipa config-reference > docs/configuration.md", [["sipa", "config-reference"]]),
    ("dvc exp show --keep 'score|accuracy' # a#b", [["dvc", "exp", "show", "--keep", "score|accuracy"]]),
])
def test_shell_lines_split_into_commands(line, expected):
    assert simple_commands(line.removeprefix("$ ")) == expected


@pytest.mark.parametrize("line, expected", [
    ("git clone <repo> && cd sipa && make install", ["git clone <repo>", "cd sipa", "make install"]),
    ("sipa plan [FILE] [--throughput IMG_PER_S | --measure] && make repro  # CIFAR ...",
     ["sipa plan [FILE] [--throughput IMG_PER_S | --measure]", "make repro"]),
    ("dvc exp show --keep 'score|accuracy'; sipa archs 2>&1 | head", ["dvc exp show --keep 'score|accuracy'",
                                                                      "sipa archs 2>&1", "head"]),
])
def test_shell_lines_split_at_control_operators(line, expected):
    assert segments(line) == expected

"""The documentation against the code it describes, so that neither drifts alone:
every flag of every mode (run.py's, bench.py's and deploy.py's) is documented in
docs/reference.md under a heading that names that mode, with the default its
parser has where the reference gives a number, every flag the pages name exists,
every relative link and anchor in README.md and docs/*.md resolves,
and every `python run.py ...` command in their fenced blocks parses (the parser
alone: nothing is trained)."""
import argparse
import os
import re
import shlex
from unittest import mock

import pytest

import bench
import deploy
import run
from utils import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
PAGES = ["README.md"] + sorted(os.path.join("docs", name) for name in os.listdir(DOCS) if name.endswith(".md"))
REFERENCE = os.path.join("docs", "reference.md")
# The other command lines, by the names reference.md's headings give them: how each builds its parser.
SCRIPTS = {"bench.py": lambda: bench.main([]), "bench.py gpu": lambda: bench.main(["gpu"]),
           "deploy.py": lambda: deploy.main([])}
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*")
# Flags of other programs that the pages quote in their commands (pip, torchrun).
FOREIGN_FLAGS = {"--index-url", "--standalone", "--nproc-per-node"}


def read(page):
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return f.read()


def option_flags(parser):
    return {flag for flag in parser._option_string_actions if flag.startswith("--")}


def script_parser(start):
    """The parser a script's main() builds, caught as it starts parsing (every parse_*
    method of argparse goes through parse_known_args): nothing runs."""

    class Built(Exception):
        pass

    def catch(self, *args, **kwargs):
        raise Built(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_known_args", catch), pytest.raises(Built) as built:
        start()
    return built.value.args[0]


def mode_parsers():
    """{mode name: its parser}: run.py's modes, bench.py and deploy.py."""
    modes = {name: sub for action in run.build_parser()._actions if isinstance(action, argparse._SubParsersAction)
             for name, sub in action.choices.items()}
    modes.update({name: script_parser(script) for name, script in SCRIPTS.items()})
    return modes


def sections(text):
    """[(heading, body)] for each '#'-heading of a Markdown page, fenced blocks skipped."""
    out, heading, body, fenced = [], "", [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and re.match(r"#{1,6} ", line):
            out.append((heading, "\n".join(body)))
            heading, body = line, []
        else:
            body.append(line)
    out.append((heading, "\n".join(body)))
    return out


def mode_sections(mode):
    """The bodies of reference.md's sections whose heading names mode in backticks
    (`distil`), each one's subsections included."""
    level = None
    for heading, body in sections(read(REFERENCE)):
        depth = len(heading) - len(heading.lstrip("#"))
        if level is not None and depth <= level:
            level = None
        if level is None and f"`{mode}`" in heading:
            level = depth
        if level is not None:
            yield body


def documented_flags(mode):
    """The flags reference.md documents for mode, in the sections that name it."""
    return {flag.replace("_", "-") for body in mode_sections(mode) for flag in FLAG.findall(body)}


@pytest.mark.parametrize("mode", sorted(mode_parsers()))
def test_every_flag_of_a_mode_is_in_the_reference(mode):
    parser = mode_parsers()[mode]
    missing = sorted(option_flags(parser) - {"--help"} - documented_flags(mode))
    assert not missing, f"{REFERENCE} does not document {missing} under a heading naming `{mode}`"


def documented_numbers(mode):
    """{flag: number} from the reference's flag tables that name mode: the rows of a
    single flag whose default cell is a plain number."""
    numbers = {}
    for body in mode_sections(mode):
        for flag, default in re.findall(r"^\| `(--[a-z0-9-]+)(?: [A-Z_]+)?` \| ([^|]*?) \|", body, flags=re.M):
            if re.fullmatch(r"-?[0-9.]+(e-?[0-9]+)?", default):
                numbers[flag] = float(default)
    return numbers


@pytest.mark.parametrize("mode", sorted(mode_parsers()))
def test_the_reference_gives_each_number_flag_its_default(mode):
    actions = mode_parsers()[mode]._option_string_actions
    numbers = documented_numbers(mode)
    assert numbers or mode not in ("gen", "LoRA", "rnn", "distil"), "the reference gives no defaults here"
    for flag, documented in numbers.items():
        default = actions[flag].default
        assert isinstance(default, (int, float)) and float(default) == documented, \
            f"{REFERENCE}: `{flag}` of `{mode}` defaults to {default!r}, documented as {documented:g}"


def test_every_flag_the_reference_names_exists():
    known = set().union(*(option_flags(p) for p in mode_parsers().values())) | FOREIGN_FLAGS
    named = {flag.replace("_", "-") for flag in FLAG.findall(read(REFERENCE))}
    assert named, "reference.md names no flag"
    assert not sorted(named - known), f"{REFERENCE} names flags no parser has: {sorted(named - known)}"


def test_every_flag_the_pages_name_exists():
    known = set().union(*(option_flags(p) for p in mode_parsers().values())) | FOREIGN_FLAGS
    for page in PAGES:
        named = {flag.replace("_", "-") for flag in FLAG.findall(read(page))}
        assert not sorted(named - known), f"{page} names flags no parser has: {sorted(named - known)}"


def slug(heading):
    """GitHub's anchor for a heading."""
    text = heading.lstrip("#").strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page):
    return {slug(heading) for heading, _ in sections(read(page)) if heading}


def links(page):
    text = re.sub(r"```.*?```", "", read(page), flags=re.S)
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_resolve(page):
    assert links(page) or page != "README.md", "the README links nowhere"
    for link in links(page):
        if re.match(r"[a-z]+:", link):
            continue  # https:, mailto:
        target, _, anchor = link.partition("#")
        path = os.path.normpath(os.path.join(os.path.dirname(page), target)) if target else page
        assert os.path.exists(os.path.join(ROOT, path)), f"{page}: {link} -> {path} does not exist"
        if anchor and path.endswith(".md"):
            assert anchor in anchors(path), f"{page}: {link}: {path} has no heading #{anchor}"


def fenced_commands(text):
    """Every command line in the page's fenced blocks, as argv lists, with the
    variables that the block assigns (T=..., export S='...') expanded."""
    commands = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        env = {}
        for line in block.replace("\\\n", " ").splitlines():
            segment = []
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            for token in [*lexer, ";"]:
                if set(token) <= set(";&|<>()"):  # the end of one command
                    argv = segment[1:] if segment[:1] == ["export"] else segment
                    while argv and re.fullmatch(r"[A-Za-z_]\w*=.*", argv[0], flags=re.S):
                        name, _, value = argv.pop(0).partition("=")
                        env[name] = value
                    if argv:
                        commands.append(argv)
                    segment = []
                elif re.fullmatch(r"\$\{?\w+\}?", token):
                    name = token.strip("${}")
                    assert name in env, f"${name} is used before the block sets it: {line}"
                    segment += env[name].split()
                else:
                    segment.append(re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), m.group(0)), token))
    return commands


def run_py_argv(command):
    """The arguments run.py receives from a command line, or None if it runs something else."""
    for i, word in enumerate(command):
        if os.path.basename(word) == "run.py" and i and (command[0].startswith("python") or command[0] == "torchrun"):
            return command[i + 1:]
    return None


def test_the_command_reader_finds_commands_and_expands_variables():
    text = ("```bash\nexport OMP_NUM_THREADS=1; T=path/to/teacher; S='--tune seed=0,1'\n"
            "python run.py distil --teacher $T $S --out-dir runs/x   # a comment\n"
            "python run.py compare runs/a \\\n  runs/b && python run.py tune-report t.tsv\n```\n")
    argvs = [run_py_argv(c) for c in fenced_commands(text)]
    assert argvs == [["distil", "--teacher", "path/to/teacher", "--tune", "seed=0,1", "--out-dir", "runs/x"],
                     ["compare", "runs/a", "runs/b"], ["tune-report", "t.tsv"]]


@pytest.mark.parametrize("page", PAGES)
def test_every_run_py_command_parses(page):
    argvs = [argv for argv in map(run_py_argv, fenced_commands(read(page))) if argv is not None]
    if page == "README.md":
        assert len(argvs) >= 8, "the README's first hour and modes show run.py commands"
    for argv in argvs:
        try:
            run.build_parser().parse_args(run.canonical_mode(argv))
        except UserError as e:
            pytest.fail(f"{page}: python run.py {shlex.join(argv)}: {e}")
        except SystemExit as e:  # --help
            assert e.code == 0, argv


def test_a_bad_command_in_a_page_would_fail():
    """The parse check is not vacuous: a misspelt flag is an error."""
    with pytest.raises(UserError):
        run.build_parser().parse_args(["rnn", "--no-such-flag", "3"])

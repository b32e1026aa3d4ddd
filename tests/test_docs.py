"""The commands the README and docs/ show exist: make targets, scripts and their flags, CLI flags,
config files and config keys. A renamed flag or target breaks this test, not the reader."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from trainer.config import RunConfig

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
INLINE = re.compile(r"`((?:make|\.venv/bin/|bash benchmarks/|torchrun|python3? benchmarks/|anytime-)[^`]*)`")
CLI_SOURCES = {
    "anytime-train": "trainer/cli.py",
    "trainer.cli": "trainer/cli.py",
    "anytime-eval": "trainer/evaluate.py",
}


def shell_blocks(text: str) -> list[str]:
    """The contents of the ```bash (or sh, console) fenced blocks, in order."""
    blocks, current, language = [], None, None
    for line in text.splitlines():
        if line.startswith("```"):
            if current is None:
                current, language = [], line[3:].strip()
            else:
                if language in ("bash", "sh", "console"):
                    blocks.append("\n".join(current) + "\n")
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def commands(page: Path) -> list[str]:
    """Every shell command of the page: fenced blocks (continuations joined, comments dropped) and
    inline code that starts like a command."""
    text = page.read_text()
    found = []
    for block in shell_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#") and not line.startswith(("import ", "from ", ">>>")):
                found.append(line)
    found += [match.strip() for match in INLINE.findall(text)]
    return found


def make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))


def config_key_exists(key: str) -> bool:
    import dataclasses
    import typing

    node = RunConfig
    for part in key.split("."):
        if not dataclasses.is_dataclass(node):
            return False
        fields = {f.name: typing.get_type_hints(node)[f.name] for f in dataclasses.fields(node)}
        if part not in fields:
            return False
        node = fields[part]
    return True


def problems(command: str) -> list[str]:
    """What in ``command`` does not exist (empty: all of it does)."""
    try:
        words = shlex.split(command)
    except ValueError:
        return [f"cannot split {command!r}"]
    words = [w for w in words if not re.fullmatch(r"[A-Z_]+=\S*", w)]  # environment assignments
    if not words:
        return []
    found = []
    if words[0] == "make":
        found += [f"make target {w!r}" for w in words[1:] if not w.startswith("-") and "=" not in w
                  and w not in make_targets()]  # fmt: skip
        return found
    source = None  # the text of the program the flags after it belong to (a launcher's are not checked)
    for index, word in enumerate(words):
        name = word.rsplit("/", 1)[-1]
        flag = word.split("=")[0]
        if word.endswith((".py", ".sh")) and "/" in word:
            if not (ROOT / word).is_file():
                found.append(f"script {word}")
                continue
            source = (ROOT / word).read_text()
            if word.startswith("benchmarks/"):
                source += (ROOT / "benchmarks" / "common.py").read_text()
        elif name in CLI_SOURCES and (index == 0 or words[index - 1] == "-m" or word.startswith(".venv/bin/")):
            source = (ROOT / CLI_SOURCES[name]).read_text()
        elif word.startswith("configs/") and not (ROOT / word).is_file():
            found.append(f"config file {word}")
        elif flag.startswith("--") and source is not None and f'"{flag}"' not in source:
            found.append(f"flag {flag}")
        elif source is not None and re.fullmatch(r"[a-z_]+(\.[a-z_]+)+=.*", word) and not config_key_exists(flag):
            found.append(f"config key {flag}")
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_command_on_the_page_exists(page):
    listed = commands(page)
    missing = {command: found for command in listed if (found := problems(command))}
    assert not missing, missing


def test_the_readme_has_exactly_the_two_setup_commands_and_ci_runs_the_test_one():
    first_block = shell_blocks((ROOT / "README.md").read_text())[0]
    lines = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert lines == ["make train", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_the_checker_catches_what_does_not_exist():
    assert problems("make trian") == ["make target 'trian'"]
    assert problems(".venv/bin/python benchmarks/bench_logprobs.py --quik") == ["flag --quik"]
    assert problems(".venv/bin/anytime-train --config configs/nope.yaml optim.lrr=1") == [
        "config file configs/nope.yaml", "config key optim.lrr"]  # fmt: skip
    assert problems("torchrun --nproc_per_node 2 -m trainer.cli --config configs/tiny-cpu.yaml --resum auto") == [
        "flag --resum"
    ]
    assert problems(".venv/bin/anytime-eval --compare a.json --out cmp") == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_marked_table_is_what_results_py_makes_of_its_run(page):
    """A table after ``<!-- results.py ARGS -->`` is pasted from ``benchmarks/results.py ARGS``."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from results import render

    text = page.read_text()
    for match in re.finditer(r"<!-- results\.py (.*?) -->\n", text):
        expected = render(shlex.split(match.group(1)))
        assert text[match.end() : match.end() + len(expected)] == expected, (page.name, match.group(1))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_table_marked_as_pasted_is_in_its_file(page):
    """A table after ``<!-- from PATH -->`` (a run's own summary, e.g. a ``targets.txt``) appears in
    PATH line for line."""
    text = page.read_text()
    for match in re.finditer(r"<!-- from (\S+) -->\n((?:\|.*\n)+)", text):
        source = ROOT / match.group(1)
        assert source.is_file(), (page.name, match.group(1))
        assert match.group(2) in source.read_text(), (page.name, match.group(1))


def test_results_py_pivots_a_benchmark_csv(tmp_path):
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from results import render

    rows = [("a", "ours", "time_ms", "2.0", "ms"), ("a", "ours", "peak_mem_mb", "10.0", "MiB"),
            ("a", "base", "time_ms", "4.0", "ms"), ("b", "ours", "time_ms", "123.4", "ms")]  # fmt: skip
    path = tmp_path / "bench_x.csv"
    path.write_text("benchmark,case,provider,metric,value,unit\n" + "".join(f"x,{','.join(r)}\n" for r in rows))
    assert render([str(path), "--case", "^a$", "--ratio-to", "base"]).splitlines() == [
        "| provider | time_ms | peak_mem_mb | time / base |",
        "| --- | --- | --- | --- |",
        "| ours | 2 ms | 10.0 MiB | 0.50 |",
        "| base | 4 ms | - | 1.00 |",
        "",
        f"a: from `{path.as_posix()}`.",
    ]
    assert render([str(path), "--metric", "time_ms", "--providers", "ours"]).splitlines()[2:4] == [
        "| a | ours | 2 ms |",
        "| b | ours | 123 ms |",
    ]
    (tmp_path / "other.csv").write_text("name,score\nx,1\n")
    with pytest.raises(ValueError, match="not a benchmark CSV"):
        render([str(tmp_path / "other.csv")])

"""Every command the README and docs/ print runs as printed: each entry point it
names exists, each --flag it passes is one that entry point defines, and each
--config.<path> is a field of the config it loads."""

import functools
import glob
import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", *sorted(os.path.relpath(p, ROOT)
                              for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
SCRIPT = re.compile(r"python (launch|benchmarks)/(\w+)\.py")


def commands(page: str) -> list[str]:
  """The `python launch/...` and `python benchmarks/...` commands in the fenced
  blocks of a page (continuation lines joined, console prompts dropped)."""
  text = open(os.path.join(ROOT, page), encoding="utf-8").read()
  out = []
  for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
    joined = re.sub(r"\\\n\s*", " ", block)
    for line in joined.splitlines():
      line = line.strip().removeprefix("$ ")
      match = SCRIPT.search(line)
      if match and not line.startswith("#"):
        out.append(line[match.start():])
  return out


@functools.cache
def defined_flags(script: str) -> frozenset:
  """The flags `python SCRIPT --helpfull` lists (absl exits 1 after help)."""
  run = subprocess.run([sys.executable, script, "--helpfull"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  names = re.findall(r"^\s+--(?:\[no\])?([\w.]+)", run.stdout + run.stderr, flags=re.M)
  assert names, f"{script} --helpfull listed no flags: {run.stderr[-1000:]}"
  return frozenset(names)


def config_of(command: str):
  """The ConfigDict a --config=FILE[:variant] argument loads."""
  spec = re.search(r"--config=(\S+)", command).group(1)
  path, _, variant = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("doc_config", os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


def test_the_pages_print_commands():
  assert len(commands("README.md")) >= 8
  assert sum(len(commands(p)) for p in PAGES) > len(commands("README.md"))


@pytest.mark.parametrize("page", PAGES)
def test_every_command_names_real_entry_points_flags_and_config_fields(page):
  for command in commands(page):
    script = SCRIPT.search(command).group(0).split()[1]
    assert os.path.exists(os.path.join(ROOT, script)), (page, command)
    config = config_of(command) if "--config=" in command else None
    for flag in re.findall(r"--([\w.]+)", command):
      if flag.startswith("config."):
        node = config
        for key in flag.split(".")[1:]:
          assert node is not None and key in node, (page, command, flag)
          node = node[key]
      else:
        assert flag in defined_flags(script), (page, command, flag)

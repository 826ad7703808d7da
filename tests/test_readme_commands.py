"""Every command the READMEs show works as printed (README.md and notebooks/README.md).

The commands are read from the files themselves: each line of a ```bash block, and each inline
`code` span that starts like a command (`python -m minigpt4_lite`, `./run`, `pytest`, `jupyter`,
`conda`, `pip install`). `how_checked` says how each one is exercised; a command it does not know
fails `test_every_readme_command_is_covered`, so a new command cannot be added untested.

- fast commands run for real (`info`, `chat --greedy` on a shipped sample);
- training commands run for real in a temporary folder with a few steps (arguments appended to
  the printed ones: argparse lets a later option win), in the order the README gives them;
- "own data" commands (`prepare-data`, `answer`, and whatever reads the user's files that
  `OWN_DATA` names) run for real, in order, in a temporary folder where the test first writes
  those files (ToyWorld scenes as JPEG files with captions);
- long jobs (`demo`, `ablate`, `build-assets`, `curate --compare`) are parsed by the real
  parser and show `--help`;
- commands that need the real 7B/13B weights are parsed by the real parser only;
- `./run` runs with `SKIP_SETUP=1` (the current environment, no pip), `pytest` commands collect,
  `jupyter nbconvert` executes a one-cell notebook with the printed options; `./run lab` starts
  JupyterLab for real, and the test asks the server for the chapters and starts a kernel.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from minigpt4_lite import toyworld as tw
from minigpt4_lite.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
READMES = (ROOT / "README.md", ROOT / "notebooks" / "README.md")
INLINE_STARTS = ("python -m minigpt4_lite ", "./run ", "pytest ", "jupyter ", "conda ",
                 "pip install ")
CLI = ["python", "-m", "minigpt4_lite"]
REAL_PRESETS = ("minigpt4-7b", "minigpt4-13b", "minigpt4-llama2")
LONG_JOBS = ("demo", "ablate", "build-assets")
TRAINING_JOBS = ("train", "eval", "curate")
# Arguments appended to a training command to make it cheap (a later option overrides).
CHEAP = {"train": ["--steps", "2", "--n-scenes", "8", "--save-every", "0"],
         "eval": ["--n-eval", "2"], "curate": ["--n", "2"]}
# The user's files that the "own data" commands name (`write_own_data` writes them) and the
# folders those commands write; a command naming one of them runs in that chain.
OWN_DATA = ("my_photos/", "my_descriptions.jsonl", "questions.jsonl", "shards/", "my_align/",
            "runs/my_stage")
CHEAP_OWN = {"prepare-data": ["--shard-size", "2"],  # 8 photos: the README's 4 shards
             "train": ["--steps", "2", "--batch-size", "4", "--save-every", "0"],
             "chat": ["--greedy", "--max-new-tokens", "8"], "answer": ["--max-new-tokens", "8"]}


def bash_commands(path: Path) -> list[list[str]]:
    """The commands of every ```bash block: one per line (`\\` continues it), comments dropped."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", path.read_text(), re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                commands.append(argv)
    return commands


def inline_commands(path: Path) -> list[str]:
    """Inline `code` spans of the file that are commands (`INLINE_STARTS`)."""
    return [span for span in re.findall(r"`([^`\n]+)`", path.read_text())
            if span.startswith(INLINE_STARTS)]


def all_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every command in the READMEs; a `a | b | c` synopsis keeps its text."""
    out = []
    for path in READMES:
        where = path.relative_to(ROOT).as_posix()
        out += [(f"{where} bash", argv) for argv in bash_commands(path)]
        out += [(f"{where} inline", span.split() if " | " in span else shlex.split(span))
                for span in inline_commands(path)]
    return out


def _subcommand(argv: list[str]) -> str | None:
    return argv[3] if argv[:3] == CLI and len(argv) > 3 else None


def how_checked(argv: list[str]) -> str | None:
    """The test that exercises `argv`, or None if no test does."""
    sub = _subcommand(argv)
    if sub is not None:
        if "|" in argv:
            return "synopsis"  # `python -m minigpt4_lite info | demo | ...`: names subcommands
        if sub in ("prepare-data", "answer") or any(a.startswith(OWN_DATA) for a in argv):
            return "own-data" if not any(p in argv for p in REAL_PRESETS) else "parse"
        if any(preset in argv for preset in REAL_PRESETS) and sub != "info":
            return "parse"  # needs the real 7B/13B weights
        if sub == "info":
            return "run"
        if sub == "chat":
            return "chat"
        if sub in LONG_JOBS or "--compare" in argv:  # --compare trains stage 2 twice
            return "help"
        if sub in TRAINING_JOBS:
            return "training"
        return None
    if argv[:1] == ["./run"] and argv[1:2] in (["demo"], ["test"], ["lab"]):
        return "run-script"
    if argv[:2] == ["pytest", "--nbval-lax"]:
        return "pytest"
    if argv[:1] == ["pytest"] and all(a.startswith("tests/") for a in argv[1:2]):
        return "pytest-tests"
    if argv[:2] == ["jupyter", "nbconvert"]:
        return "nbconvert"
    if argv[:2] == ["jupyter", "lab"]:
        return "jupyter-lab"
    if argv == ["conda", "env", "create", "-f", "environment.yml"]:
        return "conda"
    if argv[:2] == ["pip", "install"]:
        return "pip"
    return None


def commands_checked_by(kind: str) -> list[list[str]]:
    found = [argv for _, argv in all_commands() if how_checked(argv) == kind]
    assert found, f"no README command is checked by {kind!r} any more: remove that test"
    return found


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg",
            "TRANSFORMERS_VERBOSITY": "error"}


def _run(argv: list[str], cwd: Path = ROOT, timeout: int = 600, stdin: str | None = None,
         **env) -> str:
    """Run a README command with this interpreter (for `python`); returns stdout, asserts exit 0."""
    if argv[0] == "python":
        argv = [sys.executable, *argv[1:]]
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**_env(), **env}, input=stdin)
    assert done.returncode == 0, f"{shlex.join(argv)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_readmes_have_commands():
    commands = all_commands()
    assert any(where == "README.md bash" for where, _ in commands)
    assert any(where.startswith("notebooks/README.md") for where, _ in commands)


def test_every_readme_command_is_covered():
    """A command this file does not know how to check fails here: add a check for it."""
    unknown = [f"{where}: {shlex.join(argv)}" for where, argv in all_commands()
               if how_checked(argv) is None]
    assert not unknown, "README commands no test exercises:\n" + "\n".join(unknown)


def test_readme_cli_commands_parse():
    """Every `python -m minigpt4_lite ...` command is accepted by the real argument parser."""
    parser = build_parser()
    commands = [argv for _, argv in all_commands()
                if _subcommand(argv) and how_checked(argv) != "synopsis"]
    assert len(commands) >= 10
    for argv in commands:
        try:
            parser.parse_args(argv[3:])
        except SystemExit:
            pytest.fail(f"the README's `{shlex.join(argv)}` does not parse")


def test_readme_synopsis_names_real_subcommands():
    parser = build_parser()
    subcommands = set(next(a for a in parser._actions if a.dest == "command").choices)
    for argv in commands_checked_by("synopsis"):
        named = {word for word in argv[3:] if word != "|"}
        assert named <= subcommands, named - subcommands
        assert subcommands <= named, f"the synopsis misses {subcommands - named}"


def test_readme_real_preset_commands_name_their_weights():
    """The 7B/13B commands cannot run here: their options are valid, and a chat names the
    projection file and the image (the hub ids of the other parts are the preset's defaults)."""
    for argv in commands_checked_by("parse"):
        args = build_parser().parse_args(argv[3:])
        assert args.preset in REAL_PRESETS
        if args.command == "chat":
            assert args.projection and args.image


@pytest.mark.slow
def test_readme_info_commands_run():
    for argv in commands_checked_by("run"):
        out = _run(argv)
        if "--json" in argv:
            counts = json.loads(out)
            if "minigpt4-7b" in argv:  # the README quotes these numbers
                assert counts["projection_params"] == 3_149_824
                assert counts["trainable_params"] == 3_149_824


@pytest.mark.slow
def test_readme_chat_command_answers_about_the_sample():
    for argv in commands_checked_by("chat"):
        image = argv[argv.index("--image") + 1]
        assert (ROOT / image).is_file(), f"the README's chat example names a missing {image}"
        answer = _run(argv).strip().lower()
        assert any(colour in answer for colour in tw.COLOURS), answer


@pytest.mark.slow
def test_readme_training_commands_run_in_order(tmp_path):
    """train stage 1 -> train stage 2 from it -> eval -> curate, as printed, a few steps each."""
    ran = []
    for argv in commands_checked_by("training"):
        _run([*argv, *CHEAP[_subcommand(argv)]], cwd=tmp_path)
        ran.append(_subcommand(argv))
    assert {"train", "eval"} <= set(ran)
    assert (tmp_path / "runs" / "s2").is_dir()  # stage 2 started from stage 1's folder


def write_own_data(folder: Path, n: int = 8) -> None:
    """The files the README's "own data" commands name: `my_photos/` (ToyWorld scenes as JPEG
    files, `cat.jpg` first, with side-car captions), `my_descriptions.jsonl` (detailed
    descriptions of the same images) and `questions.jsonl`; `assets/` linked for the samples."""
    import random

    (folder / "my_photos").mkdir()
    names = ["cat", *(f"photo_{k}" for k in range(1, n))]
    descriptions, questions = [], []
    for k, (name, scene) in enumerate(zip(names, tw.make_scenes("train", n, start=7000))):
        scene.render(120).save(folder / "my_photos" / f"{name}.jpg")
        (folder / "my_photos" / f"{name}.txt").write_text(tw.caption(scene, random.Random(k)))
        descriptions.append({"image": f"my_photos/{name}.jpg",
                             "caption": tw.detailed_description(scene, random.Random(k))})
        questions.append({"image": f"my_photos/{name}.jpg",
                          "prompt": "How many objects are there?"})
    for name, lines in (("my_descriptions.jsonl", descriptions), ("questions.jsonl", questions)):
        (folder / name).write_text("".join(json.dumps(line) + "\n" for line in lines))
    (folder / "assets").symlink_to(ROOT / "assets", target_is_directory=True)


@pytest.mark.slow
def test_readme_own_data_commands_run_in_order(tmp_path):
    """prepare-data -> train stage 1 on the shards -> prepare-data -> stage 2 -> chat, then batch
    inference, as printed (a few steps, short answers), on files written here."""
    write_own_data(tmp_path)
    ran = []
    for argv in commands_checked_by("own-data"):
        sub = _subcommand(argv)
        chat_stdin = "How many objects are there?\n/quit\n" if "--prompt" not in argv else None
        out = _run([*argv, *CHEAP_OWN[sub]], cwd=tmp_path, stdin=chat_stdin)
        if sub == "prepare-data" and "--stage" in argv and argv[argv.index("--stage") + 1] == "1":
            printed = re.search(r"--data '([^']+)'", out).group(1)
            assert any(printed in a for a in commands_checked_by("own-data")), \
                f"prepare-data printed --data '{printed}', which the README's train does not use"
        if sub == "chat":  # the interactive chat: its greeting, then the answer
            assert len(out.strip().splitlines()) >= 2, f"the chat answered nothing: {out!r}"
        if sub == "answer":
            lines = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text()
                     .splitlines()]
            assert lines and all(line.get("answer") for line in lines), lines
        ran.append(sub)
    assert ran.count("prepare-data") == 2 and ran.count("train") == 2 and "answer" in ran
    assert (tmp_path / "runs" / "my_stage2").is_dir()  # stage 2 started from stage 1's folder


def test_readme_long_jobs_show_help():
    for argv in commands_checked_by("help"):
        assert "usage:" in _run([*argv[:4], "--help"])


@pytest.mark.slow
def test_readme_run_script_commands():
    """`./run demo`, `lab` and `test` dispatch as printed (no set-up: the current environment)."""
    venv = str(Path(sys.executable).parent.parent)
    commands = commands_checked_by("run-script")
    assert {argv[1] for argv in commands} == {"demo", "lab", "test"}
    for argv in commands:
        if argv[1] == "demo":
            assert "usage:" in _run([*argv, "--help"], SKIP_SETUP="1", VENV=venv)
        elif argv[1] == "lab":  # JupyterLab takes the options after `lab`, then prints its version
            assert re.match(r"\d+\.", _run([*argv, "--version"], SKIP_SETUP="1", VENV=venv))
        else:  # ruff, then pytest collects every test and notebook
            out = _run([*argv, "--collect-only", "-q"], SKIP_SETUP="1", VENV=venv)
            assert "tests/test_readme_commands.py" in out and ".ipynb" in out


def test_notebook_pytest_commands_collect():
    for argv in commands_checked_by("pytest"):
        argv = [a.replace("NN_name", "01_alignment") for a in argv]
        if not any(a.startswith("notebooks") for a in argv):  # `pytest --nbval-lax` in prose
            argv.append("notebooks/01_alignment.ipynb")
        out = _run([sys.executable, "-m", *argv, "--collect-only", "-q"])
        assert "01_alignment.ipynb" in out


def test_pytest_commands_on_tests_collect():
    for argv in commands_checked_by("pytest-tests"):
        out = _run([sys.executable, "-m", *argv, "--collect-only", "-q", "-p", "no:cacheprovider"])
        assert f"{argv[1]}::" in out  # it names real tests (none collected: exit code 5)


@pytest.mark.slow
def test_notebook_nbconvert_commands_execute(tmp_path):
    """The printed options, on a one-cell notebook copied to a temporary folder."""
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(6 * 7)")])
    for argv in commands_checked_by("nbconvert"):
        path = tmp_path / "NN_name.ipynb"
        nbformat.write(nb, path)
        args = [str(path) if a.endswith(".ipynb") else a for a in argv[2:]]
        if not any(a.endswith(".ipynb") for a in args):
            args.append(str(path))
        if "--inplace" not in args:
            args += ["--output-dir", str(tmp_path / "out")]
        _run([sys.executable, "-m", "jupyter", "nbconvert", *args], cwd=tmp_path)
        if "--inplace" in args:
            assert "42" in json.dumps(nbformat.read(path, as_version=4))


def test_jupyter_lab_command_exists():
    for argv in commands_checked_by("jupyter-lab"):
        assert (ROOT / argv[-1]).is_dir()
        assert re.match(r"\d+\.", _run([sys.executable, "-m", "jupyterlab", "--version"]))


def test_conda_and_pip_commands_name_real_files_and_packages():
    """No conda or network here: `environment.yml` exists (tests/test_packaging.py checks that it
    lists what pyproject.toml lists), and every `pip install` argument is a valid requirement."""
    from packaging.requirements import Requirement

    for argv in commands_checked_by("conda"):
        assert (ROOT / argv[-1]).is_file()
    for argv in commands_checked_by("pip"):
        for spec in argv[2:]:
            if not spec.startswith("-") and not spec.startswith("."):
                Requirement(spec)


def test_inline_option_fragments_exist():
    """Prose names options like `build-assets --parts llm`: each such option exists."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for path in READMES:
        for span in re.findall(r"`([^`\n]+)`", path.read_text()):
            words = span.split()
            if words and words[0] in subparsers and len(words) > 1 and words[1].startswith("--"):
                known = {o for a in subparsers[words[0]]._actions for o in a.option_strings}
                flags = {w.split("=")[0] for w in words[1:] if w.startswith("--")}
                assert flags <= known, f"{path.name}: `{span}` names {flags - known}"


def _get(url: str, token: str, method: str = "GET") -> dict:
    import urllib.request

    request = urllib.request.Request(url, method=method,
                                     headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read() or b"{}")


def _execute(url: str, token: str, code: str) -> str:
    """Run `code` in a Jupyter kernel over its websocket (the way the browser does); its stdout."""
    import uuid

    import websocket  # websocket-client, a dependency of jupyter_server

    ws = websocket.create_connection(url.replace("http", "ws", 1), timeout=60,
                                     header=[f"Authorization: token {token}"])
    msg_id = uuid.uuid4().hex
    ws.send(json.dumps({"header": {"msg_id": msg_id, "msg_type": "execute_request",
                                   "username": "test", "session": uuid.uuid4().hex,
                                   "version": "5.3"},
                        "parent_header": {}, "metadata": {}, "channel": "shell",
                        "content": {"code": code, "silent": False}}))
    out = ""
    try:
        while True:
            msg = json.loads(ws.recv())
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                out += msg["content"]["text"]
            elif msg["msg_type"] == "error":
                pytest.fail("\n".join(msg["content"]["traceback"]))
            elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                return out
    finally:
        ws.close()


@pytest.mark.slow
def test_run_lab_serves_the_workbook_with_a_kernel(tmp_path):
    """`./run lab --no-browser --port P`: the server answers, its file browser is rooted at
    notebooks/ (the chapters at the top), and its Python kernel imports the package."""
    import socket
    import time

    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token, url = "readme-test", f"http://127.0.0.1:{port}/api"
    env = {**_env(), "SKIP_SETUP": "1", "VENV": str(Path(sys.executable).parent.parent),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
           "JUPYTER_CONFIG_DIR": str(tmp_path / "config")}
    as_root = ["--allow-root"] if os.geteuid() == 0 else []  # CI containers run as root
    lab = subprocess.Popen(["./run", "lab", "--no-browser", "--port", str(port), *as_root,
                            "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}"],
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    try:
        for _ in range(120):
            try:
                assert "started" in _get(f"{url}/status", token)
                break
            except OSError:
                assert lab.poll() is None, f"./run lab stopped:\n{lab.stdout.read()}"
                time.sleep(0.5)
        else:
            pytest.fail("JupyterLab did not answer within 60 s")
        chapters = {item["name"] for item in _get(f"{url}/contents", token)["content"]}
        assert {"01_alignment.ipynb", "05_attention_and_projected_tokens.ipynb"} <= chapters
        assert "python3" in _get(f"{url}/kernelspecs", token)["kernelspecs"]
        kernel = _get(f"{url}/kernels", token, method="POST")
        assert "minigpt4_lite" in _execute(f"{url}/kernels/{kernel['id']}/channels", token,
                                           "import minigpt4_lite; print(minigpt4_lite.__name__)")
        _get(f"{url}/kernels/{kernel['id']}", token, method="DELETE")
    finally:
        lab.terminate()
        try:
            lab.wait(timeout=20)
        except subprocess.TimeoutExpired:
            lab.kill()
            lab.wait()

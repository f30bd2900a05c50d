"""Runs the command line (``python -m igpt_jax.main``) for many argument lists from one started process.

The package is imported once; each command then runs in a forked child: a real process with its own exit status,
standard output and standard error, which is what the command-line tests check (one-line errors, exit 2, nothing
written). Forking saves each command the seconds of a fresh interpreter importing JAX and the data libraries. JAX's
backend is never started in this parent, so each child starts its own as a fresh process would.

    python tests/cli_runner.py < commands.json > results.json

The input is a JSON object ``{"commands": [{"args": [...], "env": {...}}, ...], "parallel": bool}``; the output a
JSON list of ``{"returncode", "stdout", "stderr"}`` in the same order. With ``parallel`` every command is started
before any is waited for (the processes of one multi-process run). Use `run_commands` from a test.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_commands(commands: list[dict], *, parallel: bool = False, timeout: float = 600) -> list[dict]:
    """Runs each ``{"args": [...], "env": {...}}`` (env: variables set on top of this process's) through main, one
    after the other or, with `parallel`, all at once."""
    request = json.dumps({"commands": commands, "parallel": parallel})
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve())], input=request, text=True,
                          capture_output=True, timeout=timeout, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    if proc.returncode != 0:
        raise RuntimeError(f"cli_runner failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def kill_when(args: list[str], ready, output: Path, timeout: float = 300) -> None:
    """Starts ``python -m igpt_jax.main ARGS`` on one device (the session's other XLA flags kept, so that its steps
    are computed exactly as the in-process runs'), SIGKILLs it as soon as `ready()` is true (or it ended, or after
    `timeout` seconds) and waits for it; its output goes to `output`."""
    flags = os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=1")
    env = dict(os.environ, XLA_FLAGS=flags, PYTHONUNBUFFERED="1")
    with open(output, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "igpt_jax.main", *args], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.kill()
    proc.wait(timeout=60)


def _start_child(args: list[str], env: dict[str, str], out_path: str, err_path: str) -> int:
    """Forks a child that runs main with `args` (stdout and stderr to the two files); returns its pid."""
    pid = os.fork()
    if pid == 0:  # the child: the command, as `python -m igpt_jax.main ARGS` would run it
        code = 1
        try:
            os.environ.update(env)
            with open(out_path, "w") as out, open(err_path, "w") as err:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False)
            sys.argv = ["igpt_jax.main", *args]
            from igpt_jax import main  # noqa: PLC0415  (imported by the parent already)

            sys.modules["__main__"] = main  # absl's --help prints the __main__ module's docstring
            try:
                main.run()
                code = 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


def _run_children(commands: list[dict], parallel: bool) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        paths = [(os.path.join(tmp, f"out{i}"), os.path.join(tmp, f"err{i}")) for i in range(len(commands))]
        codes = []
        if parallel:
            pids = [_start_child(c["args"], c.get("env", {}), *p) for c, p in zip(commands, paths)]
            codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
        else:
            for c, p in zip(commands, paths):
                codes.append(os.waitstatus_to_exitcode(os.waitpid(_start_child(c["args"], c.get("env", {}), *p), 0)[1]))
        return [{"returncode": code, "stdout": Path(out).read_text(), "stderr": Path(err).read_text()}
                for code, (out, err) in zip(codes, paths)]


def main() -> None:
    request = json.loads(sys.stdin.read())
    import igpt_jax.main  # noqa: F401, PLC0415  (once, before forking: the children share the imported modules)

    sys.stdout.write(json.dumps(_run_children(request["commands"], request["parallel"])))


if __name__ == "__main__":
    main()

"""Runs the command line (``python -m igpt_jax.main``) for many argument lists from one started process.

The package is imported once; each command then runs in a forked child: a real process with its own exit status,
standard output and standard error, which is what the command-line tests check (one-line errors, exit 2, nothing
written). Forking saves each command the seconds of a fresh interpreter importing JAX and the data libraries. JAX's
backend is never started in this parent, so each child starts its own as a fresh process would.

    python tests/cli_runner.py < commands.json > results.json

The input is a JSON list of ``{"args": [...], "env": {...}}``; the output a JSON list of ``{"returncode", "stdout",
"stderr"}`` in the same order. Use `run_commands` from a test.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_commands(commands: list[dict], *, timeout: float = 600) -> list[dict]:
    """Runs each ``{"args": [...], "env": {...}}`` (env: variables set on top of this process's) through main."""
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve())], input=json.dumps(commands), text=True,
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


def _run_in_child(args: list[str], env: dict[str, str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out_path, err_path = os.path.join(tmp, "out"), os.path.join(tmp, "err")
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
        _, status = os.waitpid(pid, 0)
        return {"returncode": os.waitstatus_to_exitcode(status), "stdout": Path(out_path).read_text(),
                "stderr": Path(err_path).read_text()}


def main() -> None:
    commands = json.loads(sys.stdin.read())
    import igpt_jax.main  # noqa: F401, PLC0415  (once, before forking: the children share the imported modules)

    results = [_run_in_child(c["args"], c.get("env", {})) for c in commands]
    sys.stdout.write(json.dumps(results))


if __name__ == "__main__":
    main()

"""A Python evaluator for tool-using episodes: model-written code run in a separate, limited process.

Threat model: this guards against a *model's mistakes* (an endless loop, a huge allocation, a flood of output,
reaching for the file system or the network by habit), so that RL training survives them. It is NOT a security
boundary against an adversary: the child runs as the same user, with the same file system view, and the import
refusal is an import hook, which determined code can get around (import hooks alone are not a sandbox). Run
untrusted code in a container or VM, not here.

Layers, each cheap:
- a separate process (`python -I`: no site, no environment paths), started fresh for every call, in a scratch
  working directory that is deleted afterwards, with an empty environment;
- resource limits the child sets on itself before the code runs: CPU seconds (RLIMIT_CPU), address space
  (RLIMIT_AS), size of files written (RLIMIT_FSIZE); plus a wall-clock timeout in the parent;
- output capped at `output_bytes` (more is a violation, not a truncation: the model should not learn to flood);
- no network: when running as root, the child is started in a fresh network namespace (`unshare --net`: only
  a down loopback exists); otherwise in a user + network namespace (`unshare --user --net`) where the kernel
  allows unprivileged ones. Where neither works the call still runs, WITHOUT network isolation, and the result
  says so (`network_isolated=False`); the import refusal of socket is then the only guard;
- imports from the code itself are limited to a list of pure computation modules (math, fractions, itertools,
  ...); `import os`, `socket`, `subprocess` and the like are refused.

Violations (timeout, memory, output, refused import, killed by a signal) come back as `SandboxResult.violation`;
an ordinary Python error in the code comes back as `error`, text the model can read and act on.
"""

from __future__ import annotations

import functools
import json
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

# Pure computation: nothing here reaches the file system, processes or the network.
ALLOWED_IMPORTS = ("math", "cmath", "fractions", "decimal", "itertools", "functools", "operator", "collections",
                   "statistics", "re", "random", "string", "heapq", "bisect", "json", "datetime", "numbers",
                   "time")

# Exit codes the runner uses for each violation.
_VIOLATIONS = {3: "output", 4: "memory", 5: "import"}

_RUNNER = r'''
import ast, builtins, json, os, resource, sys, traceback
lim = json.loads(sys.argv[1])
resource.setrlimit(resource.RLIMIT_CPU, (lim["cpu_s"], lim["cpu_s"] + 1))
resource.setrlimit(resource.RLIMIT_AS, (lim["memory"], lim["memory"]))
resource.setrlimit(resource.RLIMIT_FSIZE, (lim["file_bytes"], lim["file_bytes"]))
code = sys.stdin.read()
allowed = set(lim["allowed"])

violations = []   # the first one decides the exit status, even if the code catches the exception

class Violation(BaseException):  # BaseException: the code's own `except Exception` cannot swallow it
    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        violations.append(self)

real_import = builtins.__import__
def guarded(name, globals=None, locals=None, fromlist=(), level=0):
    if globals is not None and globals.get("__name__") == "__sandbox__":
        if level or name.split(".")[0] not in allowed:
            raise Violation(5, f"import of {name} refused")
    return real_import(name, globals, locals, fromlist, level)
builtins.__import__ = guarded

class Bounded:
    def __init__(self, limit):
        self.limit, self.parts, self.size = limit, [], 0
    def write(self, s):
        self.size += len(s.encode("utf-8", "replace"))
        if self.size > self.limit:
            raise Violation(3, f"output over {self.limit} bytes")
        self.parts.append(s)
        return len(s)
    def flush(self):
        pass
out = Bounded(lim["output_bytes"])
real_stdout = sys.stdout
sys.stdout = out
status = 0
try:
    tree = ast.parse(code, "<tool>")
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    env = {"__name__": "__sandbox__", "__builtins__": builtins}
    exec(compile(tree, "<tool>", "exec"), env)
    if last is not None:   # like a REPL: the value of a final expression is the output
        value = eval(compile(ast.Expression(last.value), "<tool>", "eval"), env)
        if value is not None:
            print(repr(value))
except Violation:
    pass
except MemoryError:
    status = 4
    sys.stderr.write("memory limit")
except BaseException as e:
    status = 1
    sys.stderr.write("".join(traceback.format_exception_only(type(e), e)).strip()[-500:])
if violations:
    status = violations[0].code
    sys.stderr.write(str(violations[0]))
    out.parts = []
real_stdout.write("".join(out.parts))
real_stdout.flush()
sys.stderr.flush()
os._exit(status)
'''


@dataclass(frozen=True)
class SandboxLimits:
    cpu_s: int = 2                  # CPU seconds (RLIMIT_CPU)
    wall_s: float = 10.0            # wall clock, parent side (covers sleeping and blocked code)
    memory_mb: int = 512            # address space (RLIMIT_AS); the interpreter itself takes ~30 MB
    output_bytes: int = 4096        # stdout beyond this is a violation
    file_bytes: int = 1 << 20       # largest file the code may write in its scratch directory


@dataclass
class SandboxResult:
    output: str = ""
    error: str | None = None        # an ordinary exception in the code: shown to the model
    violation: str | None = None    # "timeout", "memory", "output", "import", "signal": ends the episode
    detail: str = ""
    network_isolated: bool = True

    def as_dict(self) -> dict:
        return asdict(self)


@functools.lru_cache(maxsize=1)
def _net_prefix() -> tuple[str, ...]:
    """The command prefix that gives the child no network, or () where the system allows none (probed once:
    a constant of the machine, not state)."""
    tool = shutil.which("unshare")
    if tool is None:
        return ()
    for prefix in ((tool, "--net", "--"), (tool, "--user", "--net", "--")):
        try:
            if subprocess.run([*prefix, "true"], check=False, capture_output=True, timeout=10).returncode == 0:
                return prefix
        except (OSError, subprocess.SubprocessError):
            continue
    return ()


def run_python(code: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `code` in a fresh limited process (module doc); stdout is the result."""
    limits = limits or SandboxLimits()
    lim = {"cpu_s": int(limits.cpu_s), "memory": int(limits.memory_mb) << 20, "file_bytes": int(limits.file_bytes),
           "output_bytes": int(limits.output_bytes), "allowed": list(ALLOWED_IMPORTS)}
    prefix = _net_prefix()
    cmd = [*prefix, sys.executable, "-I", "-c", _RUNNER, json.dumps(lim)]
    with tempfile.TemporaryDirectory(prefix="nanoseek-tool-") as scratch:
        try:
            proc = subprocess.run(cmd, check=False, input=code.encode("utf-8", "replace"), capture_output=True,
                                  cwd=scratch, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, timeout=limits.wall_s)
        except subprocess.TimeoutExpired:
            return SandboxResult(violation="timeout", detail=f"over {limits.wall_s:g} s wall clock",
                                 network_isolated=bool(prefix))
    out = proc.stdout[:limits.output_bytes].decode("utf-8", "replace")
    err = proc.stderr.decode("utf-8", "replace")[-500:]
    rc = proc.returncode
    if rc == 0:
        return SandboxResult(output=out, network_isolated=bool(prefix))
    if rc == 1:
        return SandboxResult(output=out, error=err or "error", network_isolated=bool(prefix))
    if rc in _VIOLATIONS:
        return SandboxResult(violation=_VIOLATIONS[rc], detail=err, network_isolated=bool(prefix))
    if rc in (-signal.SIGXCPU, -signal.SIGKILL):
        return SandboxResult(violation="timeout", detail=f"over {limits.cpu_s} CPU seconds",
                             network_isolated=bool(prefix))
    return SandboxResult(violation="signal", detail=f"exit status {rc}: {err}", network_isolated=bool(prefix))

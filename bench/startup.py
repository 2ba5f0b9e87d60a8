"""P6: daemon start-up, to the socket accepting and to SPAWN-ready (LiteLLM loaded and warm).

Floors: the interpreter's own start (``python -c pass``) for the first figure and
``python -c "import litellm"`` for the second, both measured in the same run, alternating
with the daemon starts. Each daemon start gets a fresh state directory.
"""

from __future__ import annotations

import subprocess
import time

from bench.core import VENV_PY, Row, Run, Stats, benchmark, fmt
from bench.procs import COLD, base_env, instant_fake, start_daemon


def _wall(code: str) -> float:
    # As the daemon imports it (claude_cli_provider): with the bundled cost map. Without
    # this, `import litellm` first tries to fetch the map over the network.
    env = {**base_env(), "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}
    t0 = time.perf_counter()
    subprocess.run(
        [str(VENV_PY), "-c", code],
        check=True,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - t0


@benchmark("P6", "start-up: to accepting, to SPAWN-ready", order=60)
def p6_startup(run: Run) -> list[Row]:
    reps = run.reps(5, 1)
    fake = instant_fake(run)
    _wall("import litellm")  # page cache
    accept: list[float] = []
    ready: list[float] = []
    imp: list[float] = []
    bare: list[float] = []
    for i in range(reps):
        if i % 2:
            imp.append(_wall("import litellm"))
            bare.append(_wall("pass"))
        d = start_daemon(run, claude_bin=fake, env=COLD, wait="none")
        accept.append(d.wait_accepting(interval=0.001) - d.started_at)
        ready.append(d.wait_ready(interval=0.01) - d.started_at)
        d.stop()
        if not i % 2:
            imp.append(_wall("import litellm"))
            bare.append(_wall("pass"))
    a, r = Stats.of(accept, "s"), Stats.of(ready, "s")
    im, b = Stats.of(imp, "s"), Stats.of(bare, "s")
    return [
        Row(
            "P6a",
            "start -> socket accepting (HEALTH_CHECK answers)",
            "s",
            a.median,
            b.median,
            compare="delta",
            goal="<= 0.3 s",
            met=a.median <= 0.3,
            series={"daemon to accepting": a, "python -c pass": b},
            notes=f"floor = bare interpreter start; {reps} start(s)",
        ),
        Row(
            "P6b",
            "start -> SPAWN-ready (litellm ready)",
            "s",
            r.median,
            im.median,
            compare="delta",
            goal="<= import litellm + 0.5 s",
            met=r.median <= im.median + 0.5,
            series={"daemon to ready": r, "python -c 'import litellm'": im},
            notes=f"ready polled every 10 ms; import floor p99 {fmt(im.p99)} s",
        ),
    ]

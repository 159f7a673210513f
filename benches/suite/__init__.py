"""The keyfailover benchmark suite, every comparison side by side in one run.

    python benches/run.py            # the full run (a few minutes): results/latest.md + PNGs
    python benches/run.py --smoke    # tiny counts, no external tools (CI): results/smoke.md

What runs, all on 127.0.0.1:

- a fast upstream (nginx serving static replies, or MockUpstream in its own
  process: both are measured and the faster one is used) and a slow one
  (MockUpstream, for streams held open);
- the setups, each a process of its own with the same routes: the upstream
  directly (the floor); nginx proxying to it (the floor for a proxy); the
  same proxies on keyfailover's native server (what `keyfailover serve`
  runs); `FailoverProxy` in FastAPI under uvicorn (one worker);
  the same under granian; the pure-Python equivalent (pure_python_proxy.py)
  in the same FastAPI app under uvicorn; LiteLLM's proxy when a safe version
  installs;
- the load: wrk (installed with apt-get when missing) or, failing that and
  always with --smoke, a multiprocess Python client; the same concurrency
  and duration for every setup;
- shared key state (`shared`): the FailoverProxy app with `state=None`,
  `"shm"` and Redis (a redis-server of the run's own), marks passed from one
  process to another, `keyfailover serve --workers 2` against 1, and the
  native server on both CPUs against one;
- the pool's strategies (`strategies`): four keys limited by MockUpstream,
  a load of 7/8 of their capacity, 429 round trips and capacity served.

The process under test is pinned to one CPU, the load generator and the
upstreams to another (taskset), so every proxy gets one core whatever its
threads. Figures are read as ratios between setups of the same run: absolute
times on a shared machine move from run to run.

The modules, one job each:

- `config`: paths, CPU placement, the fake keys, the plans (full and smoke);
- `wire`: the tiny HTTP/1.1 client and response parser on raw sockets;
- `procs`: starting, pinning and stopping processes; the upstreams (nginx,
  MockUpstream); the setups (direct, nginx proxying, the native server, the
  ASGI servers, LiteLLM);
- `app`: `asgi_app`, the factory the ASGI servers load (`suite.app:asgi_app`),
  and the native server's main (`python -m suite.app`);
- `load`: the load generator (wrk or the Python client) and the stream holder;
- `measure`: the measurements, each `(bench) -> dict`;
- `inprocess`: the measurements that run inside one child process;
- `shared`: shared key state (state backends, propagation, `serve --workers`,
  the native server on both CPUs against one);
- `strategies`: the pool's strategies against MockUpstream's rate limits;
- `report`: the goals, the markdown sections and the plots;
- `registry`: the list of measurements (with their sections) and the roles;
- `cli`: the run itself and `main`.

Internal roles (`python run.py _loadgen JSON` and the like) run in the child
processes the suite starts (see `registry.ROLES`).
"""

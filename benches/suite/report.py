"""The report: the goals, the markdown (a header, each measurement's section, the
notes) and the plots.

Each measurement's section is a function `(results) -> list[str]` named in
`registry.MEASUREMENTS`; it reads its own key of the results (and any other
it compares with) and returns its lines, starting with a blank one, or none
when there is nothing to show.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from typing import Any

from .config import PCTS, RESULTS, SLOW_DELAY, SSE_EVENTS
from .measure import STEADY_HEADROOM


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def mb(size: float) -> str:
    return f"{size / 2**20:.1f} MB"


def verdict(ok: bool | None) -> str:
    return {True: "**pass**", False: "**FAIL**", None: "n/a"}[ok]


def check_goals(r: dict[str, Any], smoke: bool) -> list[tuple[str, str, bool | None]]:
    """(goal, measured figure, pass/fail/n-a) for each goal of the brief."""
    goals: list[tuple[str, str, bool | None]] = []
    blocking, labels = r["blocking"], r["labels"]
    kf, py, direct = (
        blocking.get("kf-uvicorn", {}),
        blocking.get("py-uvicorn", {}),
        blocking["direct"],
    )
    if "16" in kf:
        added50 = kf["16"]["p"]["50"] - direct["16"]["p"]["50"]
        added99 = kf["16"]["p"]["99"] - direct["16"]["p"]["99"]
        goals.append(
            (
                "FailoverProxy + uvicorn adds <= 1 ms p50 and <= 3 ms p99 over direct, c=16 "
                "(closed loop, saturated)",
                f"+{added50:.2f} ms p50, +{added99:.2f} ms p99",
                added50 <= 1 and added99 <= 3,
            )
        )
    paced = r.get("paced") or {}
    if "kf-uvicorn" in paced and "direct" in paced:
        kf_p, base = paced["kf-uvicorn"]["p"], paced["direct"]["p"]
        added50, added99 = kf_p["50"] - base["50"], kf_p["99"] - base["99"]
        goals.append(
            (
                "the same, 16 connections at a fixed "
                f"{r['plan']['paced_rate']:,.0f} req/s (below saturation)",
                f"+{added50:.2f} ms p50, +{added99:.2f} ms p99",
                added50 <= 1 and added99 <= 3,
            )
        )
    for c in ("16", "64"):
        if c in kf and c in py:
            ratio = kf[c]["rps"] / py[c]["rps"]
            goals.append(
                (
                    f"FailoverProxy throughput >= 2x pure Python at c={c}",
                    f"{ratio:.2f}x ({kf[c]['rps']:.0f} vs {py[c]['rps']:.0f} req/s)",
                    ratio >= 2,
                )
            )
        else:
            goals.append((f"FailoverProxy throughput >= 2x pure Python at c={c}", "not run", None))
    errors = {c: v["errors"] for c, v in kf.items()}
    goals.append(
        (
            f"{labels.get('kf-uvicorn', 'FailoverProxy')}: no errors at any concurrency",
            ", ".join(f"c={c}: {n}" for c, n in errors.items()),
            all(n == 0 for n in errors.values()),
        )
    )
    sdk = r.get("sdk") or {}
    for kind in ("blocking", "stream"):
        if f"default/{kind}" in sdk:
            ratio = sdk[f"keyfailover/{kind}"] / sdk[f"default/{kind}"]
            goals.append(
                (
                    "In-process AsyncFailoverTransport >= httpx2 default "
                    f"({kind}, c={r['plan']['sdk_concurrency']})",
                    f"{ratio:.2f}x",
                    ratio >= 1,
                )
            )
    memory = (r.get("memory") or {}).get("kf-uvicorn")
    if memory:
        goals.append(
            (
                f"{memory['n']} concurrent streams: proxy RSS < 100 MB",
                mb(memory["streams"]),
                memory["streams"] < 100 * 2**20,
            )
        )
    drift = r.get("drift")
    if drift:
        goals.append(
            (
                f"RSS drift over {drift['requests']:,} requests < 5%",
                f"{drift['drift']:+.2%} ({mb(drift['first'])} -> {mb(drift['last'])})",
                abs(drift["drift"]) < 0.05,
            )
        )
    goals += shared_goals(r)
    goals += strategy_goals(r)
    goals += native_goals(r)
    if smoke:  # tiny counts: the figures show the suite works, not how fast anything is
        return [(goal, figure, None) for goal, figure, _ in goals]
    return goals


def shared_goals(r: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """The goals of issue 10: shared state costs (almost) nothing, marks travel fast, and
    `serve --workers 2` serves more than one worker."""
    from .shared import REDIS_P99_GOAL_US, SHM_P50_GOAL_US, STATE_TOLERANCE, WORKERS_GOAL

    goals: list[tuple[str, str, bool | None]] = []
    state = r.get("state") or {}
    for route, rows in (state.get("routes") or {}).items():
        base = rows.get("kf-state-none")
        for key, name in (("kf-state-shm", "shm"), ("kf-state-redis", "Redis")):
            what = {"json": "small blocking", "failover": "failover route"}[route]
            goal = (
                f"FailoverProxy with {name} state within {STATE_TOLERANCE:.0%} of state=None "
                f"({what}, c={state['concurrency']})"
            )
            if base is None or key not in rows:
                goals.append((goal, "not run", None))
                continue
            row = rows[key]
            ok, how = decide(row["ratios"], 1 - STATE_TOLERANCE)
            goals.append(
                (
                    goal,
                    f"{row['ratio']:.3f}x (rounds {spread(row['ratios'])}{how}; CPU per request "
                    f"{row.get('cpu_ratio', 0):.3f}x)",
                    ok,
                )
            )
    # Issue 11: counting for the metrics costs (almost) nothing: with it on (state=None)
    # against off, per round.
    for route, rows in (state.get("routes") or {}).items():
        if route != "json":
            continue
        goal = (
            f"FailoverProxy with metrics on within {STATE_TOLERANCE:.0%} of metrics off "
            f"(small blocking, c={state['concurrency']})"
        )
        off = rows.get("kf-metrics-off")
        if off is None or "ratios" not in off:
            goals.append((goal, "not run", None))
            continue
        on_over_off = [1 / ratio for ratio in off["ratios"]]
        ok, how = decide(on_over_off, 1 - STATE_TOLERANCE)
        cpu = 1 / off["cpu_ratio"] if off.get("cpu_ratio") else 0
        goals.append(
            (
                goal,
                f"{statistics.median(on_over_off):.3f}x (rounds {spread(on_over_off)}{how}; "
                f"CPU per request {cpu:.3f}x)",
                ok,
            )
        )
    propagation = r.get("propagation")
    if propagation is not None:
        for name, pct, limit in (
            ("shm", "p50", SHM_P50_GOAL_US),
            ("redis", "p99", REDIS_P99_GOAL_US),
        ):
            goal = f"a mark seen by another process through {name}: {pct} < {us(limit)}"
            row = propagation.get(name)
            if row is None:
                goals.append((goal, "not run", None))
                continue
            goals.append(
                (
                    goal,
                    f"p50 {us(row['all']['p50'])}, p99 {us(row['all']['p99'])} "
                    f"({row['all']['n']} transitions)",
                    row["all"][pct] < limit,
                )
            )
    workers = r.get("workers") or {}
    for c, rows in (workers.get("concurrencies") or {}).items():
        goal = f"`serve --workers 2` >= {WORKERS_GOAL:g}x `--workers 1` (both on both CPUs), c={c}"
        if "kf-serve-1" not in rows or "kf-serve-2" not in rows:
            goals.append((goal, "not run", None))
            continue
        two = rows["kf-serve-2"]
        ok, how = decide(two["ratios"], WORKERS_GOAL)
        goals.append(
            (
                goal,
                f"{two['ratio']:.2f}x (rounds {spread(two['ratios'])}{how}; {two['rps']:,.0f} vs "
                f"{rows['kf-serve-1']['rps']:,.0f} req/s)",
                ok,
            )
        )
    return goals


def strategy_goals(r: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """The goals of issue 12, at each upstream latency: `headroom` cuts `ordered`'s 429
    round trips by 90% and serves 95% of what the capacity allowed."""
    from .strategies import CUT_GOAL, SERVED_GOAL

    goals: list[tuple[str, str, bool | None]] = []
    for latency, rows in ((r.get("strategies") or {}).get("latencies") or {}).items():
        where = f"upstream latency {float(latency) * 1e3:.0f} ms"
        if "headroom" not in rows or "ordered" not in rows:
            continue
        head, ordered = per_thousand(rows["headroom"]), per_thousand(rows["ordered"])
        goal = f"`headroom` cuts 429 round trips by >= {CUT_GOAL:.0%} against `ordered` ({where})"
        figure = f"{head:.1f} vs {ordered:.1f} per 1,000 requests"
        if ordered == 0:
            goals.append((goal, figure + " (ordered saw none: nothing to cut)", None))
        else:
            cut = 1 - head / ordered
            goals.append((goal, f"{figure}: {cut:.0%} fewer", cut >= CUT_GOAL))
        served = rows["headroom"]["served"]
        goals.append(
            (
                f"`headroom` serves >= {SERVED_GOAL:.0%} of the capacity ({where})",
                f"{served:.1%}",
                served >= SERVED_GOAL,
            )
        )
    return goals


# The native server's plain build, run beside the profile-guided one (`make bench`).
PLAIN = "kf-native-plain"
# The goals of issue 14, for the native server (`keyfailover serve`, setup "kf-native").
NATIVE_VS_FLOOR = 0.5  # req/s on one core, over nginx proxy_pass's
NATIVE_VS_UVICORN = 8.0  # over FailoverProxy + uvicorn's
C1_ADDED_MS = (0.1, 0.3)  # added p50, p99 over direct at c=1
STEADY_ADDED_MS = (0.2, 1.0)  # the same at plan.steady_rate over 16 connections
BOTH_CORES = 1.7  # both CPUs (default threads) over one (--threads 1)
STREAMS_ADDED_MB = 40  # RSS above idle with plan.streams streams open
# "A failover adds one upstream round trip and nothing measurable besides": the added
# time may exceed a round trip sent directly by this much (the medians of one failover
# move by about this much from run to run: granian's came out at -0.09 ms once).
FAILOVER_EXTRA_MS = 0.1


def native_goals(r: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """The goals of issue 14: the native server against nginx proxying and uvicorn on one
    core, its added latency, both CPUs against one, memory per stream, one failover."""
    from .shared import NATIVE_BASE, NATIVE_BOTH, ONE_CPU

    goals: list[tuple[str, str, bool | None]] = []
    if "kf-native" not in r["blocking"]:
        return [("the native server's goals", "not run (it did not start)", None)]
    rounds = r.get("native_rounds") or {}
    for c in ("16", "64"):
        for key, factor, what in (
            ("nginx-proxy", NATIVE_VS_FLOOR, f">= {NATIVE_VS_FLOOR:.0%} of nginx proxy_pass"),
            ("kf-uvicorn", NATIVE_VS_UVICORN, f">= {NATIVE_VS_UVICORN:g}x FailoverProxy + uvicorn"),
        ):
            goal = f"native server throughput {what}, c={c}, one core each"
            ratios = round_ratios(rounds.get(c, {}), "kf-native", key)
            if not ratios:
                goals.append((goal, "not run", None))
                continue
            ok, how = decide(ratios, factor)
            plain = round_ratios(rounds.get(c, {}), PLAIN, key)
            also = (
                f"; the plain build (`pip install .`) {statistics.median(plain):.2f}x"
                if plain
                else ""
            )
            goals.append(
                (
                    goal,
                    f"{statistics.median(ratios):.2f}x (rounds {spread(ratios)}{how}; "
                    f"{median_rps(rounds[c], 'kf-native'):,.0f} vs "
                    f"{median_rps(rounds[c], key):,.0f} req/s{also})",
                    ok,
                )
            )
    limit50, limit99 = C1_ADDED_MS
    for key, where in (
        (ONE_CPU, "the proxy on direct's CPU (like for like"),
        ("1", "the proxy on a CPU of its own (each request wakes the other CPU four times"),
    ):
        runs = rounds.get(key, {})
        added50 = round_added(runs, "kf-native", "50")
        added99 = round_added(runs, "kf-native", "99")
        if not added50:
            continue
        floor50, floor99 = (round_added(runs, "nginx-proxy", p) for p in ("50", "99"))
        also = (
            f"; nginx proxy_pass +{statistics.median(floor50):.2f} / "
            f"+{statistics.median(floor99):.2f} ms"
            if floor50
            else ""
        )
        ok50, how50 = decide_at_most(added50, limit50)
        ok99, how99 = decide_at_most(added99, limit99)
        ok = False if False in (ok50, ok99) else None if None in (ok50, ok99) else True
        goals.append(
            (
                f"native server adds <= {limit50} ms p50 and <= {limit99} ms p99 over direct, c=1, "
                f"{where}; medians of rounds)",
                f"+{statistics.median(added50):.2f} ms p50{how50}, "
                f"+{statistics.median(added99):.2f} ms p99{how99}{also}",
                ok,
            )
        )
    steady = (r.get("steady") or {}).get("setups") or {}
    limit50, limit99 = STEADY_ADDED_MS
    goal = (
        f"native server adds <= {limit50} ms p50 and <= {limit99} ms p99 over direct, "
        f"16 connections at a steady {r['plan']['steady_rate']:,.0f} req/s"
    )
    if "kf-native" in steady and "direct" in steady:
        base, row = steady["direct"]["p"], steady["kf-native"]["p"]
        added50, added99 = row["50"] - base["50"], row["99"] - base["99"]
        goals.append(
            (
                goal,
                f"+{added50:.2f} ms p50, +{added99:.2f} ms p99",
                added50 <= limit50 and added99 <= limit99,
            )
        )
    else:
        goals.append((goal, "not run", None))
    for c, rows in ((r.get("workers") or {}).get("native") or {}).items():
        goal = (
            f"native server on both CPUs >= {BOTH_CORES:g}x on one (`--threads 1`), c={c}, "
            "load generator and upstream on one of the two"
        )
        if NATIVE_BASE not in rows or NATIVE_BOTH not in rows:
            goals.append((goal, "not run", None))
            continue
        both, one = rows[NATIVE_BOTH], rows[NATIVE_BASE]
        ok, how = decide(both["ratios"], BOTH_CORES)
        goals.append(
            (
                goal,
                f"{both['ratio']:.2f}x (rounds {spread(both['ratios'])}{how}; "
                f"{both['rps']:,.0f} vs {one['rps']:,.0f} req/s)",
                ok,
            )
        )
    memory = (r.get("memory") or {}).get("kf-native")
    if memory:
        added = memory["streams"] - memory["idle"]
        goals.append(
            (
                f"native server: {memory['n']:,} open SSE streams add <= {STREAMS_ADDED_MB} MB "
                "of RSS over idle",
                f"+{mb(added)} ({mb(memory['idle'])} idle, {mb(memory['streams'])} with them)",
                added <= STREAMS_ADDED_MB * 2**20,
            )
        )
    failover = r.get("failover") or {}
    if "kf-native" in failover:
        row = failover["kf-native"]
        added, rtt = row["failover"] - row["plain"], row["rtt"]
        goals.append(
            (
                f"native server: a failover adds one upstream round trip (a request sent "
                f"directly from the proxy's CPU) and at most {FAILOVER_EXTRA_MS} ms more",
                f"+{added * 1e3:.3f} ms, round trip {rtt * 1e3:.3f} ms "
                f"({row['upstream_calls']:.2f} upstream calls per request)",
                added - rtt <= FAILOVER_EXTRA_MS / 1e3,
            )
        )
    return goals


def per_thousand(row: dict[str, Any]) -> float:
    """Upstream 429 round trips per 1,000 requests."""
    return float(row["upstream_429"] / row["requests"] * 1e3)


def decide(ratios: list[float], threshold: float) -> tuple[bool | None, str]:
    """Whether per-round ratios are at or above `threshold`, robustly: pass when the lower
    quartile is (with 5 rounds: all but the lowest), fail when the upper quartile is not,
    and neither when the rounds straddle it (the machine's noise is larger than the margin
    the goal asks about); with the reason to show."""
    if len(ratios) < 2:
        return ratios[0] >= threshold, ""
    low, _, high = statistics.quantiles(ratios, n=4, method="inclusive")
    if low >= threshold:
        return True, ""
    if high < threshold:
        return False, ""
    return None, f"; inconclusive: quartiles {low:.2f}-{high:.2f} straddle {threshold:.2f}"


def decide_at_most(values: list[float], limit: float) -> tuple[bool | None, str]:
    """Whether per-round values are at most `limit`, as `decide` judges ratios: pass when
    the upper quartile is, fail when the lower quartile is not, and neither in between."""
    if len(values) < 2:
        return values[0] <= limit, ""
    low, _, high = statistics.quantiles(values, n=4, method="inclusive")
    if high <= limit:
        return True, ""
    if low > limit:
        return False, ""
    return None, f" (inconclusive: quartiles {low:+.2f} to {high:+.2f} straddle {limit:g})"


def round_ratios(runs: dict[str, list[dict[str, Any]]], key: str, base: str) -> list[float]:
    """`key`'s req/s over `base`'s, for each round both ran in."""
    by_round = {row["round"]: row["rps"] for row in runs.get(base, [])}
    return [
        row["rps"] / by_round[row["round"]] for row in runs.get(key, []) if row["round"] in by_round
    ]


def round_added(runs: dict[str, list[dict[str, Any]]], key: str, p: str) -> list[float]:
    """`key`'s percentile `p` (ms) minus direct's, for each round both ran in."""
    by_round = {row["round"]: row["p"][p] for row in runs.get("direct", [])}
    return [
        row["p"][p] - by_round[row["round"]]
        for row in runs.get(key, [])
        if row["round"] in by_round
    ]


def cpu_per_request(runs: dict[str, list[dict[str, Any]]], key: str) -> float | None:
    """The median over `key`'s runs of its CPU time per request, in µs (None: not counted)."""
    rows = [row for row in runs.get(key, []) if "cpu" in row and row["requests"]]
    if not rows:
        return None
    return statistics.median(row["cpu"] / row["requests"] * 1e6 for row in rows)


def median_rps(runs: dict[str, list[dict[str, Any]]], key: str) -> float:
    return statistics.median(row["rps"] for row in runs[key])


def spread(ratios: list[float]) -> str:
    """The lowest and highest of per-round ratios."""
    return f"{min(ratios):.2f}-{max(ratios):.2f}"


def us(micros: float) -> str:
    """Microseconds, or milliseconds from 1 ms on."""
    return f"{micros:,.1f} µs" if micros < 1000 else f"{micros / 1e3:.2f} ms"


# --------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------


def instructions_section(r: dict[str, Any]) -> list[str]:
    """Instructions per request under callgrind: the native server and the bare hyper proxy."""
    counted = r.get("instructions") or {}
    native, floor = counted.get("kf-native"), counted.get("hyper-floor")
    if native is None:
        return []
    plain = counted.get(PLAIN)
    from .instructions import CONNECTIONS, COUNTED

    out = [
        "",
        "## Instructions per request",
        "",
        "The native server and the bare hyper proxy each run under valgrind's callgrind, "
        f"loaded with the same small blocking requests over {CONNECTIONS} connections; the "
        f"instructions of {COUNTED:g} s of requests after a warm-up, divided by the requests "
        "answered. A count, not a time: the same from run to run whatever else this shared "
        "machine does, so it shows a change to the request path that req/s, moving by 5-10% "
        "between runs here, cannot. User space only (the kernel's share of a request, about "
        "half of its CPU time here, is not counted), and every instruction counts one.",
        "",
        "| setup | requests counted | instructions per request | x bare hyper |",
        "| --- | ---: | ---: | ---: |",
    ]
    labels = {**r["labels"], PLAIN: "FailoverProxy, native server, plain build"}
    for key, row in (("kf-native", native), (PLAIN, plain), ("hyper-floor", floor)):
        if row is None:
            continue
        ratio = f"{row['per_request'] / floor['per_request']:.2f}" if floor else "-"
        out.append(
            f"| {labels.get(key, key)} | {row['requests']:,} | "
            f"{row['per_request']:,.0f} | {ratio} |"
        )
    if floor:
        # Like for like: the bare proxy is built without a profile, as the plain build is.
        mine, what = (plain, "the plain build") if plain else (native, "native")
        out += [
            "",
            f"keyfailover's own work ({what} - bare hyper): "
            f"{mine['per_request'] - floor['per_request']:,.0f} instructions per request.",
        ]
    return out


def render(
    r: dict[str, Any], smoke: bool, sections: Iterable[Callable[[dict[str, Any]], list[str]]]
) -> str:
    """results/latest.md (or smoke.md): the header and goals, `sections` in order, the tail."""
    out = header(r, smoke)
    for section in sections:
        out += section(r)
    return "\n".join(out + tail(r)) + "\n"


def header(r: dict[str, Any], smoke: bool) -> list[str]:
    """The title, the setups, the load and upstream, the goals."""
    labels: dict[str, str] = r["labels"]
    out = [
        "# keyfailover benchmarks"
        + (" (smoke run: tiny counts, figures not meaningful)" if smoke else ""),
        "",
        f"Generated by `python benches/run.py{' --smoke' if smoke else ''}` on {r['env']['date']} "
        f"in {r['env']['wall']:.0f} s. {r['env']['machine']}",
        "",
        "Read the ratios: every setup ran in the same run against the same upstream, with the "
        "same load, but absolute times on a shared machine move from run to run.",
        "",
        "## Setups",
        "",
        "| setup | how |",
        "| --- | --- |",
    ]
    out += [f"| {labels[key]} | {note} |" for key, note in r["setup_notes"].items()]
    out += ["", f"Load: {r['env']['load']}. Upstream: {r['env']['upstream']}."]
    if "build" in r["env"]:
        out += ["", f"keyfailover: {r['env']['build']}."]
    out += [""]

    out += ["## Goals", "", "| goal | measured | result |", "| --- | --- | --- |"]
    out += [f"| {goal} | {figure} | {verdict(ok)} |" for goal, figure, ok in check_goals(r, smoke)]
    return out


def blocking_section(r: dict[str, Any]) -> list[str]:
    """Small blocking requests: one row per setup and concurrency."""
    labels: dict[str, str] = r["labels"]
    out: list[str] = []
    blocking = r["blocking"]
    direct = blocking["direct"]
    out += [
        "",
        "## Small blocking requests",
        "",
        "POST /v1/messages (small JSON reply), closed loop: each connection sends its next "
        "request when the last reply is complete. Latency under this load includes queueing "
        "(p50 is about concurrency / throughput); the c=1 rows are the unloaded per-request cost.",
        "",
        "| setup | conc. | req/s | x direct | x pure Python | p50 ms | p99 ms "
        "| added p50 | added p99 | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in r["plan"]["concurrencies"]:
        for key, rows in blocking.items():
            row = rows.get(str(c))
            if row is None:
                continue
            py = blocking.get("py-uvicorn", {}).get(str(c))
            base = direct[str(c)]
            p50, p99 = row["p"]["50"], row["p"]["99"]
            cells = [
                labels[key],
                str(c),
                f"{row['rps']:,.0f}",
                f"{row['rps'] / base['rps']:.2f}",
                f"{row['rps'] / py['rps']:.2f}" if py else "-",
                f"{p50:.2f}",
                f"{p99:.2f}",
                f"{p50 - base['p']['50']:+.2f}",
                f"{p99 - base['p']['99']:+.2f}",
                str(row["errors"]),
            ]
            out.append("| " + " | ".join(cells) + " |")
    return out


def native_rounds_section(r: dict[str, Any]) -> list[str]:
    """The native server on one core against FailoverProxy + uvicorn, nginx proxy_pass and
    the bare hyper proxy, in alternating rounds: the numbers issue 14's goals are judged on."""
    rounds = r.get("native_rounds") or {}
    if not rounds:
        return []
    labels: dict[str, str] = r["labels"]
    n = r["plan"]["shared_rounds"]
    out = [
        "",
        "## The native server against the floors, in rounds",
        "",
        "The native server (`keyfailover serve`'s, one runtime thread) against the same proxy "
        "under uvicorn, nginx proxying, and a bare proxy on hyper (hyper-util's server, as the "
        "native server's, and pooled client, which keyfailover's own pool replaced; none of "
        "keyfailover's policy: `benches/hyper-floor`), each pinned to "
        "one CPU, the same load generator on the other. The blocking table above runs each "
        f"setup once; here they alternate in {n} round{'s' if n != 1 else ''} of "
        f"{r['plan']['shared_duration']:g} s each (the order rotating), and a ratio is the "
        "median of the ratios within a round, so a burst from a neighbour on this shared "
        "machine moves one round, not the result. "
        "The bare proxy's own ratios bound what any proxy on this stack can reach here.",
        "",
        "| conc. | native req/s | FailoverProxy + uvicorn req/s | nginx proxy_pass req/s "
        "| bare hyper req/s | native / nginx proxy_pass | native / uvicorn | native / bare hyper "
        "| bare hyper / nginx proxy_pass | bare hyper / uvicorn |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    plain = any((rounds.get(str(c)) or {}).get(PLAIN) for c in r["plan"]["concurrencies"] if c > 1)

    def rps(runs: dict[str, Any], key: str) -> str:
        return f"{median_rps(runs, key):,.0f}" if runs.get(key) else "-"

    def ratio(runs: dict[str, Any], key: str, base: str) -> str:
        ratios = round_ratios(runs, key, base)
        if not ratios:
            return "-"
        if len(ratios) == 1:
            return f"{ratios[0]:.2f}"
        return f"{statistics.median(ratios):.2f} ({spread(ratios)})"

    for c in r["plan"]["concurrencies"]:
        runs = rounds.get(str(c)) or {}
        if not runs.get("kf-native"):
            continue
        cells = [
            str(c),
            *(rps(runs, key) for key in ("kf-native", "kf-uvicorn", "nginx-proxy", "hyper-floor")),
            ratio(runs, "kf-native", "nginx-proxy"),
            ratio(runs, "kf-native", "kf-uvicorn"),
            ratio(runs, "kf-native", "hyper-floor"),
            ratio(runs, "hyper-floor", "nginx-proxy"),
            ratio(runs, "hyper-floor", "kf-uvicorn"),
        ]
        out.append("| " + " | ".join(cells) + " |")
    if plain:
        out += [
            "",
            "The native server above is the profile-guided build (`make wheel`'s); the same "
            "commit's plain build (`pip install .`'s) ran in the same rounds:",
            "",
            "| conc. | plain build req/s | profile-guided / plain | plain / nginx proxy_pass "
            "| plain / uvicorn | plain / bare hyper |",
            "| ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for c in r["plan"]["concurrencies"]:
            runs = rounds.get(str(c)) or {}
            if not runs.get(PLAIN):
                continue
            cells = [str(c), rps(runs, PLAIN), ratio(runs, "kf-native", PLAIN)]
            cells += [
                ratio(runs, PLAIN, key) for key in ("nginx-proxy", "kf-uvicorn", "hyper-floor")
            ]
            out.append("| " + " | ".join(cells) + " |")
    # keyfailover's own work: the plain build against the bare proxy (built plain too).
    own = PLAIN if plain else "kf-native"
    out += [
        "",
        "CPU time of each server (all its threads and processes) per request answered, the "
        "median over the rounds: steadier than req/s on a shared machine, and what each "
        "costs per request whoever else runs. "
        + (
            "Plain - bare hyper (both built without a profile) is keyfailover's own work per "
            "request."
            if plain
            else "Native - bare hyper is keyfailover's own work per request."
        ),
        "",
        "| conc. | native µs | "
        + ("plain build µs | " if plain else "")
        + "bare hyper µs | nginx proxy_pass µs | FailoverProxy + uvicorn µs "
        + ("| plain - bare hyper |" if plain else "| native - bare hyper |"),
        "| ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if plain else ""),
    ]
    for c in r["plan"]["concurrencies"]:
        runs = rounds.get(str(c)) or {}
        cpu = {key: cpu_per_request(runs, key) for key in runs}
        if cpu.get("kf-native") is None:
            continue
        cells = [str(c)]
        keys = ("kf-native", *((PLAIN,) if plain else ()), "hyper-floor", "nginx-proxy")
        for key in (*keys, "kf-uvicorn"):
            cells.append(f"{cpu[key]:.1f}" if cpu.get(key) is not None else "-")
        floor, mine = cpu.get("hyper-floor"), cpu.get(own)
        cells.append(f"{mine - floor:+.1f}" if floor is not None and mine is not None else "-")
        out.append("| " + " | ".join(cells) + " |")
    from .shared import ONE_CPU

    for key, intro in (
        (
            ONE_CPU,
            "Added latency over direct at c=1, one request at a time, like for like: each proxy "
            "moved for its runs onto the CPU where direct's requests stay (the load generator "
            "and the upstream share it), so a request through it takes one more hop of "
            "software on the same CPU and nothing else. Each round's percentile minus "
            "direct's in the same round, the median (and range) over the rounds.",
        ),
        (
            "1",
            "The same, each proxy on its own CPU as in the throughput rounds: every request "
            "crosses between the two CPUs four times, each crossing waking a CPU that had gone "
            "idle. What a wake-up costs is the machine's (on this VM tens of µs, more when the "
            "CPU has been idle long): the bare hyper proxy and nginx pay it too.",
        ),
    ):
        runs = rounds.get(key) or {}
        if not runs.get("direct"):
            continue
        out += [
            "",
            intro,
            "",
            "| setup | added p50 ms | added p99 ms | req/s |",
            "| --- | ---: | ---: | ---: |",
        ]
        for setup in runs:
            if setup == "direct":
                continue
            cells = [labels[setup]]
            for p in ("50", "99"):
                added = round_added(runs, setup, p)
                cells.append(
                    f"{statistics.median(added):+.2f} ({min(added):+.2f} to {max(added):+.2f})"
                    if len(added) > 1
                    else f"{added[0]:+.2f}"
                )
            cells.append(rps(runs, setup))
            out.append("| " + " | ".join(cells) + " |")
    return out


def paced_section(r: dict[str, Any]) -> list[str]:
    """Latency below saturation."""
    labels: dict[str, str] = r["labels"]
    out: list[str] = []
    paced = r.get("paced") or {}
    if "direct" in paced:
        base = paced["direct"]
        out += [
            "",
            f"## Latency below saturation: {r['plan']['paced_rate']:,.0f} requests/s",
            "",
            "The same requests at a fixed pace (open loop) over 16 connections, latency counted "
            "from each request's scheduled time: the cost of one request through a proxy that is "
            "busy but not saturated. Python client (wrk cannot pace).",
            "",
            "| setup | req/s | p50 ms | p90 ms | p99 ms | added p50 | added p99 | errors |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for key, row in paced.items():
            p50, p99 = row["p"]["50"], row["p"]["99"]
            out.append(
                f"| {labels[key]} | {row['rps']:,.0f} | {p50:.2f} | {row['p']['90']:.2f} "
                f"| {p99:.2f} | {p50 - base['p']['50']:+.2f} | {p99 - base['p']['99']:+.2f} "
                f"| {row['errors']} |"
            )
    return out


def steady_section(r: dict[str, Any]) -> list[str]:
    """Latency at a steady pace only the fastest setups can take."""
    labels: dict[str, str] = r["labels"]
    steady = r.get("steady") or {}
    rows = steady.get("setups") or {}
    if "direct" not in rows:
        return []
    base = rows["direct"]["p"]
    out = [
        "",
        f"## Latency at a steady {steady['rate']:,.0f} requests/s",
        "",
        "As above (16 connections, open loop, the Python client, latency from each request's "
        "scheduled time), at a pace for the setups that did at least "
        f"{STEADY_HEADROOM:g}x it at c=16 in the closed loop: above its capacity a pace "
        "measures the queue, not the cost of a request."
        + (f" Not run: {', '.join(steady['skipped'])}." if steady.get("skipped") else ""),
        "",
        "| setup | req/s | p50 ms | p90 ms | p99 ms | added p50 | added p99 | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, row in rows.items():
        p = row["p"]
        out.append(
            f"| {labels[key]} | {row['rps']:,.0f} | {p['50']:.2f} | {p['90']:.2f} "
            f"| {p['99']:.2f} | {p['50'] - base['50']:+.2f} | {p['99'] - base['99']:+.2f} "
            f"| {row['errors']} |"
        )
    return out


def sse_section(r: dict[str, Any]) -> list[str]:
    """The 1,000-event SSE stream."""
    labels: dict[str, str] = r["labels"]
    out: list[str] = []
    sse = r.get("sse") or {}
    if "direct" in sse:
        base = sse["direct"]
        out += [
            "",
            f"## {SSE_EVENTS:,}-event SSE stream",
            "",
            "One stream at a time over a keep-alive connection; medians of "
            f"{r['plan']['sse_rounds']} streams. First byte: the first response byte.",
            "",
            "| setup | first byte ms | total ms | added first byte | added total |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for key, row in sse.items():
            out.append(
                f"| {labels[key]} | {ms(row['ttfb'])} | {ms(row['total'])} "
                f"| {(row['ttfb'] - base['ttfb']) * 1e3:+.2f} "
                f"| {(row['total'] - base['total']) * 1e3:+.2f} |"
            )
    return out


def failover_section(r: dict[str, Any]) -> list[str]:
    """One failover."""
    labels: dict[str, str] = r["labels"]
    out: list[str] = []
    failover = r.get("failover") or {}
    if "direct" in failover:
        rtt = failover["direct"]["plain"]
        out += [
            "",
            "## One failover",
            "",
            "Sequential requests with a 3 ms pause before each (medians): one whose only key "
            "answers at once, and one whose first key answers 429 (`retry-after-ms: 1`) "
            "before the second answers 200. What the failover should add is one upstream "
            "round trip as the proxy makes it: a request sent directly from the proxies' CPU "
            "to the upstream on the other, measured in rounds alternating with each proxy's "
            f"requests. Sent from the upstream's own CPU, a round trip takes {ms(rtt)} ms: "
            "it skips waking the other CPU.",
            "",
            "| setup | first key OK ms | first key 429 ms | added by failover "
            "| round trip from the proxy's CPU | added - round trip "
            "| upstream calls per request | not 200 |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for key, row in failover.items():
            if key == "direct":
                continue
            added = row["failover"] - row["plain"]
            out.append(
                f"| {labels[key]} | {ms(row['plain'])} | {ms(row['failover'])} "
                f"| {added * 1e3:+.3f} ms | {row['rtt'] * 1e3:.3f} ms "
                f"| {(added - row['rtt']) * 1e3:+.3f} ms | {row['upstream_calls']:.2f} "
                f"| {row['errors']} |"
            )
    return out


def memory_section(r: dict[str, Any]) -> list[str]:
    """Memory: the streams held open, then the RSS drift (measured first)."""
    labels: dict[str, str] = r["labels"]
    out: list[str] = []
    memory = r.get("memory") or {}
    if memory:
        n = next(iter(memory.values()))["n"]
        out += [
            "",
            "## Memory",
            "",
            f"RSS of the proxy's process tree while {n:,} streams are held open (the upstream "
            f"sends one event every {SLOW_DELAY} s), and after they are closed.",
            "",
            f"| setup | idle | with {n:,} streams | per stream | after closing |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for key, row in memory.items():
            per = (row["streams"] - row["idle"]) / row["n"] / 1024
            out.append(
                f"| {labels[key]} | {mb(row['idle'])} | {mb(row['streams'])} | {per:.1f} KB "
                f"| {mb(row['after'])} |"
            )
    drift = r.get("drift")
    if drift:
        out += [
            "",
            f"RSS drift of {labels[drift['setup']]}: {drift['requests']:,} requests at c=16 after "
            f"a warm-up of {r['plan']['drift_warmup']:,}: {mb(drift['first'])} -> "
            f"{mb(drift['last'])} ({drift['drift']:+.2%}), peak {mb(drift['max'])}, "
            f"errors {drift['errors']}.",
        ]
    return out


def sdk_section(r: dict[str, Any]) -> list[str]:
    """In-process: the anthropic SDK."""
    out: list[str] = []
    sdk = r.get("sdk") or {}
    if sdk:
        out += [
            "",
            "## In-process: the anthropic SDK",
            "",
            f"`AsyncAnthropic` with its default httpx2 transport vs with `AsyncFailoverTransport`, "
            f"{r['plan']['sdk_concurrency']} concurrent calls, in one process on one core "
            "(best of two alternating runs).",
            "",
            "| call | default httpx2 calls/s | AsyncFailoverTransport calls/s | ratio |",
            "| --- | ---: | ---: | ---: |",
        ]
        for kind in ("blocking", "stream"):
            default, kf = sdk[f"default/{kind}"], sdk[f"keyfailover/{kind}"]
            out.append(
                f"| messages.create ({kind}) | {default:,.0f} | {kf:,.0f} | {kf / default:.2f} |"
            )
    return out


def client_section(r: dict[str, Any]) -> list[str]:
    """In-process: the bare FailoverClient against httpx2.AsyncClient."""
    client = r.get("client")
    if not client:
        return []
    plan = r["plan"]
    rps, sse, one = client["blocking"], client["sse"], client["sequential"]
    rows = [
        (f"small blocking requests, c={client['concurrency']}: req/s", rps, "{:,.0f}", 1),
        (f"{SSE_EVENTS:,}-event SSE stream: first byte ms", _pick(sse, "ttfb"), "{:.2f}", 1e3),
        (f"{SSE_EVENTS:,}-event SSE stream: total ms", _pick(sse, "total"), "{:.2f}", 1e3),
        ("one request at a time: ms", one, "{:.3f}", 1e3),
    ]
    out = [
        "",
        "## In-process: the bare FailoverClient",
        "",
        "`FailoverClient` vs `httpx2.AsyncClient` (pooled connections), both sending straight "
        "to the upstream, in one process on one core: small blocking requests "
        f"{client['concurrency']} at a time (best of three alternating runs of "
        f"{client['requests']:,}); the {SSE_EVENTS:,}-event SSE stream one at a time, "
        f"alternating (medians of {plan['sse_rounds']}; first byte: the first body bytes); "
        f"requests one after another (medians of {plan['failover_rounds']}).",
        "",
        "| measure | httpx2.AsyncClient | FailoverClient | FailoverClient / httpx2 |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, pair, fmt, scale in rows:
        hx, kf = pair["httpx2"], pair["keyfailover"]
        out.append(
            f"| {name} | {fmt.format(hx * scale)} | {fmt.format(kf * scale)} | {kf / hx:.2f}x |"
        )
    added = one["keyfailover_failover"] - one["keyfailover"]
    out += [
        "",
        "For times, a ratio below 1 means FailoverClient is faster. One failover: a request "
        "whose first key answers 429 (`retry-after-ms: 1`; the key is reset before each "
        "request) before the second answers 200 takes "
        f"{one['keyfailover_failover'] * 1e3:.3f} ms against {one['keyfailover'] * 1e3:.3f} ms "
        f"when the first key succeeds: {added * 1e3:+.3f} ms, one upstream round trip included.",
    ]
    return out


def runs(plan: dict[str, Any]) -> str:
    n = plan["shared_rounds"]
    return f"{n} run{'s' if n != 1 else ''}"


def state_section(r: dict[str, Any]) -> list[str]:
    """Proxy throughput with each state backend."""
    state = r.get("state")
    if not state:
        return []
    plan, labels = r["plan"], state["labels"]
    out = [
        "",
        "## Shared key state: proxy throughput",
        "",
        "The FailoverProxy app of the setups above, four times, each its own uvicorn process "
        'pinned to one CPU like the others: `KeyPool(..., state=None)`, `state="shm"` and '
        '`state="redis://..."` (the run\'s own redis-server on loopback, pinned to the load '
        "generator's CPU with the upstreams), every pool of a process in one namespace; and "
        "`state=None` with `KEYFAILOVER_METRICS=off`, not counting requests for the metrics. "
        f"{state['concurrency']} connections, closed loop; {runs(plan)} of "
        f"{plan['shared_duration']:g} s per setup, the four alternating (each round in a "
        "rotated order). The failover route's first key answers 429 with "
        "`retry-after-ms: 1`: each request that finds its 1 ms cooldown over fails over, and "
        "each such mark is a transition that the Redis backend writes (a Lua script that also "
        "PUBLISHes) and every process, this one included, applies when the message arrives.",
        "",
        "| route | state | req/s | x state=None | runs x state=None | CPU µs / request "
        "| CPU x state=None | p50 ms | p99 ms | upstream calls / request "
        "| Redis scripts / request | redis-server CPU µs / request | errors |",
        "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for route, rows in state["routes"].items():
        for key, row in rows.items():
            scripts, redis_cpu = row.get("scripts_per_request"), row.get("redis_cpu_per_request")
            cells = [
                {"json": "small blocking", "failover": "failover"}[route],
                labels[key].removeprefix("FailoverProxy, "),
                f"{row['rps']:,.0f}",
                f"{row['ratio']:.3f}" if "ratio" in row else "-",
                ", ".join(f"{x:.2f}" for x in row.get("ratios", [])),
                f"{row['cpu_per_request'] * 1e6:.0f}" if "cpu_per_request" in row else "-",
                f"{row['cpu_ratio']:.3f}" if "cpu_ratio" in row else "-",
                f"{row['p50']:.2f}",
                f"{row['p99']:.2f}",
                f"{row.get('upstream_calls_per_request', 0):.2f}",
                "-" if scripts is None else f"{scripts:.2f}",
                "-" if redis_cpu is None else f"{redis_cpu * 1e6:.1f}",
                str(row["errors"]),
            ]
            out.append("| " + " | ".join(cells) + " |")
    out += [
        "",
        "req/s: the median of the runs; x state=None: the median of the ratios of runs in the "
        "same round (a machine whose speed drifts, as a shared one does, moves both alike); CPU "
        "per request: the proxy process's CPU time (all its threads: Python, tokio, the Redis "
        "task) over the requests it answered, which another tenant's load changes less than "
        "req/s; redis-server's own CPU is counted apart. The goal passes when the lower "
        "quartile of the per-round ratios is at least 0.97 (with 5 rounds: every round but "
        "the lowest), fails when the upper quartile is below it, and is inconclusive (n/a) "
        "when they straddle it: the machine's noise was larger than the 3% asked about.",
    ]
    cost = state.get("mark_cost")
    if cost and "none" in cost:
        base = cost["none"]["cpu"]
        n = cost["none"]["transitions"]
        out += [
            "",
            f"What a transition costs: in one process on the proxies' CPU, {n:,} marks and "
            "resets in turn, 0.5 ms apart (so each is written on its own, as in the proxy, where "
            "a 1 ms cooldown separates a key's marks), until nothing is pending; the process's "
            "CPU time (every thread) per transition. The pacing loop costs the same with every "
            "backend: the difference to state=None is the backend's own.",
            "",
            "| state | CPU µs / transition | over state=None | transitions / failover request "
            "| = µs / failover request | of state=None's CPU / request |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        failover = state["routes"].get("failover", {})
        base_cpu = failover.get("kf-state-none", {}).get("cpu_per_request")
        for name, row in cost.items():
            extra = row["cpu"] - base
            per = failover.get("kf-state-redis", {}).get("scripts_per_request")
            cells = [name if name != "none" else "None", f"{row['cpu']:.1f}", f"{extra:+.1f}"]
            if name == "redis" and per is not None:
                cells += [f"{per:.2f}", f"{per * extra:+.1f}"]
                cells.append(f"{per * extra / (base_cpu * 1e6):+.1%}" if base_cpu else "-")
            else:
                cells += ["", "", ""]
            out.append("| " + " | ".join(cells) + " |")
    return out


def propagation_section(r: dict[str, Any]) -> list[str]:
    """How long a mark takes to reach another process."""
    propagation = r.get("propagation")
    if not propagation:
        return []
    out = [
        "",
        "## Shared key state: propagation between processes",
        "",
        "Two processes with a one-key pool in the same namespace: one (on the load generator's "
        "CPU) marks the key (`mark_temporary(60)`) and resets it in turn, "
        f"{propagation['marks']} of each, 1-4 ms apart, each a transition; the other (alone "
        "on the proxies' CPU, sharing it only with its own tokio thread) polls "
        "`pool.key(label).state` in a tight loop and timestamps each change. Latency: the "
        "poller's `time.monotonic()` when it sees the change minus the marker's just before "
        "the call (CLOCK_MONOTONIC, one clock for every process of the host). For Redis the "
        "mark goes out from the marker's background task (a Lua script, then PUBLISH) and "
        "lands through the poller's subscription; the floor is a bare PUBLISH from the "
        "load generator's CPU to a bare SUBSCRIBE socket on the other, the same path without "
        "keyfailover.",
        "",
        "| backend | transitions | p50 | p90 | p99 | max | polls/s of the poller |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, title in (("shm", "shm"), ("redis", "Redis")):
        row = propagation.get(name)
        if row is None:
            continue
        for kind, what in (("mark", "marks"), ("reset", "resets"), ("all", "all")):
            cells = row[kind]
            polls = f"{row['polls_per_second'] / 1e6:.1f} M" if kind == "all" else ""
            out.append(
                f"| {title} | {what}: {cells['n']} | {us(cells['p50'])} | {us(cells['p90'])} "
                f"| {us(cells['p99'])} | {us(cells['max'])} | {polls} |"
            )
    floor = propagation.get("floor")
    if floor:
        out.append(
            f"| floor: bare PUBLISH to SUBSCRIBE | {floor['n']} | {us(floor['p50'])} "
            f"| {us(floor['p90'])} | {us(floor['p99'])} | {us(floor['max'])} | |"
        )
    return out


def workers_section(r: dict[str, Any]) -> list[str]:
    """`keyfailover serve --workers 2` against `--workers 1`."""
    workers = r.get("workers")
    if not workers:
        return []
    plan, labels = r["plan"], workers["labels"]
    out = [
        "",
        "## keyfailover serve: --workers 2 vs --workers 1",
        "",
        "`keyfailover serve --server uvicorn` (no FastAPI; one key; default state: local for "
        "one worker, shm for two) in front of the same upstream. For this comparison the server "
        f"gets both CPUs ({workers['cpus']}, taskset on the supervisor, inherited by the "
        "forked workers), so it shares one with the load generator (pinned as everywhere "
        "else) and the upstream; `--workers 1` on one CPU, as the suite runs its other "
        f"setups, is shown for reference. {runs(plan)} of "
        f"{plan['shared_duration']:g} s per setup, alternating.",
        "",
        "| conc. | setup | req/s | x --workers 1 (both CPUs) | runs x --workers 1 "
        "| CPU µs / request | p50 ms | p99 ms | errors | worker CPU split "
        "| busier worker's share, each run |",
        "| ---: | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for c, rows in workers["concurrencies"].items():
        for key, row in rows.items():
            split = row.get("worker_cpu_share")
            cells = [
                c,
                labels[key],
                f"{row['rps']:,.0f}",
                f"{row['ratio']:.2f}" if "ratio" in row else "-",
                ", ".join(f"{x:.2f}" for x in row.get("ratios", [])),
                f"{row['cpu_per_request'] * 1e6:.0f}" if "cpu_per_request" in row else "-",
                f"{row['p50']:.2f}",
                f"{row['p99']:.2f}",
                str(row["errors"]),
                " / ".join(f"{share:.0%}" for share in split) if split else "",
                ", ".join(f"{share:.0%}" for share in row.get("busier_worker_share", [])),
            ]
            out.append("| " + " | ".join(cells) + " |")
    out += [
        "",
        "x --workers 1: the median of the ratios of runs in the same round. CPU per request: "
        "the server's processes (supervisor and workers, all threads) over the requests "
        "answered. Worker CPU split: each worker's share of the workers' CPU time over all runs, "
        "and the busier worker's share in each run (100%: the other served nothing). The "
        "workers accept from one shared listening socket, so whichever is awake when the "
        "load generator opens its connections (all at once) takes as many as it can, and "
        "keep-alive connections stay where they landed.",
    ]
    return out + native_cores_section(r)


def tls_section(r: dict[str, Any]) -> list[str]:
    """The native server in front of an upstream over TLS (HTTP/1.1 and HTTP/2)."""
    tls = r.get("tls")
    if not tls:
        return []
    plan, labels = r["plan"], tls["labels"]
    out = [
        "",
        "## The native server to an upstream over TLS",
        "",
        "The native server (one runtime thread, one CPU) in front of nginx answering the same "
        "small JSON reply in plain HTTP (every other table's upstream), over TLS 1.3 with "
        "HTTP/1.1 only, and over TLS 1.3 offering HTTP/2 (ALPN), as the providers' APIs do; "
        "a certificate authority of the run's own, trusted through `SSL_CERT_FILE`. "
        f"{runs(plan)} of {plan['shared_duration']:g} s per setup, alternating; the "
        "connections' handshakes are in the warm-up.",
        "",
        "| conc. | upstream | req/s | x plain HTTP | runs x plain HTTP | CPU µs / request "
        "| p50 ms | p99 ms | errors |",
        "| ---: | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for c, rows in tls["concurrencies"].items():
        for key, row in rows.items():
            cells = [
                c,
                labels.get(key, key),
                f"{row['rps']:,.0f}",
                f"{row['ratio']:.2f}" if "ratio" in row else "-",
                ", ".join(f"{x:.2f}" for x in row.get("ratios", [])),
                f"{row['cpu_per_request'] * 1e6:.1f}" if "cpu_per_request" in row else "-",
                f"{row['p50']:.2f}",
                f"{row['p99']:.2f}",
                str(row["errors"]),
            ]
            out.append("| " + " | ".join(cells) + " |")
    out += [
        "",
        "x plain HTTP: the median of the ratios of runs in the same round. CPU per request: "
        "the native server's process (all threads) over the requests answered; nginx's TLS "
        "work is the upstream's, not counted.",
    ]
    return out


def native_cores_section(r: dict[str, Any]) -> list[str]:
    """The native server on both CPUs against one."""
    from .shared import NATIVE_BASE, NATIVE_BOTH

    workers = r.get("workers") or {}
    native, labels = workers.get("native") or {}, workers.get("labels") or {}
    if not native:
        return []
    out = [
        "",
        "## keyfailover serve, native server: both CPUs vs one",
        "",
        "`keyfailover serve` (native, one process, one key) with its default threads (one per "
        f"CPU it may use) on both CPUs ({workers['cpus']}), against `--threads 1` pinned to "
        "one, in the same alternating rounds as the table above. This machine has two CPUs, so "
        '"both" is shared with the load generator (wrk, pinned to one of them) and the '
        "upstream (nginx, pinned there too): the ratio measured is what the server gets out of "
        "a second CPU it shares, not out of a free one. The CPU columns say how much it got: "
        "the server's CPU time (all threads) per request, and that times req/s, the CPUs it "
        "kept busy. Were both CPUs the server's alone, at the CPU time per request measured "
        "here, it would do 2 / (its CPU per request) req/s against 1 / (CPU per request with "
        "one thread) on one CPU: the last column, an estimate (it assumes the load generator "
        "and the upstream elsewhere, and nothing else in the way), not a measurement.",
        "",
        "| conc. | setup | req/s | x --threads 1 (one CPU) | runs | CPU µs / request "
        "| CPUs busy | p50 ms | p99 ms | errors | estimate with two free CPUs |",
        "| ---: | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c, rows in native.items():
        one = rows.get(NATIVE_BASE, {})
        for key, row in rows.items():
            cpu = row.get("cpu_per_request")
            estimate = "-"
            if key == NATIVE_BOTH and cpu and one.get("cpu_per_request"):
                estimate = f"{2 * one['cpu_per_request'] / cpu:.2f}x"
            cells = [
                c,
                labels[key],
                f"{row['rps']:,.0f}",
                f"{row['ratio']:.2f}" if "ratio" in row else "-",
                ", ".join(f"{x:.2f}" for x in row.get("ratios", [])),
                f"{cpu * 1e6:.0f}" if cpu else "-",
                f"{cpu * row['rps']:.2f}" if cpu else "-",
                f"{row['p50']:.2f}",
                f"{row['p99']:.2f}",
                str(row["errors"]),
                estimate,
            ]
            out.append("| " + " | ".join(cells) + " |")
    return out


def strategies_section(r: dict[str, Any]) -> list[str]:
    """The pool's strategies against provider-like rate limits."""
    from .strategies import KEYS, LOAD

    result = r.get("strategies")
    if not result:
        return []
    n, window, windows = result["limit"], result["window"], result["windows"]
    out = [
        "",
        "## Strategies against rate limits",
        "",
        f"{KEYS} keys, each limited by MockUpstream to N = {n} requests per {window:g} s window "
        "(both providers' rate-limit headers on every answer; 429 with `retry-after` once the "
        f"window is spent); {LOAD:g} x N requests per window in all, {LOAD * n * windows:,.0f} "
        f"over {windows} windows (7/8 of the pool's capacity), paced (open loop) with at most "
        f"{result['concurrency']} in flight, through the async `FailoverClient`; a fresh pool and "
        "MockUpstream for each strategy. Upstream latency: how long a 200 takes (a 429 comes "
        "at once); with none, requests hardly overlap.",
        "",
        "| upstream latency | strategy | 429 round trips / 1,000 requests | capacity served "
        "| client-visible errors | 200s per key |",
        "| ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for latency, rows in result["latencies"].items():
        for name, row in rows.items():
            cells = [
                f"{float(latency) * 1e3:.0f} ms",
                f"`{name}`",
                f"{per_thousand(row):.1f}",
                f"{row['served']:.1%}",
                str(row["errors"]),
                " / ".join(str(count) for count in row["per_key"]),
            ]
            out.append("| " + " | ".join(cells) + " |")
    out += [
        "",
        "429 round trips: upstream requests answered 429 (MockUpstream's requests less the 200s "
        "the client got), whether the request then failed over or not. Capacity served: the "
        f"requests that got a 200 over what the capacity allowed of the load, min(load, {KEYS} "
        "x N x windows); the load is below the capacity, so this is the share of the requests "
        "served. Client-visible errors: requests that got no 200 (every key cooling down, the "
        "pool answers 429 itself).",
    ]
    return out


def _pick(rows: dict[str, dict[str, float]], field: str) -> dict[str, float]:
    return {name: row[field] for name, row in rows.items()}


def core_section(r: dict[str, Any]) -> list[str]:
    """The key pool core, in Rust and from Python."""
    out: list[str] = []
    core = r.get("core") or {}
    if core:
        out += ["", "## Key pool core", "", "| where | operation | ns/op |", "| --- | --- | ---: |"]
        for where, rows in (("Rust", core.get("rust", [])), ("Python", core.get("python", []))):
            out += [f"| {where} | `{name}` | {ns:.1f} |" for name, ns in rows]
        if core.get("build_seconds", 0) >= 1:
            out += [
                "",
                f"(`cargo bench` built the benchmark in {core['build_seconds']:.0f} s first.)",
            ]
    return out


def tail(r: dict[str, Any]) -> list[str]:
    """The upstream choice, the notes, the time per section."""
    out: list[str] = []
    probe = r.get("probe") or {}
    if probe:
        out += ["", "## Upstream choice", "", "| upstream | req/s at c=16 |", "| --- | ---: |"]
        out += [f"| {name} | {rps:,.0f} |" for name, rps in probe.items()]
    if r["notes"]:
        out += ["", "## Notes", ""] + [f"- {note}" for note in r["notes"]]
    out += ["", "## Time per section", "", "| section | seconds |", "| --- | ---: |"]
    out += [f"| {name} | {seconds:.1f} |" for name, seconds in r["timings"].items()]
    return out


# --------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------


def plot(r: dict[str, Any], prefix: str) -> list[str]:
    """The PNGs; their file names (none when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        r["notes"].append("matplotlib is not installed (`pip install .[bench]`): no plots.")
        return []
    labels, blocking = r["labels"], r["blocking"]
    files = []

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for key, rows in blocking.items():
        cs = sorted(int(c) for c in rows)
        ax.plot(cs, [rows[str(c)]["rps"] for c in cs], marker="o", label=labels[key])
    ax.set(xscale="log", yscale="log", xlabel="concurrent connections", ylabel="requests / s")
    ax.set_xticks(r["plan"]["concurrencies"], [str(c) for c in r["plan"]["concurrencies"]])
    ax.set_title("Small blocking requests: throughput vs concurrency")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    files.append(f"{prefix}throughput.png")
    fig.tight_layout()
    fig.savefig(RESULTS / files[-1], dpi=110)
    plt.close(fig)

    concurrencies = r["plan"]["concurrencies"]
    fig, axes = plt.subplots(1, len(concurrencies), figsize=(5 * len(concurrencies), 4.5))
    for ax, c in zip(list(axes) if len(concurrencies) > 1 else [axes], concurrencies, strict=True):
        for key, rows in blocking.items():
            row = rows.get(str(c))
            if row is None:
                continue
            pcts = [p for p in PCTS if p < 100]
            nines = [1 / (1 - p / 100) for p in pcts]
            ax.plot(nines, [row["p"][str(p)] for p in pcts], marker=".", label=labels[key])
        ax.set(xscale="log", yscale="log", xlabel="percentile", ylabel="latency (ms)")
        ticks = [2, 10, 100, 1000]
        ax.set_xticks(ticks, ["50", "90", "99", "99.9"])
        ax.set_title(f"Latency distribution, c={c}")
        ax.grid(True, which="both", alpha=0.3)
    (list(axes) if len(concurrencies) > 1 else [axes])[0].legend(fontsize=8)
    files.append(f"{prefix}latency.png")
    fig.tight_layout()
    fig.savefig(RESULTS / files[-1], dpi=110)
    plt.close(fig)

    drift = r.get("drift")
    if drift and drift["samples"]:
        fig, ax = plt.subplots(figsize=(7, 4))
        xs = [0] + [n for n, _ in drift["samples"]] + [drift["requests"]]
        ys = [drift["first"]] + [rss for _, rss in drift["samples"]] + [drift["last"]]
        ax.plot(xs, [y / 2**20 for y in ys], marker=".")
        ax.set(xlabel="requests after warm-up (approx.)", ylabel="RSS (MB)", ylim=(0, None))
        ax.set_title(f"RSS of {labels[drift['setup']]} under load")
        ax.grid(True, alpha=0.3)
        files.append(f"{prefix}rss_drift.png")
        fig.tight_layout()
        fig.savefig(RESULTS / files[-1], dpi=110)
        plt.close(fig)
    return files

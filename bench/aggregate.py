#!/usr/bin/env python3
"""Aggregates one bench/run.sh run: medians (with min-max) over repetitions, target ratios.

Usage: aggregate.py RUN_DIR RESULTS_DIR [NAME]
Reads RUN_DIR/raw/<system>/<scenario>/rep<N>.json (loadgen output), RUN_DIR/meta.tsv; writes
RESULTS_DIR/NAME.json and RESULTS_DIR/NAME.md (NAME: latest). Targets are reported as PASS/MISS lines, never
as a failing exit status.
"""

import json
import statistics
import sys
from pathlib import Path

SYSTEMS = ["coffer", "openbao", "ceiling", "coffer_audit_off"]
SCENARIOS = ["get", "set", "list", "token", "get_1m"]
FIELDS = ["rps", "p50_ms", "p99_ms", "p999_ms", "cpu_us_per_req", "errors"]
ONE_MILLION = 1_000_000


def load_meta(run: Path):
    meta, notes = {}, []
    for line in (run / "meta.tsv").read_text().splitlines():
        if "\t" not in line:
            continue
        k, v = line.split("\t", 1)
        if k == "note":
            notes.append(v)
        else:
            meta[k] = v
    return meta, notes


def num(v):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return int(f) if f.is_integer() else f


def rnd(v, digits=3):
    if v is None:
        return None
    if isinstance(v, float):
        return round(v, digits)
    return v


def summarize(reps):
    """Medians and min-max over repetitions of one system/scenario."""
    out, rng = {}, {}
    for f in FIELDS:
        if f == "cpu_us_per_req":
            vals = [r.get("server", {}).get("cpu_us_per_req") for r in reps]
        else:
            vals = [r.get(f) for r in reps]
        vals = [v for v in vals if v is not None]
        if not vals:
            continue
        out[f] = rnd(statistics.median(vals))
        rng[f] = [rnd(min(vals)), rnd(max(vals))]
    out["errors_total"] = sum(r.get("errors", 0) for r in reps)
    out["reps"] = len(reps)
    out["connections"] = reps[0].get("connections")
    srv = [r.get("server", {}).get("cpu_util") for r in reps]
    srv = [v for v in srv if v is not None]
    if srv:
        out["server_cpu_cores"] = rnd(statistics.median(srv), 2)
    cli = [r.get("client", {}).get("cpu_util") for r in reps]
    cli = [v for v in cli if v is not None]
    if cli:
        out["client_cpu_cores"] = rnd(statistics.median(cli), 2)
    oth = [r.get("machine", {}).get("other_cores") for r in reps]
    oth = [v for v in oth if v is not None]
    if oth:
        out["other_cpu_cores"] = rnd(max(oth), 2)
    hwm = [r.get("server", {}).get("vm_hwm_kib") for r in reps]
    hwm = [v for v in hwm if v]
    if hwm:
        out["server_rss_peak_mib"] = rnd(max(hwm) / 1024, 1)
    samples = [r.get("error_sample") for r in reps if r.get("error_sample")]
    if samples:
        out["error_sample"] = samples[0]
    out["range"] = rng
    return out


def main():
    run, results = Path(sys.argv[1]), Path(sys.argv[2])
    name = sys.argv[3] if len(sys.argv) > 3 else "latest"
    meta, notes = load_meta(run)
    raw = run / "raw"
    doc = {}
    for system in SYSTEMS:
        entry = {}
        for sc in SCENARIOS:
            files = sorted((raw / system / sc).glob("rep*.json"))
            reps = [json.loads(f.read_text()) for f in files]
            if reps:
                entry[sc] = summarize(reps)
        if entry:
            doc[system] = entry

    small = num(meta.get("small_secrets")) or 1000
    for system in ("coffer", "openbao"):
        g = doc.get(system, {}).get("get_1m")
        if g is not None:
            n = num(meta.get(f"{system}_large_secrets")) or 0
            g["secrets"] = n
            g["baseline_secrets"] = small
            g["scaled"] = n < ONE_MILLION
        for sc in ("get", "list"):
            if sc in doc.get(system, {}):
                doc[system][sc]["secrets"] = small

    # Coffer: cold start and idle RSS (and the same with audit off, when there is a switch).
    for system in ("coffer", "coffer_audit_off"):
        cold = [json.loads(f.read_text()) for f in sorted((raw / system / "cold_start").glob("rep*.json"))]
        cold = [c for c in cold if "cold_start_ms" in c]
        if not cold:
            continue
        cs = [c["cold_start_ms"] for c in cold]
        rss = [c["vm_rss_kib"] / 1024 for c in cold if c.get("vm_rss_kib")]
        doc.setdefault(system, {})
        doc[system]["cold_start_ms"] = rnd(statistics.median(cs), 1)
        doc[system]["cold_start_ms_range"] = [rnd(min(cs), 1), rnd(max(cs), 1)]
        if rss:
            doc[system]["rss_idle_mib"] = rnd(statistics.median(rss), 1)
            doc[system]["rss_idle_mib_range"] = [rnd(min(rss), 1), rnd(max(rss), 1)]
    for system in ("coffer", "openbao", "ceiling"):
        peak = num(meta.get(f"{system}_rss_peak_kib"))
        if peak and system in doc:
            doc[system]["rss_peak_mib"] = rnd(peak / 1024, 1)
    if "openbao" in doc and num(meta.get("openbao_rss_idle_kib")):
        doc["openbao"]["rss_idle_mib"] = rnd(num(meta["openbao_rss_idle_kib"]) / 1024, 1)

    # Conditions, stated with the numbers.
    coffer_audit = meta.get("coffer_audit", "unknown")
    conditions = {
        "tls": "on for every system: TLS 1.3 (rustls client), HTTP/1.1 keep-alive, certificate verified",
        "loopback": "client and servers on 127.0.0.1, same 2-core machine (the load generator competes for CPU)",
        "coffer_auth": meta.get("coffer_auth", "unknown"),
        "coffer_durability": "durable writes: SQLite WAL, synchronous=FULL (an acknowledged PUT is on disk)",
        "coffer_audit": coffer_audit,
        "openbao_auth": "real non-root token from AppRole login, ACL policy on secret/*",
        "openbao_storage": "dev server: in-memory storage (writes are NOT durable), KV v2 mounted at secret/",
        "openbao_audit": "on: file audit device (declared in the config file, loaded by SIGHUP); "
        "OpenBao writes each entry with write(2), no fsync",
        "ceiling": "fixed JSON body (291 bytes) on Coffer's stack (tokio, hyper-util auto, tokio-rustls/ring), "
        "no auth, no storage",
        "values": "48-character secret values; GET keys drawn uniformly at random from the stored secrets",
    }
    if "coffer_audit_bytes_at_cold_start" in meta:
        conditions["coffer_audit_bytes_at_cold_start"] = num(meta["coffer_audit_bytes_at_cold_start"])
    if "openbao_audit_log_bytes" in meta:
        conditions["openbao_audit_log_bytes"] = num(meta["openbao_audit_log_bytes"])

    absent = []
    if "coffer" in doc and "token" not in doc["coffer"]:
        absent.append("coffer/token: the managed-identity agent is not available in this build (no IDENTITY_ENDPOINT)")
    if "coffer" in doc and "coffer_audit_off" not in doc:
        if "not implemented" in coffer_audit:
            absent.append("coffer_audit_off: the server has no audit switch yet (Coffer is unaudited in every figure)")
    for s in ("ceiling",):
        if s in doc:
            absent.append("ceiling: get only (it serves one fixed body)")

    probe_file = raw / "commit-probe.json"
    commit_probe = json.loads(probe_file.read_text()) if probe_file.exists() else None
    targets = compute_targets(doc, coffer_audit, paired_ratios(raw, "coffer", "coffer_audit_off", "get"),
                              commit_probe,
                              paired_cpu_differences(raw, "coffer", "coffer_audit_off", "get"))
    out = {
        "schema": 1,
        "meta": {
            "mode": meta.get("mode"),
            "started": meta.get("started"),
            "finished": meta.get("finished"),
            "wall_seconds": num(meta.get("wall_seconds")),
            "duration": meta.get("duration"),
            "warmup": meta.get("warmup"),
            "reps": num(meta.get("reps")),
            "machine": {
                "nproc": num(meta.get("nproc")),
                "cpu_model": meta.get("cpu_model"),
                "memory": meta.get("mem_total"),
                "kernel": meta.get("kernel"),
                "loadavg_at_start": meta.get("loadavg_at_start"),
                "durable_commit": commit_probe,
            },
            "versions": {
                "coffer_commit": meta.get("coffer_commit"),
                "openbao": meta.get("openbao_version"),
                "rustc": meta.get("rustc"),
            },
            "conditions": conditions,
            "populate": {
                "coffer_large_rps": num(meta.get("coffer_populate_rps")),
                "coffer_large_db_bytes": num(meta.get("coffer_large_db_bytes")),
                "openbao_large_rps": num(meta.get("openbao_populate_rps")),
            },
            "absent": absent,
            "notes": notes,
        },
        **doc,
        "targets": targets,
    }
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps(out, indent=2) + "\n")
    (results / f"{name}.md").write_text(markdown(out, doc, targets, meta, notes, absent, conditions))


def get(doc, system, sc, field):
    return doc.get(system, {}).get(sc, {}).get(field)


def paired(raw, system, baseline, sc, combine, field=lambda r: r.get("rps")):
    """combine(field of `system`, field of `baseline`) for each repetition both completed (run one
    right after the other, so each pair shares the machine's conditions)."""
    out = []
    for f in sorted((raw / system / sc).glob("rep*.json")):
        b = raw / baseline / sc / f.name
        if not b.exists():
            continue
        a_val, b_val = field(json.loads(f.read_text())), field(json.loads(b.read_text()))
        if a_val and b_val:
            out.append(combine(a_val, b_val))
    return out


def paired_ratios(raw, system, baseline, sc):
    """rps of `system` over rps of `baseline`, per pair of repetitions."""
    return paired(raw, system, baseline, sc, lambda a, b: a / b)


def paired_cpu_differences(raw, system, baseline, sc):
    """Server CPU per request of `system` minus `baseline`'s, per pair of repetitions."""
    return paired(raw, system, baseline, sc, lambda a, b: a - b,
                  lambda r: r.get("server", {}).get("cpu_us_per_req"))


def compute_targets(doc, coffer_audit, audit_pairs=(), commit_probe=None, audit_cpu=()):
    t = []
    unaudited = "not implemented" in coffer_audit

    def add(name, value, target, ok, detail, caveat=None):
        if value is None:
            t.append({"target": name, "status": "N/A", "detail": detail + " (a figure is absent)"})
            return
        entry = {"target": name, "value": rnd(value, 2), "goal": target, "status": "PASS" if ok else "MISS",
                 "detail": detail}
        if caveat:
            entry["caveat"] = caveat
        t.append(entry)

    cg, og = get(doc, "coffer", "get", "rps"), get(doc, "openbao", "get", "rps")
    r = cg / og if cg and og else None
    add("audited GET throughput >= 10x OpenBao's audited GET", r, ">= 10", r is not None and r >= 10,
        f"coffer {fmt(cg)} req/s / openbao {fmt(og)} req/s",
        "Coffer has no audit yet: unaudited Coffer vs audited OpenBao" if unaudited else None)
    cc, ec = get(doc, "coffer", "get", "cpu_us_per_req"), get(doc, "ceiling", "get", "cpu_us_per_req")
    r = cc / ec if cc and ec else None
    add("server CPU per GET <= 3x the ceiling's", r, "<= 3", r is not None and r <= 3,
        f"coffer {fmt(cc)} us/req / ceiling {fmt(ec)} us/req")
    p99 = get(doc, "coffer", "get", "p99_ms")
    p99_off = get(doc, "coffer_audit_off", "get", "p99_ms")
    add("GET p99 <= 5 ms at 64 connections", p99, "<= 5 ms", p99 is not None and p99 <= 5,
        f"coffer GET p99 {fmt(p99)} ms"
        + (f"; with audit off {fmt(p99_off)} ms" if p99_off is not None else "")
        + (f"; one durable commit on this disk: p99 {commit_probe['p99_us'] / 1000:.2f} ms" if commit_probe else ""))
    cs, os_ = get(doc, "coffer", "set", "rps"), get(doc, "openbao", "set", "rps")
    r = cs / os_ if cs and os_ else None
    add("durable, audited SET throughput >= 3x OpenBao's in-memory SET", r, ">= 3", r is not None and r >= 3,
        f"coffer {fmt(cs)} req/s / openbao {fmt(os_)} req/s",
        "Coffer has no audit yet: its SET is durable but unaudited" if unaudited else None)
    big = doc.get("coffer", {}).get("get_1m")
    small = doc.get("coffer", {}).get("get")
    if big and small and big.get("rps") and small.get("rps"):
        r_rps = small["rps"] / big["rps"]
        r_p99 = big["p99_ms"] / small["p99_ms"] if small.get("p99_ms") else None
        worst = max(r_rps, r_p99 or 0)
        n = big.get("secrets", 0)
        add("GET at 1,000,000 secrets within 1.5x of GET at 1,000", worst, "<= 1.5", worst <= 1.5,
            f"throughput {fmt(small['rps'])} -> {fmt(big['rps'])} req/s ({r_rps:.2f}x), "
            f"p99 {fmt(small.get('p99_ms'))} -> {fmt(big.get('p99_ms'))} ms ({(r_p99 or 0):.2f}x), at {n:,} secrets",
            f"SCALED: measured at {n:,} secrets, not 1,000,000" if n < ONE_MILLION else None)
    else:
        add("GET at 1,000,000 secrets within 1.5x of GET at 1,000", None, "<= 1.5", False, "coffer get_1m")
    # Issue 4: the audit's cost, from repetitions paired in time (audited, then unaudited).
    ca, cu = get(doc, "coffer", "get", "rps"), get(doc, "coffer_audit_off", "get", "rps")
    r = statistics.median(audit_pairs) if audit_pairs else None
    add("issue 4: audited GET throughput >= 90% of unaudited (median of paired repetitions)", r, ">= 0.9",
        r is not None and r >= 0.9,
        f"pairs {', '.join(f'{x:.0%}' for x in audit_pairs) or '—'}; medians: coffer {fmt(ca)} req/s audited, "
        f"{fmt(cu)} req/s with audit off" + audit_budget(doc, cu, commit_probe)
        + (f"; the audit's own cost, audited minus unaudited server CPU per GET (median of the pairs): "
           f"{statistics.median(audit_cpu):.1f} µs" if audit_cpu else ""))
    cold = doc.get("coffer", {}).get("cold_start_ms")
    add("cold start to first served secret <= 100 ms", cold, "<= 100 ms", cold is not None and cold <= 100,
        f"coffer {fmt(cold)} ms")
    rss = doc.get("coffer", {}).get("rss_idle_mib")
    add("idle RSS <= 30 MiB", rss, "<= 30 MiB", rss is not None and rss <= 30, f"coffer {fmt(rss)} MiB")
    return t


def audit_budget(doc, unaudited_rps, probe):
    """What 90 % leaves the audit, next to what one durable commit costs on this disk. Each of the
    GET scenario's connections sends its next request when the last is answered, so 90 % of the
    unaudited throughput allows each audited GET 1/9 of the unaudited GET's mean time more, of
    which a group-committed request waits on average about one and a half commits."""
    conns = get(doc, "coffer_audit_off", "get", "connections") or 64
    if not unaudited_rps or not probe:
        return ""
    budget_us = conns / unaudited_rps * 1e6 / 9
    return (f"; at {conns} connections 90 % allows an audited GET {budget_us:,.0f} µs more than an unaudited one, "
            f"and one durable commit on this disk takes {probe['p50_us']} µs (p50; mean {probe['mean_us']:,.0f}) "
            f"and {probe['cpu_us_per_commit']} µs of CPU")


def fmt(v, digits=None):
    if v is None:
        return "—"
    if isinstance(v, (int,)) or (isinstance(v, float) and abs(v) >= 100):
        return f"{v:,.0f}"
    if digits is not None:
        return f"{v:.{digits}f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def cell(s, f):
    v = s.get(f)
    if v is None:
        return "—"
    rng = s.get("range", {}).get(f)
    if rng and rng[0] != rng[1] and s.get("reps", 1) > 1:
        return f"{fmt(v)} ({fmt(rng[0])}–{fmt(rng[1])})"
    return fmt(v)


LABELS = {
    "get": "get",
    "set": "set (new version)",
    "list": "list (first 25 of 1,000)",
    "token": "token",
    "get_1m": "get, large store",
}


def markdown(out, doc, targets, meta, notes, absent, conditions):
    m = out["meta"]
    lines = []
    lines.append(f"# Coffer benchmark: {m['mode']} run, {m['started']}")
    lines.append("")
    lines.append(
        f"{m['reps']} repetitions of {m['duration']} measured after {m['warmup']} warm-up each; "
        "cells are **median (min–max)**. Server CPU is utime+stime of the server process over the "
        "measured window divided by the requests completed in it; *server/client cores* are CPU "
        "time over wall time; *other load* is the CPU that everything else on the machine used meanwhile "
        "(noise: other builds on this shared 2-core machine). Produced by `bench/run.sh`"
        + (" with `BENCH_QUICK=1`" if m["mode"] == "quick" else "")
        + f" in {m['wall_seconds']} s."
    )
    lines.append("")
    mc = m["machine"]
    v = m["versions"]
    lines.append(
        f"Machine: {mc['nproc']} cores ({mc['cpu_model']}), {mc['memory']}, Linux {mc['kernel']}, "
        f"load average at start {mc['loadavg_at_start']}. Coffer {v['coffer_commit']} ({v['rustc']}), "
        f"{v['openbao']}."
    )
    dc = mc.get("durable_commit")
    if dc:
        lines.append("")
        lines.append(
            f"Disk (`loadgen commit-probe`, {dc['commits']} commits of {dc['bytes_per_commit'] // 1024} KiB: "
            f"overwrite + fdatasync, as the audit journal commits): p50 {dc['p50_us']} µs, p99 {dc['p99_us']} µs, "
            f"{dc['cpu_us_per_commit']} µs of CPU per commit."
        )
    lines.append("")
    lines.append("**Conditions**")
    lines.append("")
    for k, val in conditions.items():
        lines.append(f"- {k.replace('_', ' ')}: {val}")
    lines.append("")
    lines.append("| system | scenario | conns | req/s | p50 ms | p99 ms | p99.9 ms | server CPU µs/req | "
                 "errors | server cores | client cores | other load (max) |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for system in SYSTEMS:
        for sc in SCENARIOS:
            s = doc.get(system, {}).get(sc)
            if not s:
                continue
            label = LABELS[sc]
            if sc == "get_1m":
                label = f"get, {s.get('secrets', 0):,} secrets" + (" (SCALED, not 1,000,000)" if s.get("scaled") else "")
            elif sc == "token" and system == "openbao":
                label = "token (AppRole login)"
            elif sc == "token" and system.startswith("coffer"):
                label = "token (managed-identity agent)"
            elif sc == "get" and system != "ceiling":
                label = f"get ({s.get('secrets', 1000):,} secrets)"
            elif sc == "get":
                label = "get (fixed body)"
            lines.append(
                f"| {system} | {label} | {s.get('connections')} | {cell(s, 'rps')} | {cell(s, 'p50_ms')} | "
                f"{cell(s, 'p99_ms')} | {cell(s, 'p999_ms')} | {cell(s, 'cpu_us_per_req')} | "
                f"{s.get('errors_total', 0)} | {fmt(s.get('server_cpu_cores'), 2)} | {fmt(s.get('client_cpu_cores'), 2)} | "
                f"{fmt(s.get('other_cpu_cores'), 2)} |"
            )
    lines.append("")
    extra = []
    audit_bytes = conditions.get("coffer_audit_bytes_at_cold_start")
    for system, what in (("coffer", "Coffer"), ("coffer_audit_off", "Coffer with audit off")):
        c = doc.get(system, {})
        if "cold_start_ms" in c:
            r = c["cold_start_ms_range"]
            extra.append(f"- {what}: cold start (process start → first secret served, TLS handshake included): "
                         f"**{fmt(c['cold_start_ms'])} ms** ({fmt(r[0])}–{fmt(r[1])})"
                         + (f", with {audit_bytes / 2**20:,.0f} MiB of audit data from this run on disk"
                            if audit_bytes and system == "coffer" else ""))
        if "rss_idle_mib" in c:
            r = c["rss_idle_mib_range"]
            extra.append(f"- {what}: idle RSS (1 s after the first GET of a cold start): **{fmt(c['rss_idle_mib'])} MiB** "
                         f"({fmt(r[0])}–{fmt(r[1])})")
    for system in ("coffer", "openbao", "ceiling"):
        d = doc.get(system, {})
        if "rss_peak_mib" in d:
            extra.append(f"- {system} peak RSS (VmHWM) after get/set/list/token: {fmt(d['rss_peak_mib'])} MiB")
    if "rss_idle_mib" in doc.get("openbao", {}):
        extra.append(f"- openbao RSS after start, setup and 1,000 secrets, idle 1 s: "
                     f"{fmt(doc['openbao']['rss_idle_mib'])} MiB")
    for system in ("coffer", "openbao"):
        g = doc.get(system, {}).get("get_1m")
        if g and g.get("server_rss_peak_mib"):
            extra.append(f"- {system} peak RSS with the large store ({g['secrets']:,} secrets): "
                         f"{fmt(g['server_rss_peak_mib'])} MiB")
    p = m["populate"]
    if p.get("coffer_large_rps"):
        rate = p["coffer_large_rps"]
        extra.append(f"- Coffer large-store population (durable PUTs over HTTPS, 32 connections): {fmt(rate)} /s "
                     f"this run; 1,000,000 secrets take ≈ {1_000_000 / rate / 60:.0f} min at that rate")
    if p.get("coffer_large_db_bytes"):
        extra.append(f"- Coffer large-store database: {p['coffer_large_db_bytes'] / 2**20:,.0f} MiB")
    if p.get("openbao_large_rps"):
        extra.append(f"- OpenBao large-store population (in memory, audited): {fmt(p['openbao_large_rps'])} /s")
    lines.extend(extra)
    lines.append("")
    lines.append("**Targets (issue 6 §3 and issue 4's audit cost), as ratios measured in this run**")
    lines.append("")
    for t in targets:
        val = "" if t["status"] == "N/A" else f" — {fmt(t['value'])} (goal {t['goal']})"
        cav = f" — **{t['caveat']}**" if t.get("caveat") else ""
        lines.append(f"- {t['status']}: {t['target']}{val}; {t['detail']}{cav}")
    if absent or notes:
        lines.append("")
        lines.append("**Absent figures and notes**")
        lines.append("")
        for a in absent:
            lines.append(f"- absent: {a}")
        for n in notes:
            lines.append(f"- note: {n}")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""One progress line from a loadgen JSON file: summary.py load|populate|coldstart FILE."""
import json
import sys

kind, path = sys.argv[1], sys.argv[2]
d = json.load(open(path))
if kind == "load":
    s, c, m = d.get("server", {}), d.get("client", {}), d.get("machine", {})
    print(
        "%8.0f req/s  p50 %6.2f  p99 %7.2f  p99.9 %7.2f ms  server %5.0f us/req (%.2f cores)  client %.2f  other %.2f cores  errors %d"
        % (d["rps"], d.get("p50_ms", 0), d.get("p99_ms", 0), d.get("p999_ms", 0), s.get("cpu_us_per_req") or 0,
           s.get("cpu_util") or 0, c.get("cpu_util") or 0, m.get("other_cores") or 0, d["errors"])
        + (f"  [{d['error_sample']}]" if d.get("error_sample") else "")
    )
elif kind == "populate":
    print(
        "%d/%d done in %.1f s (%.0f/s, server %.0f us/req), errors %d%s"
        % (d["done"], d["requested"], d["secs"], d["rps"], d.get("server_cpu_us_per_req") or 0, d["errors"],
           f" [{d['error_sample']}]" if d.get("error_sample") else "")
    )
elif kind == "coldstart":
    print("%.1f ms to the first secret; idle RSS %.1f MiB" % (d["cold_start_ms"], (d.get("vm_rss_kib") or 0) / 1024))

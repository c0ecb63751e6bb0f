"""Summarise `ncu --csv` output per kernel: time, registers, spill bytes, DRAM bytes, grid;
with STALL_METRICS collected too, achieved occupancy, DRAM and SM throughput and the top warp
stall reasons (what holds a kernel that moves its bytes once but slowly).

    ncu --clock-control none --csv --metrics <see METRICS> python ... > ncu.csv
    python -m pallas_kernels.chunked_scan.ncu_summary ncu.csv
    python -m pallas_kernels.chunked_scan.ncu_summary ncu.csv --all   # every metric collected
"""

import csv
import sys
from collections import defaultdict

METRICS = ("gpu__time_duration.sum,launch__registers_per_thread,dram__bytes_read.sum,"
           "dram__bytes_write.sum,l1tex__t_bytes_pipe_lsu_mem_local_op_st.sum,launch__grid_size")
STALL_PREFIX, STALL_SUFFIX = "smsp__average_warps_issue_stalled_", "_per_issue_active.ratio"
# the common reasons of ncu's WarpStateStats section (an unknown name makes ncu profile nothing)
STALLS = ("long_scoreboard", "short_scoreboard", "wait", "barrier", "math_pipe_throttle",
          "mio_throttle", "lg_throttle", "not_selected", "selected", "no_instruction")
THROUGHPUT = ("sm__warps_active.avg.pct_of_peak_sustained_active",
              "dram__throughput.avg.pct_of_peak_sustained_elapsed",
              "sm__throughput.avg.pct_of_peak_sustained_elapsed")
STALL_METRICS = ",".join(THROUGHPUT + tuple(STALL_PREFIX + n + STALL_SUFFIX for n in STALLS))


def stall_line(m: dict, top: int = 3) -> str:
    """'occ 23% dram 41% sm 30% | long_scoreboard 5.1, wait 1.2, ...' ('' without them)."""
    if THROUGHPUT[0] not in m:
        return ""
    occ, dram, sm = (m.get(k, 0.0) for k in THROUGHPUT)
    stalls = sorted(((m.get(STALL_PREFIX + n + STALL_SUFFIX, 0.0), n) for n in STALLS),
                    reverse=True)[:top]
    return (f"occ {occ:.0f}% dram {dram:.0f}% sm {sm:.0f}% | "
            + ", ".join(f"{n} {x:.1f}" for x, n in stalls))


def main(path, every_metric=False):
    lines = [ln for ln in open(path).read().splitlines() if ln.startswith('"')]
    rows = defaultdict(dict)
    for r in csv.DictReader(lines):
        key = (int(r["ID"]), r["Kernel Name"][:60])
        v = r["Metric Value"].replace(",", "")
        unit = r.get("Metric Unit", "")
        try:
            x = float(v)
        except ValueError:
            continue
        scale = {"ns": 1e-3, "usecond": 1, "us": 1, "msecond": 1e3, "ms": 1e3, "byte": 1,
                 "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "KB": 1e3, "MB": 1e6, "GB": 1e9,
                 "nsecond": 1e-3}.get(unit, 1)
        rows[key][r["Metric Name"]] = x * scale
    if every_metric:  # one block per kernel launch, one metric per line (short names)
        for (i, name), m in sorted(rows.items()):
            print(f"{i:>4} {name}")
            for k, x in m.items():
                short = k.replace("smsp__average_warps_issue_stalled_", "stall_").replace(
                    "_per_issue_active.ratio", "")
                print(f"       {short:55} {x:14.3f}")
        return
    print(f"{'id':>4} {'kernel':60} {'us':>9} {'regs':>5} {'spillB':>9} {'dramMB':>9} {'grid':>8}")
    tot = 0.0
    for (i, name), m in sorted(rows.items()):
        us = m.get("gpu__time_duration.sum", 0)
        tot += us
        dram = (m.get("dram__bytes_read.sum", 0) + m.get("dram__bytes_write.sum", 0)) / 1e6
        print(f"{i:>4} {name:60} {us:9.1f} {m.get('launch__registers_per_thread', 0):5.0f} "
              f"{m.get('l1tex__t_bytes_pipe_lsu_mem_local_op_st.sum', 0):9.0f} {dram:9.1f} "
              f"{m.get('launch__grid_size', 0):8.0f}")
        if stall_line(m):
            print(f"{'':>4} {'':60} {stall_line(m)}")
    print(f"total {tot:.1f} us over {len(rows)} kernels")


if __name__ == "__main__":
    main(sys.argv[1], "--all" in sys.argv[2:])

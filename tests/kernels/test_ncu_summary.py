"""ncu_summary reads `ncu --csv` rows per kernel launch: time, registers, DRAM bytes and, when
collected, occupancy, throughputs and the largest warp stall reasons."""

import csv
import io

from pallas_kernels.chunked_scan import ncu_summary as ns


def _csv(rows):
    buf = io.StringIO()
    w = csv.writer(buf, quoting=csv.QUOTE_ALL)
    w.writerow(["ID", "Kernel Name", "Metric Name", "Metric Unit", "Metric Value"])
    w.writerows(rows)
    return "==PROF== a line ncu prints\n" + buf.getvalue()


def test_summary_with_stall_reasons(tmp_path, capsys):
    stall = ns.STALL_PREFIX + "{}" + ns.STALL_SUFFIX
    rows = [("0", "mamba3_rotate_qk_bwd", "gpu__time_duration.sum", "usecond", "500"),
            ("0", "mamba3_rotate_qk_bwd", "launch__registers_per_thread", "", "80"),
            ("0", "mamba3_rotate_qk_bwd", "dram__bytes_read.sum", "Mbyte", "400"),
            ("0", "mamba3_rotate_qk_bwd", "dram__bytes_write.sum", "Mbyte", "288"),
            ("0", "mamba3_rotate_qk_bwd", ns.THROUGHPUT[0], "%", "23.4"),
            ("0", "mamba3_rotate_qk_bwd", ns.THROUGHPUT[1], "%", "41"),
            ("0", "mamba3_rotate_qk_bwd", ns.THROUGHPUT[2], "%", "30"),
            ("0", "mamba3_rotate_qk_bwd", stall.format("long_scoreboard"), "", "5.1"),
            ("0", "mamba3_rotate_qk_bwd", stall.format("wait"), "", "1.2"),
            ("0", "mamba3_rotate_qk_bwd", stall.format("barrier"), "", "2.5"),
            ("0", "mamba3_rotate_qk_bwd", stall.format("selected"), "", "1.0"),
            ("1", "loop_add_fusion", "gpu__time_duration.sum", "nsecond", "2000")]
    path = tmp_path / "ncu.csv"
    path.write_text(_csv(rows))
    ns.main(str(path))
    out = capsys.readouterr().out
    assert "mamba3_rotate_qk_bwd" in out and "688.0" in out  # DRAM MB read + written
    assert "occ 23% dram 41% sm 30% | long_scoreboard 5.1, barrier 2.5, wait 1.2" in out
    assert "total 502.0 us over 2 kernels" in out
    assert out.count("occ ") == 1  # the fusion without stall metrics gets no such line

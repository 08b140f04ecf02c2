"""bench/_perf_split.py reads `perf report` output as bench/http.py --perf prints it: shares per
shared object and the kernel's wake-ups of the reading peer. Table tests on perf's own format
(captured from perf 6.x on this project's machine, the gateway under wrk)."""

from __future__ import annotations

import pytest

from bench import _perf_split as perf_split

DSO_REPORT = """# To display the perf.data header info, please use --header/--header-only options.
#
# Samples: 11K of event 'cpu-clock:pppH'
#
# Overhead  Shared Object
# ........  ........................................
#
    55.65%  [kernel.kallsyms]
    31.19%  libpython3.11.so.1.0
     5.52%  parser.cpython-311-x86_64-linux-gnu.so
     3.77%  libc.so.6
     3.46%  loop.cpython-311-x86_64-linux-gnu.so
     0.39%  [vdso]
     0.02%  _bisect.cpython-311-x86_64-linux-gnu.so
"""

SYM_REPORT = """# Children      Self  Symbol
# ........  ........  ..........................................
#
    55.50%     1.10%  [k] do_syscall_64
    42.65%     0.57%  [.] __GI___libc_write
    13.96%    13.96%  [k] _raw_spin_unlock_irqrestore
    13.76%     0.65%  [k] sock_def_readable
     0.01%     0.00%  [k] __wake_up_sync_key
"""


def test_every_listed_row_is_read() -> None:
    assert len(perf_split.parse_rows(DSO_REPORT)) == 7
    assert perf_split.parse_rows(SYM_REPORT)[3] == (13.76, 0.65, "[k] sock_def_readable")


def test_shares_per_shared_object() -> None:
    shares = perf_split.parse_dso(perf_split.parse_rows(DSO_REPORT))
    assert shares["kernel"] == pytest.approx(0.5565)
    assert shares["libpython3.11"] == pytest.approx(0.3119)
    assert shares["parser"] == pytest.approx(0.0552)  # an extension module by its module name
    assert shares["loop"] == pytest.approx(0.0346)
    assert shares["libc"] == pytest.approx(0.0377)
    assert shares["[vdso]"] == pytest.approx(0.0039)
    assert sum(shares.values()) == pytest.approx(1.0, abs=0.001)


def test_wakeups_are_the_children_share_of_sock_def_readable() -> None:
    # the children column (13.76%), not its self time (0.65%) nor the lock release it ends in
    assert perf_split.parse_wakeups(perf_split.parse_rows(SYM_REPORT)) == pytest.approx(0.1376)


def test_no_wakeups_in_a_profile_without_the_symbol() -> None:
    assert perf_split.parse_wakeups(perf_split.parse_rows("    42.65%     0.57%  [.] __GI___libc_write\n")) == 0.0

"""benchkit: the modules behind pheap's benchmarks (tools/bench_alloc.py, tools/bench_objects.py).

The scripts in tools/ are thin command lines; the tests import these modules.
tools/bench_all.py runs both and writes docs/benchmarks.md, the one file the docs' figures
come from.

========================  ====================================================================
``env``                   the environment line, CPU-idle probe, CPU used by others meanwhile
``report``                tables, number formats, medians/spreads/ratios, the peers table
``timing``                GC off around timed loops, calibration, budgets, round-robin order
``traces``                malloc-lab trace parser, replay
``firstfit``              the first-fit baseline allocator
``internals``             the ONE function that reaches inside pheap (adapt it when they change)
``contenders``            pheap / multiprocessing.heap / first-fit behind one interface
``alloc_suites``          the allocator benchmark's sections
``stores``                keys/values, the base classes of the object benchmark's systems
``procs``                 forked children gathered with a deadline and reaped; shm cleanup
``peers``                 the peers pheap's objects are measured against (one adapter each)
``pheap_objects``         everything pheap-specific in the object benchmark (pheap's object API)
``object_suites``         the object benchmark's sections a-h
========================  ====================================================================
"""

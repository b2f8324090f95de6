"""The benchmark harness, run from the repository root as modules:

    .venv/bin/python -m bench.run --quick          # the paper's protocol on real ComfyUI VAEs
    .venv/bin/python -m bench.memory_scaling       # peak memory against frames and megapixels
    .venv/bin/python -m bench.node_overhead        # the node against core.invert
    .venv/bin/python -m bench.tile_floor           # how small a spatial tile may be

Protocol, columns and results: bench/README.md.
"""

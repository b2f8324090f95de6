"""Stand-in for PyAV on the lent GPU machine only (bench/gpu.sh adds this folder to PYTHONPATH when
`import av` fails there): its image has no PyAV and the 35 MB wheel does not fit the 64 MiB the device
tool carries beside the models. ComfyUI's comfy_api imports av at module level for its video types;
bench.gpu runs no video code, and any use of a name here raises."""


class _Missing:
    def __init__(self, *args, **kwargs):
        raise ImportError("PyAV is not installed on this machine (bench/gpu_stubs stands in for imports only)")


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return type(name, (_Missing,), {})

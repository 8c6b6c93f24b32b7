"""What a source folder of the checkout (kernels/, engine/, ecgvf/, bench/) is when it is imported
under its own top-level name instead of as earkit.*.

That happens whenever the repository root is on sys.path: Python started in the root (`python -c`,
`python -m pytest`), or an editable install (`pip install -e .` adds the root to every process).
Then `kernels/` poses as Hugging Face's `kernels` package, which transformers and bitsandbytes
probe for: transformers finds it, reads `getattr(kernels, "__version__", "N/A")` and imports it.
So the folder's __init__ runs none of its code under that name (earkit's ops would be registered a
second time) and hands out `refusal(name)` as its module __getattr__: dunder lookups say "absent"
(the probe concludes there is no usable `kernels` and goes on), and any real use, such as
`from kernels import get_kernel`, fails at once with an ImportError that says why.
"""


def refusal(name: str):
    def __getattr__(attribute: str):
        if attribute.startswith("__") and attribute.endswith("__"):
            raise AttributeError(attribute)
        raise ImportError(
            f"'{name}' here is earkit's source folder {name}/, imported under its own name because the "
            f"repository root is on sys.path; it is only ever earkit.{name} (import earkit.{name}). "
            + ("Hugging Face's `kernels` package is not installed." if name == "kernels" else ""))

    return __getattr__

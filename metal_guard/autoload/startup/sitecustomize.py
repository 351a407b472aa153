"""metal-guard's ``sitecustomize`` shim, for environments without the autoload ``.pth``.

``metal-guard run --sitecustomize -- <cmd>`` (and ``metal-guard run`` when it cannot find the
``.pth``) prepends this directory to ``PYTHONPATH``. Python then imports this module at the
end of site start-up; it activates metal-guard exactly like the ``.pth`` would (still gated on
``METALGUARD_AUTOLOAD``) and then runs the ``sitecustomize`` it shadows, if there is one.
Ignored under ``python -E``/``-I``/``-S``.
"""


def _chain():
    import importlib
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    me = sys.modules.get(__name__)
    saved = list(sys.path)
    try:
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
        sys.modules.pop("sitecustomize", None)
        try:
            importlib.import_module("sitecustomize")
        except ImportError as exc:
            if getattr(exc, "name", None) != "sitecustomize":
                raise
    except Exception as exc:
        sys.stderr.write(f"metal-guard: the shadowed sitecustomize failed: {type(exc).__name__}: {exc}\n")
    finally:
        sys.path[:] = saved
        if me is not None:
            sys.modules["sitecustomize"] = me


def _boot():
    try:
        import _metal_guard_boot

        _metal_guard_boot.init()
    except Exception as exc:
        import sys

        sys.stderr.write(f"metal-guard autoload: {type(exc).__name__}: {exc}\n")


_boot()
_chain()

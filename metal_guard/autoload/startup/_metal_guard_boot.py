"""metal-guard zero-code activation (installed at the top of site-packages by the wheel).

Every interpreter of the environment imports this module at start-up through
``metal_guard-autoload.pth`` (Python <= 3.14) or ``metal_guard-autoload.start`` (PEP 829,
Python >= 3.15). It therefore imports nothing at module level and does nothing at all unless
``METALGUARD_AUTOLOAD`` is ``1``/``true``/``yes``/``on``. When it is:

1. it waits for the end of site start-up (later ``.pth`` files, ``sitecustomize`` and
   ``usercustomize`` have run), then
2. puts a tiny finder in ``sys.meta_path`` that imports nothing and reacts only to the first
   import of a package metal-guard adapts (``mlx_lm``, ``mlx_vlm``, ``langchain_community``,
   ``langchain_core``);
3. at that moment — before the package's own code runs — it calls
   ``metal_guard.installer.autoload_install()``, which hooks the package's defining modules.
   If such a package was already imported during start-up, ``install()`` runs at step 1.

It never raises: a failure is one line on stderr and the interpreter carries on unguarded.
``METALGUARD_DISABLED=1`` (checked by ``install()``) beats ``METALGUARD_AUTOLOAD=1``.
"""

#: Top-level packages whose first import activates metal-guard. Kept equal to the top-level
#: names of ``metal_guard.installer.REGISTRY``'s trigger modules (a test checks it).
TRIGGERS = frozenset({"mlx_lm", "mlx_vlm", "langchain_community", "langchain_core"})

_started = False
_activated = False
_installed = False


def _enabled():
    import os

    return os.environ.get("METALGUARD_AUTOLOAD", "").strip().lower() in ("1", "true", "yes", "on")


def init():
    """Entry point of the .pth line / the .start entry point. Cheap when the variable is off."""
    global _started
    if _started or not _enabled():
        return
    _started = True
    try:
        _defer(_activate)
    except Exception as exc:  # never take the interpreter down
        _warn("could not schedule activation", exc)


def _site():
    import sys

    return sys.modules.get("site")


def _frame(depth):
    import sys

    return sys._getframe(depth + 1)


def _in_site_startup():
    """True while ``site`` is processing path configuration files (our .pth line)."""
    site_file = getattr(_site(), "__file__", None)
    frame = _frame(1)
    while frame is not None:
        code = frame.f_code
        if code.co_filename == site_file and code.co_name in (
                "addpackage", "addsitedir", "addsitepackages", "addusersitepackages"):
            return True
        frame = getattr(frame, "f_back", None)
    return False


def _defer(callback):
    """Run ``callback`` once site start-up is over (now, if it already is)."""
    site = _site()
    if site is None or not hasattr(site, "execsitecustomize") or not _in_site_startup():
        callback()
        return
    original_site = site.execsitecustomize
    original_user = getattr(site, "execusercustomize", None)

    def execsitecustomize():
        try:
            original_site()
        finally:
            site.execsitecustomize = original_site
            if original_user is None or not getattr(site, "ENABLE_USER_SITE", False):
                callback()

    def execusercustomize():
        try:
            if original_user is not None:
                original_user()
        finally:
            site.execusercustomize = original_user
            callback()

    site.execsitecustomize = execsitecustomize
    if original_user is not None:
        site.execusercustomize = execusercustomize


def _activate():
    global _activated
    if _activated:
        return
    _activated = True
    import sys

    if any(name in sys.modules for name in TRIGGERS):
        _install()
    else:
        sys.meta_path.insert(0, _Trigger())


class _Trigger:
    """Imports nothing; on the first import of a trigger package, installs metal-guard."""

    fired = False

    def find_spec(self, fullname, path=None, target=None):
        if self.fired or fullname not in TRIGGERS:
            return None
        # Stays in sys.meta_path, inert: removing a finder while the import system iterates
        # over the list would make it skip the next one.
        self.fired = True
        _install()
        return None

    def __repr__(self):
        return "<metal_guard autoload trigger>"


def _install():
    global _installed
    if _installed:
        return
    _installed = True
    try:
        from metal_guard.installer import autoload_install

        autoload_install()
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        _warn("activation failed; continuing unguarded", exc)


def _warn(what, exc):
    try:
        import sys

        sys.stderr.write(f"metal-guard autoload: {what}: {type(exc).__name__}: {exc}\n")
    except Exception:
        pass

"""metal-guard: a safety layer for MLX on Apple Silicon.

``import metal_guard`` is free: it imports neither ``mlx`` nor ``wrapt`` and does no I/O.
Public names are loaded from their submodules on first attribute access (PEP 562).

The public surface (``__all__``) is curated: every name the metal-guard 0.11 README documents,
the entry points of this version (``install``, the guards, isolation, memory and fit checks)
and the exception hierarchy. A few more 0.11 names still resolve here for old code (``compat``
below) but are not part of ``__all__``; new code imports them from their module. Everything
else lives in its own module (``metal_guard.classify``, ``metal_guard.status`` ...).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from metal_guard._version import __version__

if TYPE_CHECKING:  # pragma: no cover - what type checkers and editors see; mirrors _EXPORTS
    from metal_guard.adapter_registry import (
        AdapterInfo,
        register_adapter,
    )
    from metal_guard.adapters.langchain import (
        MetalGuardCallbackHandler,
    )
    from metal_guard.bench import (
        bench_scoped_load,
    )
    from metal_guard.breadcrumbs import (
        breadcrumb,
        breadcrumb_with_meta,
    )
    from metal_guard.breaker import (
        CircuitBreaker,
        ingest_panics_jsonl,
    )
    from metal_guard.cadence import (
        GEMMA4_MIN_CROSS_MODEL_INTERVAL_SEC,  # noqa: F401 - 0.11 compat
        CadenceGuard,
        require_cadence_clear,
    )
    from metal_guard.classify import (
        ErrorClass,  # noqa: F401 - 0.11 compat
        classify_mlx_error,  # noqa: F401 - 0.11 compat
        detect_panic_signature,
        is_kernel_panic_signature,  # noqa: F401 - 0.11 compat
        is_metal_oom,
        is_process_abort_signature,  # noqa: F401 - 0.11 compat
    )
    from metal_guard.cleanup import (
        kv_cache_clear_on_pressure,
    )
    from metal_guard.errors import (
        AdapterError,
        CadenceViolation,
        CrossModelCadenceViolation,
        GuardLayerError,
        KnownPanicModelError,
        LoadRefused,
        MetalGuardError,
        MetalOOMError,
        MLXCooldownActive,
        MLXLockConflict,
        ModelDoesNotFitError,
        PanicCooldownActive,
        SettingsError,
        StateFileError,
        SubprocessCrashError,
        SubprocessTimeoutError,
        WorkerError,
        WorkerFailure,
    )
    from metal_guard.forensics.feedback import (
        format_panic_for_apple_feedback,
    )
    from metal_guard.forensics.gate import (
        CooldownVerdict,
        ack_panic_lockout,
        clear_panic_ack,
        clear_panic_sentinel,
        evaluate_panic_cooldown,
        mark_panic_sentinel_cooldown,
        scan_recent_aborts,
        scan_recent_panics,
    )
    from metal_guard.forensics.orphans import (
        OrphanPre,
        scan_orphan_subproc_pre,
    )
    from metal_guard.forensics.postmortem import (
        run_postmortem,
    )
    from metal_guard.forensics.records import (
        AbortRecord,  # noqa: F401 - 0.11 compat
        PanicRecord,
    )
    from metal_guard.forensics.reports import (
        parse_panic_reports,
    )
    from metal_guard.guards import (
        guard_policy,
        guarded_generate,
        suppressed,
    )
    from metal_guard.hardware import (
        apple_gpu_family,
        audit_wired_limit,
        detect_hardware,
        log_system_audit_at_startup,
        read_gpu_driver_version,
        recommended_config,
    )
    from metal_guard.installer import (
        adapter_report,
        install,
        is_installed,
        uninstall,
    )
    from metal_guard.instance import (
        MetalGuard,
        metal_guard,
    )
    from metal_guard.isolation.context import (
        isolated_model,
    )
    from metal_guard.isolation.helpers import (
        gemma4_generation_flush,  # noqa: F401 - 0.11 compat
        subprocess_inference_guard,
    )
    from metal_guard.isolation.pool import (
        call_model_isolated,
        shutdown_all_workers,
    )
    from metal_guard.isolation.runner import (
        MLXSubprocessRunner,
    )
    from metal_guard.knowledge.advisories import (
        MLX_LM_VERSION_BLOCKLIST,  # noqa: F401 - 0.11 compat
        MLX_VERSION_BLOCKLIST,  # noqa: F401 - 0.11 compat
        check_mlx_lm_version_blocked,  # noqa: F401 - 0.11 compat
        check_mlx_version_blocked,  # noqa: F401 - 0.11 compat
        check_version_advisories,
    )
    from metal_guard.knowledge.patches import (
        install_upstream_defensive_patches,
        uninstall_upstream_defensive_patches,
    )
    from metal_guard.knowledge.registry import (
        KNOWN_PANIC_MODELS,
        WORKLOAD_ADVISORIES,  # noqa: F401 - 0.11 compat
        check_known_panic_model,
        check_known_panic_model_for_gpu,
        check_workload_advisory,  # noqa: F401 - 0.11 compat
        models_affecting_gpu_family,
        models_by_tier,
        warn_if_known_panic_model,
    )
    from metal_guard.lock import (
        acquire_mlx_lock,
        mlx_exclusive_lock,
        read_mlx_lock,
        release_mlx_lock,
    )
    from metal_guard.memory import (
        FitResult,
        MemoryStats,
        can_fit,
        check_fit,
        ensure_headroom,
        is_pressure_high,
        log_memory,
        memory_stats,
        require_fit,
    )
    from metal_guard.mode import (
        ProcessMode,
        apply_mode_defaults,
        current_mode,
        describe_mode,
        describe_process_mode,
        detect_process_mode,
        is_defensive,
        is_observer,
    )
    from metal_guard.oom import (
        oom_protected,
        oom_protected_context,
    )
    from metal_guard.prefill import (
        KNOWN_MODELS,
        KVGrowthTracker,
        ModelDims,
        describe_prefill_plan,
        estimate_prefill_peak_alloc_gb,
        kv_tracker,  # noqa: F401 - 0.11 compat
        lookup_dims,
        recommend_chunk_size,
        require_prefill_fit,
    )
    from metal_guard.resources import (
        ResourceTracker,
        global_resource_tracker,
    )
    from metal_guard.settings import (
        Settings,
        get_settings,
    )
    from metal_guard.status import (
        STATUS_SNAPSHOT_SCHEMA_VERSION,
        get_status_snapshot,
        write_status_snapshot,
    )


# name -> submodule that defines it: the single source of the names resolved below.
# tests/test_facade.py keeps it in sync with the TYPE_CHECKING imports above.
_EXPORTS: dict[str, str] = {}
# Names a metal-guard 0.11 program may use that are not part of the curated surface.
_COMPAT: set[str] = set()


def _export(module: str, *names: str, compat: bool = False) -> None:
    for name in names:
        _EXPORTS[name] = module
        if compat:
            _COMPAT.add(name)


_export(
    "metal_guard.errors", "AdapterError", "CadenceViolation", "CrossModelCadenceViolation",
    "GuardLayerError", "KnownPanicModelError", "LoadRefused", "MLXCooldownActive",
    "MLXLockConflict", "MetalGuardError", "MetalOOMError", "ModelDoesNotFitError",
    "PanicCooldownActive", "SettingsError", "StateFileError", "SubprocessCrashError",
    "SubprocessTimeoutError", "WorkerError", "WorkerFailure",
)
_export("metal_guard.settings", "Settings", "get_settings")
_export("metal_guard.installer", "install", "uninstall", "is_installed", "adapter_report")
_export("metal_guard.adapter_registry", "register_adapter", "AdapterInfo")
_export("metal_guard.guards", "guarded_generate", "guard_policy", "suppressed")
_export("metal_guard.isolation.context", "isolated_model")
_export("metal_guard.isolation.runner", "MLXSubprocessRunner")
_export("metal_guard.isolation.pool", "call_model_isolated", "shutdown_all_workers")
_export("metal_guard.isolation.helpers", "subprocess_inference_guard")
_export("metal_guard.isolation.helpers", "gemma4_generation_flush", compat=True)
_export("metal_guard.bench", "bench_scoped_load")
_export("metal_guard.adapters.langchain", "MetalGuardCallbackHandler")
_export("metal_guard.instance", "MetalGuard", "metal_guard")
_export(
    "metal_guard.memory", "MemoryStats", "FitResult", "memory_stats", "check_fit", "can_fit",
    "require_fit", "is_pressure_high", "ensure_headroom", "log_memory",
)
_export(
    "metal_guard.hardware", "detect_hardware", "recommended_config", "apple_gpu_family",
    "audit_wired_limit", "read_gpu_driver_version", "log_system_audit_at_startup",
)
_export("metal_guard.cleanup", "kv_cache_clear_on_pressure")
_export("metal_guard.oom", "oom_protected", "oom_protected_context")
_export("metal_guard.classify", "is_metal_oom", "detect_panic_signature")
_export(
    "metal_guard.classify", "ErrorClass", "classify_mlx_error", "is_kernel_panic_signature",
    "is_process_abort_signature", compat=True,
)
_export("metal_guard.breadcrumbs", "breadcrumb", "breadcrumb_with_meta")
_export(
    "metal_guard.mode", "current_mode", "is_defensive", "is_observer", "describe_mode",
    "ProcessMode", "detect_process_mode", "apply_mode_defaults", "describe_process_mode",
)
_export(
    "metal_guard.prefill", "ModelDims", "KNOWN_MODELS", "lookup_dims",
    "estimate_prefill_peak_alloc_gb", "require_prefill_fit", "recommend_chunk_size",
    "describe_prefill_plan", "KVGrowthTracker",
)
_export("metal_guard.prefill", "kv_tracker", compat=True)
_export("metal_guard.resources", "ResourceTracker", "global_resource_tracker")
_export(
    "metal_guard.lock", "acquire_mlx_lock", "release_mlx_lock", "read_mlx_lock",
    "mlx_exclusive_lock",
)
_export("metal_guard.cadence", "CadenceGuard", "require_cadence_clear")
_export("metal_guard.cadence", "GEMMA4_MIN_CROSS_MODEL_INTERVAL_SEC", compat=True)
_export("metal_guard.breaker", "CircuitBreaker", "ingest_panics_jsonl")
_export("metal_guard.forensics.records", "PanicRecord")
_export("metal_guard.forensics.records", "AbortRecord", compat=True)
_export("metal_guard.forensics.reports", "parse_panic_reports")
_export(
    "metal_guard.forensics.gate", "CooldownVerdict", "evaluate_panic_cooldown",
    "scan_recent_panics", "scan_recent_aborts", "mark_panic_sentinel_cooldown",
    "ack_panic_lockout", "clear_panic_ack", "clear_panic_sentinel",
)
_export("metal_guard.forensics.orphans", "OrphanPre", "scan_orphan_subproc_pre")
_export("metal_guard.forensics.postmortem", "run_postmortem")
_export("metal_guard.forensics.feedback", "format_panic_for_apple_feedback")
_export(
    "metal_guard.status", "STATUS_SNAPSHOT_SCHEMA_VERSION", "get_status_snapshot",
    "write_status_snapshot",
)
_export(
    "metal_guard.knowledge.registry", "KNOWN_PANIC_MODELS", "check_known_panic_model",
    "check_known_panic_model_for_gpu", "warn_if_known_panic_model", "models_by_tier",
    "models_affecting_gpu_family",
)
_export(
    "metal_guard.knowledge.registry", "WORKLOAD_ADVISORIES", "check_workload_advisory",
    compat=True,
)
_export("metal_guard.knowledge.advisories", "check_version_advisories")
_export(
    "metal_guard.knowledge.advisories", "MLX_VERSION_BLOCKLIST", "MLX_LM_VERSION_BLOCKLIST",
    "check_mlx_version_blocked", "check_mlx_lm_version_blocked", compat=True,
)
_export(
    "metal_guard.knowledge.patches", "install_upstream_defensive_patches",
    "uninstall_upstream_defensive_patches",
)

__all__ = [
    "__version__",
    "AdapterError",
    "AdapterInfo",
    "CadenceGuard",
    "CadenceViolation",
    "CircuitBreaker",
    "CooldownVerdict",
    "CrossModelCadenceViolation",
    "FitResult",
    "GuardLayerError",
    "KNOWN_MODELS",
    "KNOWN_PANIC_MODELS",
    "KVGrowthTracker",
    "KnownPanicModelError",
    "LoadRefused",
    "MLXCooldownActive",
    "MLXLockConflict",
    "MLXSubprocessRunner",
    "MemoryStats",
    "MetalGuard",
    "MetalGuardCallbackHandler",
    "MetalGuardError",
    "MetalOOMError",
    "ModelDims",
    "ModelDoesNotFitError",
    "OrphanPre",
    "PanicCooldownActive",
    "PanicRecord",
    "ProcessMode",
    "ResourceTracker",
    "STATUS_SNAPSHOT_SCHEMA_VERSION",
    "Settings",
    "SettingsError",
    "StateFileError",
    "SubprocessCrashError",
    "SubprocessTimeoutError",
    "WorkerError",
    "WorkerFailure",
    "ack_panic_lockout",
    "acquire_mlx_lock",
    "adapter_report",
    "apple_gpu_family",
    "apply_mode_defaults",
    "audit_wired_limit",
    "bench_scoped_load",
    "breadcrumb",
    "breadcrumb_with_meta",
    "call_model_isolated",
    "can_fit",
    "check_fit",
    "check_known_panic_model",
    "check_known_panic_model_for_gpu",
    "check_version_advisories",
    "clear_panic_ack",
    "clear_panic_sentinel",
    "current_mode",
    "describe_mode",
    "describe_prefill_plan",
    "describe_process_mode",
    "detect_hardware",
    "detect_panic_signature",
    "detect_process_mode",
    "ensure_headroom",
    "estimate_prefill_peak_alloc_gb",
    "evaluate_panic_cooldown",
    "format_panic_for_apple_feedback",
    "get_settings",
    "get_status_snapshot",
    "global_resource_tracker",
    "guard_policy",
    "guarded_generate",
    "ingest_panics_jsonl",
    "install",
    "install_upstream_defensive_patches",
    "is_defensive",
    "is_installed",
    "is_metal_oom",
    "is_observer",
    "is_pressure_high",
    "isolated_model",
    "kv_cache_clear_on_pressure",
    "log_memory",
    "log_system_audit_at_startup",
    "lookup_dims",
    "mark_panic_sentinel_cooldown",
    "memory_stats",
    "metal_guard",
    "mlx_exclusive_lock",
    "models_affecting_gpu_family",
    "models_by_tier",
    "oom_protected",
    "oom_protected_context",
    "parse_panic_reports",
    "read_gpu_driver_version",
    "read_mlx_lock",
    "recommend_chunk_size",
    "recommended_config",
    "register_adapter",
    "release_mlx_lock",
    "require_cadence_clear",
    "require_fit",
    "require_prefill_fit",
    "run_postmortem",
    "scan_orphan_subproc_pre",
    "scan_recent_aborts",
    "scan_recent_panics",
    "shutdown_all_workers",
    "subprocess_inference_guard",
    "suppressed",
    "uninstall",
    "uninstall_upstream_defensive_patches",
    "warn_if_known_panic_model",
    "write_status_snapshot",
]


if not TYPE_CHECKING:  # hidden from type checkers, so a misspelt name is an error there

    def __getattr__(name: str) -> Any:
        module = _EXPORTS.get(name)
        if module is None:
            raise AttributeError(f"module 'metal_guard' has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value  # cache: later lookups skip __getattr__
        return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

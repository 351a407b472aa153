"""metal-guard: a safety layer for MLX on Apple Silicon.

``import metal_guard`` is free: it imports neither ``mlx`` nor ``wrapt`` and does no I/O.
Public names are loaded from their submodules on first attribute access (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import Any

from metal_guard._version import __version__

# name -> submodule that defines it. The single source of the public API.
_EXPORTS: dict[str, str] = {}


def _export(module: str, *names: str) -> None:
    for name in names:
        _EXPORTS[name] = module


_export(
    "metal_guard.errors",
    "AdapterError",
    "CadenceViolation",
    "CrossModelCadenceViolation",
    "KnownPanicModelError",
    "MLXCooldownActive",
    "MLXLockConflict",
    "MetalGuardError",
    "MetalOOMError",
    "ModelDoesNotFitError",
    "PanicCooldownActive",
    "SettingsError",
    "StateFileError",
    "SubprocessCrashError",
    "SubprocessTimeoutError",
    "WorkerError",
)
_export("metal_guard.settings", "Settings", "get_settings")
_export(
    "metal_guard.classify",
    "ErrorClass",
    "classify_mlx_error",
    "detect_panic_signature",
    "is_kernel_panic_signature",
    "is_metal_oom",
    "is_process_abort_signature",
    "classify_crash",
    "get_error_class",
    "ERROR_CLASS_NAMES",
)
_export("metal_guard.breadcrumbs", "breadcrumb", "breadcrumb_with_meta")
_export("metal_guard.instance", "MetalGuard", "metal_guard")
_export(
    "metal_guard.memory",
    "MemoryStats",
    "FitResult",
    "memory_stats",
    "check_fit",
    "can_fit",
    "require_fit",
    "is_pressure_high",
    "ensure_headroom",
    "log_memory",
)
_export(
    "metal_guard.hardware",
    "detect_hardware",
    "recommended_config",
    "apple_gpu_family",
    "audit_wired_limit",
    "read_gpu_driver_version",
    "log_system_audit_at_startup",
    "process_footprint_bytes",
    "system_memory",
)
_export("metal_guard.cleanup", "kv_cache_clear_on_pressure")
_export("metal_guard.oom", "oom_protected", "oom_protected_context")
_export(
    "metal_guard.mode",
    "current_mode",
    "is_defensive",
    "is_observer",
    "describe_mode",
    "detect_process_mode",
    "apply_mode_defaults",
    "describe_process_mode",
)
_export(
    "metal_guard.prefill",
    "ModelDims",
    "KNOWN_MODELS",
    "lookup_dims",
    "estimate_prefill_peak_alloc_gb",
    "require_prefill_fit",
    "recommend_chunk_size",
    "describe_prefill_plan",
    "KVGrowthTracker",
    "kv_tracker",
)
_export("metal_guard.resources", "ResourceTracker", "global_resource_tracker")
_export("metal_guard.bench", "bench_scoped_load")
_export("metal_guard.installer", "install", "uninstall", "is_installed", "adapter_report",
        "register_adapter", "AdapterInfo")
_export("metal_guard.guards", "guarded_generate", "guard_policy", "suppressed")
_export("metal_guard.isolation.runner", "MLXSubprocessRunner")
_export("metal_guard.isolation.pool", "call_model_isolated", "shutdown_all_workers")
_export("metal_guard.isolation.context", "isolated_model", "current_isolated_model")
_export("metal_guard.isolation.helpers", "subprocess_inference_guard", "gemma4_generation_flush")
_export("metal_guard.demo", "run_demo", "DemoResult")
_export("metal_guard.adapters.langchain", "MetalGuardCallbackHandler")
_export("metal_guard.lock", "acquire_mlx_lock", "release_mlx_lock", "read_mlx_lock", "mlx_exclusive_lock")
_export(
    "metal_guard.cadence",
    "CadenceGuard",
    "require_cadence_clear",
    "is_gemma4_family",
    "GEMMA4_MIN_CROSS_MODEL_INTERVAL_SEC",
)
_export("metal_guard.breaker", "CircuitBreaker", "ingest_panics_jsonl")
_export("metal_guard.forensics.records", "PanicRecord", "AbortRecord")
_export("metal_guard.forensics.reports", "parse_panic_reports", "scan_reports")
_export(
    "metal_guard.forensics.gate",
    "CooldownVerdict",
    "evaluate_panic_cooldown",
    "scan_recent_panics",
    "scan_recent_aborts",
    "mark_panic_sentinel_cooldown",
    "ack_panic_lockout",
    "clear_panic_ack",
    "clear_panic_sentinel",
)
_export("metal_guard.forensics.orphans", "OrphanPre", "scan_orphan_subproc_pre", "kill_orphans")
_export("metal_guard.forensics.postmortem", "run_postmortem")
_export("metal_guard.forensics.feedback", "format_panic_for_apple_feedback")
_export(
    "metal_guard.status",
    "STATUS_SNAPSHOT_SCHEMA_VERSION",
    "get_status_snapshot",
    "write_status_snapshot",
    "publish_memory",
    "read_published_memory",
    "clear_published_memory",
)
_export(
    "metal_guard.knowledge.registry",
    "KNOWN_PANIC_MODELS",
    "WORKLOAD_ADVISORIES",
    "check_known_panic_model",
    "check_known_panic_model_for_gpu",
    "warn_if_known_panic_model",
    "models_by_tier",
    "models_affecting_gpu_family",
    "check_workload_advisory",
    "enforce_known_panic_policy",
)
_export(
    "metal_guard.knowledge.advisories",
    "check_version_advisories",
    "MLX_VERSION_BLOCKLIST",
    "MLX_LM_VERSION_BLOCKLIST",
    "check_mlx_version_blocked",
    "check_mlx_lm_version_blocked",
)
_export(
    "metal_guard.knowledge.patches",
    "install_upstream_defensive_patches",
    "uninstall_upstream_defensive_patches",
)

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'metal_guard' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


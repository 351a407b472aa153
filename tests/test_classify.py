"""Tests for the one error/panic classifier (metal_guard/classify.py + data/error_classes.json).

Metal-only strings cannot be produced on this Linux box, so they are the verbatim texts from
MLX source and public reports (shared/reference/mlx.md §2.2-2.5 and §7). Everything that can
be real is real: MLX's own CPU-build errors, real subprocesses dying of real signals.
"""

from __future__ import annotations

import copy
import json
import logging
import signal
import subprocess
import sys
from importlib import resources
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metal_guard import classify, classify_table
from metal_guard.classify import (
    ERROR_CLASS_NAMES,
    ErrorClass,
    classify_crash,
    classify_mlx_error,
    detect_panic_signature,
    error_classes,
    get_error_class,
    is_kernel_panic_signature,
    is_metal_oom,
    is_process_abort_signature,
    match_error_classes,
)
from metal_guard.classify_table import (
    KINDS,
    RECOVERY_HINTS,
    SEVERITIES,
    ErrorTableError,
    validate_error_table,
)
from metal_guard.errors import MetalOOMError, SubprocessCrashError

CMD = "[METAL] Command buffer execution failed: "


def both_forms(body: str) -> list[str]:
    """mlx <= 0.31 (no trailing period) and >= 0.32 (trailing period) forms."""
    return [CMD + body, CMD + body + "."]


# (text, expected class name). Verbatim strings from mlx.md §2.2-2.4 and §7.
POSITIVES: list[tuple[str, str]] = [
    # --- kernel panics (mlx.md §7.1, §6)
    (
        'panic(cpu 8 caller 0xfffffe00513bbe28): "completeMemory() prepare count underflow" '
        "@IOGPUMemory.cpp:550",
        "iogpu_prepare_count_underflow",
    ),
    (
        'panic(cpu 7 caller 0xfffffe004418be28): "completeMemory() prepare count underflow" '
        "@IOGPUMemory.cpp:550\nDebugger message: panic\nMemory ID: 0x6",
        "iogpu_prepare_count_underflow",
    ),
    (
        '"completeMemory() prepare count underflow" @IOGPUMemory.cpp:492',
        "iogpu_prepare_count_underflow",
    ),
    # the mlx-lm#883 snapshot truncates the file name
    (
        'panic(cpu 18 caller 0xfffffe00428d679c): "completeMemory() prepare count underflow" '
        "@IOGPUMe",
        "iogpu_prepare_count_underflow",
    ),
    (
        '"Memory object unexpectedly not found in fPendingMemorySet" @IOGPUGroupMemory.cpp:219',
        "iogpu_pending_memory_set",
    ),
    (
        '"IOGPUGroupMemory::remove_memory_object() memory object not found" '
        "@IOGPUGroupMemory.cpp:323",
        "iogpu_remove_memory_object",
    ),
    (
        '"pending memory object unexpectedly found in non pending hash" @ IOGPUGroupMemory.cpp:528',
        "iogpu_non_pending_hash",
    ),
    (
        'panic(cpu 1 caller 0xfffffe0011112222): "a future assertion" @IOGPUMemory.cpp:612',
        "iogpu_kernel_panic",
    ),
    # --- command-buffer errors (§2.2-2.4), both version forms
    *(
        (t, "cmd_buffer_oom")
        for t in both_forms(
            "Insufficient Memory (00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)"
        )
    ),
    (
        "libc++abi: terminating due to uncaught exception of type std::runtime_error: "
        + CMD
        + "Insufficient Memory (00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)",
        "cmd_buffer_oom",
    ),
    (
        "Execution of the command buffer was aborted due to an error during execution. "
        "Insufficient Memory (00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)",
        "cmd_buffer_oom",
    ),
    *(
        (t, "gpu_timeout")
        for t in both_forms(
            "Caused GPU Timeout Error (00000002:kIOGPUCommandBufferCallbackErrorTimeout)"
        )
    ),
    *(
        (t, "gpu_hang")
        for t in both_forms("Caused GPU Hang Error (00000003:kIOGPUCommandBufferCallbackErrorHang)")
    ),
    *(
        (t, "gpu_submissions_ignored")
        for t in both_forms(
            "Ignored (for causing prior/excessive GPU errors) "
            "(00000004:kIOGPUCommandBufferCallbackErrorSubmissionsIgnored)"
        )
    ),
    *(
        (t, "gpu_innocent_victim")
        for t in both_forms(
            "Discarded (victim of GPU error/recovery) "
            "(00000005:kIOGPUCommandBufferCallbackErrorInnocentVictim)"
        )
    ),
    *(
        (t, "gpu_page_fault")
        for t in both_forms(
            "Caused GPU Address Fault Error (0000000b:kIOGPUCommandBufferCallbackErrorPageFault)"
        )
    ),
    *(
        (t, "gpu_watchdog")
        for t in both_forms(
            "Impacting Interactivity (0000000e:kIOGPUCommandBufferCallbackErrorImpactingInteractivity)"
        )
    ),
    *((t, "gpu_watchdog") for t in both_forms("Internal Error (0000000e:Internal Error)")),
    # omlx#1387: stderr wrapped over lines, with a space after the colon
    (
        "libc++abi: terminating due to uncaught exception of type std::runtime_error:\n"
        "[METAL] Command buffer execution failed: Impacting Interactivity\n"
        "(0000000e: kIOGPUCommandBufferCallbackErrorImpactingInteractivity)",
        "gpu_watchdog",
    ),
    (
        "Execution of the command buffer was aborted due to an error during execution. "
        "Caused GPU Timeout Error (IOAF code 2)",
        "gpu_timeout",
    ),
    *((t, "metal_command_buffer_failed") for t in both_forms("Some Future Reason (00000063:x)")),
    # --- allocator (§2.2): 0.32 strings end with a period, older/quoted ones may not
    ("[metal::malloc] Resource limit (499000) exceeded.", "metal_descriptor_leak"),
    ("RuntimeError: [metal::malloc] Resource limit (499000) exceeded", "metal_descriptor_leak"),
    (
        "[metal::malloc] Attempting to allocate 137438953472 bytes which is greater than the "
        "maximum allowed buffer size of 77309411328 bytes.",
        "metal_buffer_too_large",
    ),
    (
        "Attempting to allocate 137438953472 bytes which is greater than the maximum allowed "
        "buffer size of 77309411328 bytes",
        "metal_buffer_too_large",
    ),  # v0.20, no prefix
    ("[malloc] Unable to allocate 68719476736 bytes.", "metal_alloc_failed"),
    ("[malloc] Unable to allocate 68719476736 bytes", "metal_alloc_failed"),
    ("[malloc_or_wait] Unable to allocate 68719476736 bytes.", "metal_alloc_failed"),
    ("[malloc_async] Unable to allocate 1024 bytes.", "metal_alloc_failed"),
    ("cudaMallocAsync(&data, size, stream) failed: out of memory", "metal_alloc_failed"),
    ("cudaMalloc(&data, size) failed: out of memory", "metal_alloc_failed"),
    ("cudaMallocManaged(&data, size) failed: out of memory", "metal_alloc_failed"),
    # --- process aborts (§2.3, §7.2)
    (
        "libc++abi: terminating due to uncaught exception of type std::runtime_error: "
        + CMD
        + "Something the table has never seen",
        "metal_completion_sigabrt",
    ),
    (
        "Thread 35 Crashed::  Dispatch queue: com.Metal.CompletionQueueDispatch\n"
        "0   libsystem_kernel.dylib        \t       0x19040a5e8 __pthread_kill + 8",
        "metal_completion_sigabrt",
    ),
    (
        "9   libmlx.dylib                  \t       0x11cde6280 "
        "mlx::core::gpu::check_error(MTL::CommandBuffer*) + 244",
        "metal_completion_sigabrt",
    ),
    (
        '"legacyInfo" : {"threadTriggered":{"queue":"com.Metal.CompletionQueueDispatch"}}',
        "metal_completion_sigabrt",
    ),
    (
        '"threads" : [{"triggered":true,"id":4711,"queue":"com.Metal.CompletionQueueDispatch",'
        '"frames":[{"imageOffset":1,"symbol":"__pthread_kill","symbolLocation":8,"imageIndex":2}]}]',
        "metal_completion_sigabrt",
    ),
    ("-[AGXG16XFamilyResidencySet _commitAddedAllocations:] + 412", "metal_residency_abort"),
    (
        "libc++abi: terminating due to uncaught exception of type std::runtime_error: "
        "[Event::Event] Failed to create Metal shared event.",
        "process_abort",
    ),
    (
        "terminate called after throwing an instance of 'std::runtime_error'\n"
        "  what():  [malloc] something",
        "process_abort",
    ),
    ("Fatal Python error: Aborted", "process_abort"),
    ("Fatal Python error: Segmentation fault", "worker_segfault"),
    ("Exception Type:  EXC_BAD_ACCESS (SIGSEGV)", "worker_segfault"),
    ("zsh: Killed: 9  python serve.py", "worker_killed"),
]

# Messages that merely mention MLX are not GPU failures (§1.4, §2.2).
NEGATIVES = [
    "There is no Stream(gpu, 0) in current thread.",
    "RuntimeError: There is no Stream(cpu, 0) in current thread.",
    "[broadcast_shapes] Shapes (2,3) and (4,5) cannot be broadcast.",
    "[metal::set_wired_limit] Setting a wired limit larger than the maximum working set size "
    "is not allowed.",
    "[set_default_device] Cannot set gpu device without gpu backend.",
    "[new_stream] Cannot make gpu stream without gpu backend.",
    "Integer value 4611686018427387904 is outside the supported range.",
    "mlx_lm.server generation thread died: KeyError('model')",
    # unrelated kernel panics (§7.1) classify as "other", i.e. None
    "panic(cpu 0 caller 0xfffffe0012345678): watchdog timeout: no checkins from watchdogd in "
    "92 seconds",
    "panic(cpu 4 caller 0xfffffe0012345678): cpt_mapcnt_inc: refcnt overflow: rc 0x1 "
    "old_value 2048 value 2049",
    "panic(cpu 2 caller 0xfffffe0012345678): SOCD report detected: (iBoot async abort)",
    'panic(cpu 6 caller 0xfffffe0012345678): "AMCC0 DCS GROUP 0 CHANNEL 0 ..." '
    "@AppleH15PlatformErrorHandler.cpp:3330",
    "",
    "MetalGuard says: all good",
]


@pytest.mark.parametrize(("text", "expected"), POSITIVES)
def test_real_strings_classify(text: str, expected: str) -> None:
    found = classify_mlx_error(text)
    assert found is not None and found.name == expected
    # the same as bytes, lowercased (patterns are case-insensitive) and inside noise
    assert classify_mlx_error(text.encode()) == found
    assert classify_mlx_error(text.lower()) == found
    assert classify_mlx_error(f"Traceback ...\nRuntimeError: {text}\n  during generate") == found


@pytest.mark.parametrize("text", NEGATIVES)
def test_non_gpu_messages_are_none(text: str) -> None:
    assert classify_mlx_error(text) is None
    assert classify_mlx_error(RuntimeError(text)) is None
    assert not is_metal_oom(text)
    assert not is_kernel_panic_signature(text)
    assert not is_process_abort_signature(text)
    assert detect_panic_signature(text) == (None, None)


def test_every_row_is_covered_by_a_real_string() -> None:
    covered = {name for _, name in POSITIVES} | {"worker_exit", "worker_terminated"}  # exit status only
    assert covered == ERROR_CLASS_NAMES


def test_real_mlx_errors_are_not_gpu_failures() -> None:
    mx = pytest.importorskip("mlx.core")
    raised: list[BaseException] = []
    for action in (
        lambda: mx.array([[1, 2, 3], [4, 5, 6]]) + mx.zeros((4, 5)),
        lambda: mx.set_default_device(mx.gpu),
        lambda: mx.new_stream(mx.gpu),
    ):
        with pytest.raises(ValueError) as info:
            action()
        raised.append(info.value)
    assert "[broadcast_shapes]" in str(raised[0])
    for exc in raised:
        assert classify_mlx_error(exc) is None
        assert not is_metal_oom(exc)


def test_real_panic_report_body() -> None:
    header = (
        '{"bug_type":"210","timestamp":"2026-04-03 23:51:19.00 -0700",'
        '"os_version":"macOS 26.4 (25E246)","incident_id":"66B11180-ED92-4FE0-9244-F3C9ACFBA8A6"}'
    )
    panic_string = (
        'panic(cpu 7 caller 0xfffffe004418be28): "completeMemory() prepare count underflow" '
        "@IOGPUMemory.cpp:550\nDebugger message: panic\nOS version: 25E246\n"
        "Panicked task 0xfffffe1e4174a418: 367197 pages, 25 threads: pid 50218: Python\n"
        "  Kernel Extensions in backtrace:\n"
        "    com.apple.iokit.IOGPUFamily(130.13)[1CC2AF3D-E6EF-3DC2-B32B-8DBD8CAA09B7]"
    )
    report = (
        header + "\n" + json.dumps({"build": "macOS 26.4", "panicString": panic_string}, indent=2)
    )
    assert classify_mlx_error(report).name == "iogpu_prepare_count_underflow"  # type: ignore[union-attr]
    assert is_kernel_panic_signature(report)
    assert not is_process_abort_signature(report)
    name, explanation = detect_panic_signature(report)
    assert name == "prepare_count_underflow" and "IOGPUMemory.cpp" in (explanation or "")


def test_real_ips_abort_report() -> None:
    body = {
        "exception": {"codes": "0x0, 0x0", "type": "EXC_CRASH", "signal": "SIGABRT"},
        "termination": {"flags": 0, "code": 6, "namespace": "SIGNAL", "indicator": "Abort trap: 6"},
        "asi": {"libsystem_c.dylib": ["abort() called"]},
        "threads": [
            {"id": 1, "frames": []},
            {
                "triggered": True,
                "id": 2,
                "queue": "com.Metal.CompletionQueueDispatch",
                "frames": [{"imageOffset": 1, "symbol": "__pthread_kill", "imageIndex": 3}],
            },
        ],
    }
    ips = '{"app_name":"python3.11","bug_type":"309"}\n' + json.dumps(body, indent=2)
    assert classify_mlx_error(ips).name == "metal_completion_sigabrt"  # type: ignore[union-attr]
    assert is_process_abort_signature(ips)
    assert not is_kernel_panic_signature(ips)
    # an ordinary SIGABRT crash of some other thread is not claimed as a Metal abort
    body["threads"] = [{"triggered": True, "id": 2, "queue": "com.apple.main-thread"}]
    assert classify_mlx_error(json.dumps(body)) is None
    assert not is_process_abort_signature(json.dumps(body))


# ----------------------------------------------------------------------------- priorities


def test_kernel_panic_wins_over_everything() -> None:
    text = (
        "[metal::malloc] Resource limit (499000) exceeded.\n"
        + CMD
        + "Insufficient Memory (00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)\n"
        '"Memory object unexpectedly not found in fPendingMemorySet" @IOGPUGroupMemory.cpp:219'
    )
    assert classify_mlx_error(text).name == "iogpu_pending_memory_set"  # type: ignore[union-attr]
    names = [c.name for c in match_error_classes(text)]
    assert names[0] == "iogpu_pending_memory_set" and "cmd_buffer_oom" in names
    assert names[-1] == "metal_command_buffer_failed"
    assert not is_metal_oom(text)


def test_table_order_kernel_panics_first_generic_command_buffer_after_specific() -> None:
    rows = error_classes()
    kinds = [r.kind for r in rows]
    n_panics = kinds.count("kernel_panic")
    assert kinds[:n_panics] == ["kernel_panic"] * n_panics
    generic = [r.name for r in rows].index("metal_command_buffer_failed")
    for row in rows:
        if row.kind in ("gpu_error", "oom") and row.name != "metal_command_buffer_failed":
            assert [r.name for r in rows].index(row.name) < generic, row.name


def test_guilty_context_wins_over_collateral() -> None:
    log_text = (
        "Execution of the command buffer was aborted due to an error during execution. "
        "Caused GPU Timeout Error (IOAF code 2)\n"
        "Execution of the command buffer was aborted due to an error during execution. "
        "Discarded (victim of GPU error/recovery) (IOAF code 5)"
    )
    assert classify_mlx_error(log_text).name == "gpu_timeout"  # type: ignore[union-attr]


# ----------------------------------------------------------------------------- predicates


@pytest.mark.parametrize(
    ("text", "oom"),
    [
        (CMD + "Insufficient Memory (00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory).", True),
        ("[malloc] Unable to allocate 1024 bytes.", True),
        ("cudaMalloc(&data, size) failed: out of memory", True),
        (
            "[metal::malloc] Attempting to allocate 9 bytes which is greater than the maximum "
            "allowed buffer size of 8 bytes.",
            True,
        ),
        # the reference got these wrong (anchor.md §3.1): not retryable OOMs
        (
            '"Memory object unexpectedly not found in fPendingMemorySet" @IOGPUGroupMemory.cpp:219',
            False,
        ),
        (
            CMD
            + "Impacting Interactivity (0000000e:kIOGPUCommandBufferCallbackErrorImpactingInteractivity)",
            False,
        ),
        ("[metal::malloc] Resource limit (499000) exceeded.", False),
        (CMD + "Caused GPU Hang Error (00000003:kIOGPUCommandBufferCallbackErrorHang).", False),
    ],
)
def test_is_metal_oom(text: str, oom: bool) -> None:
    assert is_metal_oom(text) is oom
    assert is_metal_oom(RuntimeError(text)) is oom


def test_process_abort_signature_means_the_process_died() -> None:
    oom = "Insufficient Memory (00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)"
    aborted = (
        "libc++abi: terminating due to uncaught exception of type std::runtime_error: " + CMD + oom
    )
    assert is_process_abort_signature(aborted)  # mlx <= 0.31: the OOM killed the process
    assert classify_mlx_error(aborted).name == "cmd_buffer_oom"  # type: ignore[union-attr]
    assert not is_process_abort_signature(CMD + oom + ".")  # mlx >= 0.32: a catchable error
    assert is_process_abort_signature("Fatal Python error: Segmentation fault")


def test_detect_panic_signature_seed_names() -> None:
    cases = {
        '"completeMemory() prepare count underflow" @IOGPUMemory.cpp:492': "prepare_count_underflow",
        "fPendingMemorySet": "pending_memory_set",
        CMD
        + "Insufficient Memory (00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)": "metal_oom",
        "kIOGPUCommandBufferCallbackErrorImpactingInteractivity": "ctxstore_timeout",
        '"IOGPUGroupMemory::remove_memory_object() memory object not found" '
        "@IOGPUGroupMemory.cpp:323": "remove_memory_object",
    }
    for text, name in cases.items():
        sig, explanation = detect_panic_signature(text)
        assert sig == name and explanation
    # rows without a signature (e.g. a bare segfault) give nothing
    assert detect_panic_signature("Fatal Python error: Segmentation fault") == (None, None)


# ----------------------------------------------------------------------------- exceptions


def test_exception_cause_chain() -> None:
    oom = CMD + "Insufficient Memory (00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)."
    try:
        try:
            raise RuntimeError(oom)
        except RuntimeError as inner:
            raise ValueError("generation failed") from inner
    except ValueError as outer:
        assert outer.__cause__ is not None
        assert classify_mlx_error(outer).name == "cmd_buffer_oom"  # type: ignore[union-attr]
        assert is_metal_oom(outer)


def test_exception_implicit_context_and_first_matching_link_wins() -> None:
    try:
        try:
            raise RuntimeError("[metal::malloc] Resource limit (499000) exceeded.")
        except RuntimeError:
            raise KeyError("while cleaning up")
    except KeyError as exc:
        assert exc.__context__ is not None and exc.__cause__ is None
        assert classify_mlx_error(exc).name == "metal_descriptor_leak"  # type: ignore[union-attr]
    outer = RuntimeError("[malloc] Unable to allocate 10 bytes.")
    outer.__cause__ = RuntimeError(CMD + "Caused GPU Hang Error (00000003:x)")
    assert classify_mlx_error(outer).name == "metal_alloc_failed"  # type: ignore[union-attr]


def test_exception_cycles_terminate() -> None:
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__cause__, b.__cause__ = b, a
    a.__context__ = a
    assert classify_mlx_error(a) is None
    b.add_note("[malloc] Unable to allocate 4096 bytes.")
    assert classify_mlx_error(a).name == "metal_alloc_failed"  # type: ignore[union-attr]
    assert len(match_error_classes(a)) == 1


def test_exception_group_members_are_visited() -> None:
    group = ExceptionGroup("workers", [ValueError("x"), RuntimeError("Caused GPU Hang Error")])
    assert classify_mlx_error(group).name == "gpu_hang"  # type: ignore[union-attr]


def test_error_class_attribute_is_trusted() -> None:
    cls = get_error_class("gpu_watchdog")
    assert classify_mlx_error(MetalOOMError("opaque", error_class=cls)) is cls
    crash = SubprocessCrashError("m", -9, "")
    wrapped = RuntimeError("isolated call failed")
    wrapped.__cause__ = crash
    assert classify_mlx_error(wrapped) is get_error_class("worker_killed")


class _Hostile(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str for you")

    def __repr__(self) -> str:
        raise RuntimeError("no repr either")

    @property
    def error_class(self) -> Any:
        raise RuntimeError("nor an attribute")


def test_hostile_exceptions_never_raise() -> None:
    assert classify_mlx_error(_Hostile()) is None
    assert match_error_classes(_Hostile()) == ()
    assert not is_metal_oom(_Hostile())
    hostile = _Hostile()
    hostile.__cause__ = RuntimeError("[malloc] Unable to allocate 1 bytes.")
    assert classify_mlx_error(hostile).name == "metal_alloc_failed"  # type: ignore[union-attr]
    assert classify_crash(-6, _Hostile()) is get_error_class("process_abort")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "junk",
    [
        None,
        42,
        3.5,
        object(),
        [1, 2],
        {"a": 1},
        b"\xff\xfe\x00",
        bytearray(b"[malloc] Unable to allocate 1 bytes"),
        memoryview(b"x"),
    ],
)
def test_junk_inputs(junk: object) -> None:
    found = classify_mlx_error(junk)
    assert found is None or found.name == "metal_alloc_failed"
    detect_panic_signature(junk)
    is_process_abort_signature(junk)


# ----------------------------------------------------------------------------- crashes


def _die(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_classify_crash_from_real_signals() -> None:
    aborted = _die("import os; os.abort()")
    assert aborted.returncode == -signal.SIGABRT
    assert "Fatal Python error: Aborted" in aborted.stderr
    assert classify_crash(aborted.returncode, aborted.stderr).name == "process_abort"  # type: ignore[union-attr]

    segv = _die("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    assert segv.returncode == -signal.SIGSEGV
    assert classify_crash(segv.returncode, segv.stderr).name == "worker_segfault"  # type: ignore[union-attr]
    assert classify_crash(segv.returncode, "").name == "worker_segfault"  # type: ignore[union-attr]

    killed = _die("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert killed.returncode == -signal.SIGKILL and killed.stderr == ""
    found = classify_crash(killed.returncode, killed.stderr)
    assert found is not None and found.name == "worker_killed"
    assert found.recovery_hint == "reduce_and_retry"

    failed = _die("raise SystemExit(3)")
    assert classify_crash(failed.returncode, failed.stderr).name == "worker_exit"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("exitcode", "expected"),
    [
        (-signal.SIGABRT, "process_abort"),
        (-signal.SIGSEGV, "worker_segfault"),
        (-signal.SIGBUS, "worker_segfault"),
        (-signal.SIGILL, "worker_segfault"),
        (-signal.SIGKILL, "worker_killed"),
        (-signal.SIGTERM, "worker_terminated"),
        (128 + signal.SIGABRT, "process_abort"),  # shell form, e.g. 134
        (128 + signal.SIGKILL, "worker_killed"),  # 137
        (1, "worker_exit"),
        (-99, "worker_exit"),
        (0, None),
        (None, None),
    ],
)
def test_classify_crash_exit_status(exitcode: int | None, expected: str | None) -> None:
    found = classify_crash(exitcode, "")
    assert (found.name if found else None) == expected


def test_classify_crash_text_wins_over_signal() -> None:
    detail = (
        "libc++abi: terminating due to uncaught exception of type std::runtime_error: "
        + CMD
        + "Insufficient Memory (00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)"
    )
    assert classify_crash(-signal.SIGABRT, detail).name == "cmd_buffer_oom"  # type: ignore[union-attr]
    assert classify_crash(0, "[malloc] Unable to allocate 1 bytes.").name == "metal_alloc_failed"  # type: ignore[union-attr]


def test_subprocess_crash_error_uses_classifier() -> None:
    err = SubprocessCrashError("mlx-community/x", -signal.SIGABRT, "")
    assert (
        err.error_class is get_error_class("process_abort") and err.recovery_hint == "respawn_now"
    )
    err = SubprocessCrashError(
        "m", 1, '"completeMemory() prepare count underflow" @IOGPUMemory.cpp:550'
    )
    assert err.recovery_hint == "wait_lockout"
    assert SubprocessCrashError("m", 0, "").recovery_hint == "unknown"


# ----------------------------------------------------------------------------- size cap


def test_scan_cap_head_and_tail() -> None:
    filler = "x" * (3 * classify.SCAN_HEAD_CHARS)
    oom = "[malloc] Unable to allocate 1 bytes."
    assert classify_mlx_error(oom + filler).name == "metal_alloc_failed"  # type: ignore[union-attr]
    assert classify_mlx_error(filler + oom).name == "metal_alloc_failed"  # type: ignore[union-attr]
    assert classify_mlx_error((filler + oom).encode()).name == "metal_alloc_failed"  # type: ignore[union-attr]
    middle = filler[: len(filler) // 2] + oom + filler[len(filler) // 2 :]
    assert classify_mlx_error(middle) is None  # documented: the middle is not scanned
    # the cut never glues head and tail into a match
    half = oom[: len(oom) // 2]
    assert classify_mlx_error(filler[:-10] + half + "y" * classify.SCAN_TAIL_CHARS) is None


# ----------------------------------------------------------------------------- data file


def _packaged() -> dict[str, Any]:
    text = resources.files("metal_guard").joinpath("data/error_classes.json").read_text("utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


def test_packaged_table_is_valid_against_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    data = _packaged()
    jsonschema.Draft202012Validator.check_schema(classify_table.SCHEMA)
    jsonschema.validate(data, classify_table.SCHEMA)
    rows = validate_error_table(data)
    assert rows == error_classes()
    assert frozenset(r.name for r in rows) == ERROR_CLASS_NAMES
    for row in rows:
        assert row.kind in KINDS and row.severity in SEVERITIES
        assert row.recovery_hint in RECOVERY_HINTS


def _broken(mutate: Any) -> dict[str, Any]:
    data = copy.deepcopy(_packaged())
    mutate(data)
    return data


def _set(path: str, value: Any) -> Any:
    def mutate(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = data
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        node[int(last) if last.isdigit() else last] = value

    return mutate


@pytest.mark.parametrize(
    ("mutate", "message", "schema_catches"),
    [
        (_set("schema_version", 2), "schema_version", True),
        (_set("classes", []), "at least 1", True),
        (
            _set("classes.0.severity", "catastrophic"),
            "classes[0] ('iogpu_prepare_count_underflow').severity",
            True,
        ),
        (_set("classes.5.recovery_hint", "pray"), "recovery_hint", True),
        (_set("classes.5.kind", "meh"), "kind", True),
        (_set("classes.3.name", "Bad Name"), "snake_case|does not match", True),
        (_set("classes.3.patterns", "not-a-list"), "expected an array", True),
        (_set("classes.3.upstream_refs", ["mlx 3186"]), "upstream_refs[0]", True),
        (_set("classes.3.typo_field", 1), "unknown key(s) ['typo_field']", True),
        (lambda d: d["classes"][2].pop("description"), "missing key(s) ['description']", True),
        (_set("classes.6.patterns", ["(unclosed"]), "invalid regular expression", False),
        (_set("classes.6.name", "iogpu_pending_memory_set"), "duplicate name", False),
        (_set("classes.7.signals", ["SIGABRT"]), "duplicate signal SIGABRT", False),
        (
            lambda d: d["classes"].insert(0, d["classes"].pop(5)),
            "kernel_panic rows must come",
            False,
        ),
        (lambda d: d["classes"].pop(), "required class 'worker_exit'", False),
        (lambda d: d["classes"].insert(5, d["classes"].pop(
            [c["name"] for c in d["classes"]].index("metal_command_buffer_failed"))),
         "classifies as", False),
        (_set("classes.6.examples", ["nothing to see"]), "classifies as None", False),
    ],
)
def test_broken_table_is_rejected_clearly(mutate: Any, message: str, schema_catches: bool) -> None:
    data = _broken(mutate)
    with pytest.raises(ErrorTableError) as info:
        validate_error_table(data)
    text = str(info.value)
    assert text.startswith("error_classes.json: ")
    assert any(part in text for part in message.split("|")), text
    jsonschema = pytest.importorskip("jsonschema")
    if schema_catches:  # the schema and the validator agree on shape errors
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(data, classify_table.SCHEMA)


def test_non_object_table_rejected() -> None:
    junks: tuple[object, ...] = (None, [], "x", 1)
    for junk in junks:
        with pytest.raises(ErrorTableError, match="top level"):
            validate_error_table(junk)


def test_broken_packaged_file_disables_classifier_without_raising(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(classify, "DATA_PATH", ("data", "no-such-file.json"))
    monkeypatch.setattr(classify, "_cache", None)
    monkeypatch.setattr(classify, "_reported", False)
    with caplog.at_level(logging.ERROR, logger="metal_guard.classify"):
        assert classify_mlx_error("[malloc] Unable to allocate 1 bytes.") is None
        assert classify_crash(-6, "") is None
        assert classify_mlx_error("again") is None
    assert len([r for r in caplog.records if "classifier disabled" in r.message]) == 1
    with pytest.raises(ErrorTableError, match="cannot be read"):
        get_error_class("cmd_buffer_oom")


def test_get_error_class_and_names() -> None:
    assert isinstance(ERROR_CLASS_NAMES, frozenset)
    assert classify.ERROR_CLASS_NAMES == ERROR_CLASS_NAMES
    assert get_error_class("cmd_buffer_oom").kind == "oom"
    with pytest.raises(KeyError, match="unknown error class 'nope'"):
        get_error_class("nope")
    cls = get_error_class("gpu_page_fault")
    assert isinstance(cls, ErrorClass) and cls.upstream_refs == ("Blaizzy/mlx-vlm#1064",)
    assert cls.severity_rank == SEVERITIES.index("fatal")
    with pytest.raises(AttributeError):
        _ = classify.NOT_A_NAME  # type: ignore[attr-defined]


def test_import_is_cheap_and_lazy() -> None:
    code = (
        "import sys; import metal_guard.classify as c; "
        "print(c._cache is None, 'mlx' in sys.modules, 'mlx.core' in sys.modules); "
        "c.classify_mlx_error('x'); print(c._cache is not None, 'mlx' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.split() == ["True", "False", "False", "True", "False"]


# ----------------------------------------------------------------------------- property tests


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(st.text(), st.binary(), st.text(alphabet="[]():._ kIOGPUMETALmalocfi0123456789\n"))
)
def test_never_raises_on_arbitrary_input(data: str | bytes) -> None:
    found = classify_mlx_error(data)
    assert found is None or isinstance(found, ErrorClass)
    assert isinstance(is_metal_oom(data), bool)
    assert isinstance(is_kernel_panic_signature(data), bool)
    assert isinstance(is_process_abort_signature(data), bool)
    sig = detect_panic_signature(data)
    assert sig == (None, None) or isinstance(sig[0], str)
    crash = classify_crash(-6, data)  # type: ignore[arg-type]
    assert crash is not None


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200), st.text(max_size=200))
def test_known_string_survives_surrounding_noise(prefix: str, suffix: str) -> None:
    text = (
        prefix
        + "\n"
        + CMD
        + "Insufficient Memory (00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory).\n"
        + suffix
    )
    found = classify_mlx_error(text)
    assert found is not None
    # the OOM wins unless the noise itself spells a higher-priority class
    assert found.name == "cmd_buffer_oom" or found in match_error_classes(prefix + "\n" + suffix)


@pytest.mark.parametrize("exitcode", [-15, 143, -2, -1])
def test_polite_stop_signals_are_not_gpu_failures(exitcode: int) -> None:
    from metal_guard.classify import classify_crash

    cls = classify_crash(exitcode, "")
    assert cls is not None and cls.name == "worker_terminated"
    assert cls.recovery_hint == "respawn_now"

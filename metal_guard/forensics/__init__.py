"""Forensics: macOS panic/crash reports, the post-reboot gate, orphans, postmortem, feedback."""

"""Benchmarks: amqprpc against a raw py-amqp baseline, measured side by side in one run.

Run ``python -m bench`` (or ``make bench``); ``--quick`` finishes in under a minute.
See ``python -m bench --help`` and the Performance section of README.md.
"""

"""Runs: what each stage command does, from its typed config to its artifacts, as library calls.

A stage (:mod:`stages`) parses its command line, resolves its config once and calls one of these; tests and
benchmarks call them the same way. The loops they drive live in :mod:`dfkd_common.loops`.
"""

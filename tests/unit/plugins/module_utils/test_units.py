"""Sizes and durations for people (_units): binary units with one decimal, durations like 2m05s,
and "-" for what is missing, not a number or negative."""

from __future__ import annotations

import importlib
import sys

import pytest
from harness.ansible import collections_workspace

sys.path.insert(0, collections_workspace())
units = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._units")

GiB = 1024**3


@pytest.mark.parametrize(
    "value, text",
    [
        (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"), (int(1.2 * GiB), "1.2 GiB"),
        (5 * 1024 * GiB, "5.0 TiB"), ("2048", "2.0 KiB"), (None, "-"), ("lots", "-"), (-1, "-"),
    ],
)  # fmt: skip
def test_sizes_are_binary_units_with_one_decimal(value, text):
    assert units.human_bytes(value) == text


@pytest.mark.parametrize(
    "value, text",
    [
        (0, "0.0s"), (4.24, "4.2s"), (9.96, "10.0s"), (10, "10s"), (59.4, "59s"), (59.6, "1m00s"), (125.2, "2m05s"),
        (3599, "59m59s"), (3600, "1h00m"), (3725, "1h02m"), (86400 + 4 * 3600, "1d04h"), ("7.5", "7.5s"), (None, "-"),
        ("soon", "-"), (-3, "-"),
    ],
)  # fmt: skip
def test_durations_read_like_2m05s(value, text):
    assert units.human_seconds(value) == text

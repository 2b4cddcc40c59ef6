"""Bounded parsing: hostile YAML and JSON are refused in one line, fast and small."""

import time
import tracemalloc

import pytest

from latentflow.bounded import BoundsError, json_depth, read_json, read_yaml

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
)


@pytest.mark.parametrize(
    "name,text,reader,message",
    [
        ("deep.json", "[" * 100_000 + "]" * 100_000, read_json, "nested more than the 32 levels"),
        ("deep.yaml", "a: " + "[" * 5000 + "]" * 5000, read_yaml, "nested more than 32 levels deep"),
        (
            "deep-block.yaml",
            "".join(" " * i + f"k{i}:\n" for i in range(1000)) + " " * 1000 + "v",
            read_yaml,
            "nested more than 32 levels deep",
        ),
        ("bomb.yaml", BOMB, read_yaml, "more than 16 YAML aliases"),
        ("big.json", '{"a": "' + "x" * (2 << 20) + '"}', read_json, "more than the 1048576"),
        ("long-number.yaml", "train: {epochs: " + "9" * 5000 + "}", read_yaml, "a number of thousands of digits"),
    ],
)
def test_hostile_files_are_refused_under_a_second_and_100_mb(tmp_path, name, text, reader, message):
    path = tmp_path / name
    path.write_text(text)
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(BoundsError, match=message) as info:
        reader(path)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seconds < 1.0 and peak < 100 << 20, (seconds, peak)
    assert "\n" not in str(info.value) and len(str(info.value)) < 400


def test_ordinary_files_read_as_before(tmp_path):
    assert read_yaml("train: {epochs: 3}\nname: x\n") == {"train": {"epochs": 3}, "name": "x"}
    assert read_yaml("a: &a [1, 2]\nb: *a\n") == {"a": [1, 2], "b": [1, 2]}  # a few aliases are fine
    assert read_json('{"a": [1, {"b": "]"}]}') == {"a": [1, {"b": "]"}]}
    assert json_depth('{"a": "[[[[", "b": [[1]]}') == 3  # brackets inside strings do not count

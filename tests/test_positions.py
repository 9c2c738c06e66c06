"""The position DSL: parsing, frame resolution with Python slice rules, names, errors."""

import pytest

from tracelens import parse_position, resolve_position, sanitize_position, tokens_needed


@pytest.mark.parametrize(
    "position, expected",
    [
        # prompt of 5 tokens, response of 4: prompt = [0, 5), response = [5, 9), all = [0, 9)
        ("prompt[-1]", (4, 5)),
        ("prompt[-3:]", (2, 5)),
        ("prompt[:]", (0, 5)),
        ("prompt[0]", (0, 1)),
        ("prompt[-2]", (3, 4)),
        ("response[:5]", (5, 9)),  # clamped to the 4 response tokens
        ("response[:2]", (5, 7)),
        ("response[1:-1]", (6, 8)),
        ("response[:]", (5, 9)),
        ("response[10:]", (9, 9)),  # empty, never outside the frame
        ("all[2]", (2, 3)),
        ("all[-1]", (8, 9)),
        ("all[:]", (0, 9)),
    ],
)
def test_resolve_position_follows_python_slices_inside_the_frame(position, expected):
    assert resolve_position(position, prompt_len=5, seq_len=9) == expected


def test_turn_frames_need_boundaries():
    bounds = {"system": (0, 3), "turn[1]:prompt": (10, 14)}
    assert resolve_position("system[:]", 5, 9, bounds) == (0, 3)
    assert resolve_position("turn[1]:prompt[-1]", 20, 30, bounds) == (13, 14)
    with pytest.raises(ValueError, match=r"position frame 'thinking' needs turn_boundaries"):
        resolve_position("thinking[:]", 5, 9)


@pytest.mark.parametrize("bad", ["prompt", "prompt[", "prmpt[-1]", "prompt[a:b]", "prompt[1:2:3]", "", "response[[1]]"])
def test_malformed_positions_raise_with_examples(bad):
    with pytest.raises(ValueError, match=r"malformed .*examples: 'prompt\[-1\]'"):
        parse_position(bad)


@pytest.mark.parametrize(
    "position, name",
    [("response[:]", "response_all"), ("response[:5]", "response__5"), ("prompt[-1]", "prompt_-1"),
     ("prompt[-3:]", "prompt_-3_"), ("all[:]", "all_all")],
)
def test_directory_names_match_the_original_layout(position, name):
    assert sanitize_position(position) == name


def test_tokens_needed():
    assert tokens_needed("prompt[-1]") == 0
    assert tokens_needed("response[:5]") == 5
    assert tokens_needed("response[:]") is None
    assert tokens_needed("all[:]") is None

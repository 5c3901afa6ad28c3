"""prep.splice: placeholders for every value a chat template prints, and the walk of a real render along them."""

from __future__ import annotations

import json

import pytest

from prep.splice import BASE, SkeletonBuilder, Walk
from schemas.conversation import REASONING_CLOSE, REASONING_OPEN


def _walk(render, skeleton_values, real_values, builder):
    walk = Walk.of(render(skeleton_values), builder.kinds, {})
    return walk, walk.match(render(real_values), builder.values)


def test_contents_match_as_is_trimmed_or_json_escaped():
    b = SkeletonBuilder()
    slots = [b.text(v) for v in (" padded ", 'say "hi"\n', "plain")]
    render = lambda vals: f"[{vals[0].strip()}]{json.dumps(vals[1], ensure_ascii=False)}<{vals[2]}>"  # noqa: E731
    walk, match = _walk(render, slots, [" padded ", 'say "hi"\n', "plain"], b)
    real = render([" padded ", 'say "hi"\n', "plain"])
    assert [real[a:b] for a, b in match.spans] == ["padded", 'say \\"hi\\"\\n', "plain"]
    assert match.real(2) == (real.index("plain"), real.index("plain") + 5)


@pytest.mark.parametrize("indent", [None, 2, 4])
def test_objects_printed_with_tojson_at_any_indentation(indent):
    b = SkeletonBuilder()
    params = {"type": "object", "properties": {"city": {"type": "string", "description": "ünïcode"}}}
    skeleton = {"tools": [{"name": b.string("get_weather"), "parameters": b.obj(params)}]}
    real = {"tools": [{"name": "get_weather", "parameters": params}]}
    dump = lambda v: json.dumps(v, ensure_ascii=False, indent=indent)  # noqa: E731
    walk = Walk.of(dump(skeleton), b.kinds, {})
    match = walk.match(dump(real), b.values)
    assert match is not None and dump(real)[slice(*match.spans[1])].startswith("{")


def test_ids_keep_their_length_and_objects_other_than_json_are_refused():
    b = SkeletonBuilder()
    placeholder = b.ident("call_abc")
    assert len(placeholder) == 8 and set(placeholder) == {chr(BASE)}
    walk = Walk.of(f"id={placeholder};", b.kinds, {})
    assert walk.match("id=call_abc;", b.values).spans == ((3, 11),)
    c = SkeletonBuilder()
    c.obj({"a": 1})
    with pytest.raises(ValueError, match="other than with tojson"):
        Walk.of("{'" + chr(BASE) + "': None}", c.kinds, {})  # printed as a Python dict


def test_a_folded_reply_is_one_occurrence_and_a_rewritten_think_block_is_refused():
    b = SkeletonBuilder()
    content = f"{REASONING_OPEN}2 and 2.{REASONING_CLOSE}4"
    reasoning = b.reasoning(content)
    reply = b.text("4")
    skeleton = f"A: {REASONING_OPEN}{reasoning}{REASONING_CLOSE}{reply}</s>"
    walk = Walk.of(skeleton, b.kinds, {0: 1})
    match = walk.match(f"A: {content}</s>", b.values)
    assert match.real(0) == (3, 3 + len(content)) and match.real(1) is None
    with pytest.raises(ValueError, match="rewrites"):
        Walk.of(f"A: <reasoning>{reasoning}</reasoning>{reply}</s>", b.kinds, {0: 1})
    dropped = Walk.of(f"A: {reply}</s>", b.kinds, {0: 1})  # a template that leaves the reasoning out
    assert dropped.match("A: 4</s>", b.values).real(1) == (3, 4)


def test_a_real_render_that_does_not_follow_the_skeleton_is_no_match():
    b = SkeletonBuilder()
    slot = b.text("hello")
    walk = Walk.of(f"<u>{slot}</u>", b.kinds, {})
    assert walk.match("<u>HELLO</u>", b.values) is None and walk.match("<u>hello</u>!", b.values) is None


def test_positions_map_from_skeleton_to_real():
    b = SkeletonBuilder()
    slots = [b.text("long content"), b.string("f")]
    skeleton = f"U:{slots[0]}|C:{slots[1]}|E"
    walk = Walk.of(skeleton, b.kinds, {})
    match = walk.match("U:long content|C:f|E", b.values)
    assert [match.position(p) for p in (0, 2, 3, 4, 6, 7, 8)] == [0, 2, 14, 15, 17, 18, 19]

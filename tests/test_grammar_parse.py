"""Formatting and parsing of TRP answers: task families, legacy forms, errors, properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_grammar_fixtures import offline_tokenizer
from trp.grammar import (
    DEFAULT_UNITS,
    IncrementalParser,
    ParseResult,
    Target,
    TaskBlock,
    TaskEntry,
    TokenVocab,
    Triplet,
    TRPParseError,
    VisualPrompt,
    encode_text,
    format_answer,
    format_depth,
    format_detection,
    format_grounded_caption,
    format_keypoints,
    format_rec,
    format_reg,
    format_res,
    format_segmentation,
    format_task_block,
    format_triplet,
    format_vpt_question,
    format_vqa,
    parse,
    parse_ids,
    parse_vrt,
    register_unit,
    registered_units,
    render_vrt,
    route_targets,
    unregister_unit,
    vrt_token,
)

CANONICAL = (
    "<Task>\n"
    "Unit decode (True). Class name, target unit and number:\n"
    "- Name: person Unit: box Num: 2\n"
    "- Name: dog Unit: box Num: 1\n"
    "</Task>\n"
    "<Phrase>person</Phrase>(<Unit>box</Unit>[0]<REF>[1]<REF>), "
    "<Phrase>dog</Phrase>(<Unit>box</Unit>[0]<REF>)."
)


def refs(n: int) -> tuple[Target, ...]:
    return tuple(Target(slot=j) for j in range(n))


def same(a: ParseResult, b: ParseResult) -> bool:
    return (a, a.spans, a.offsets, a.positions) == (b, b.spans, b.offsets, b.positions)


def outcome(fn, *args, **kwargs) -> tuple[object, ...]:
    """Everything a parse call produced: the full result, or where and why it failed."""
    try:
        r = fn(*args, **kwargs)
    except TRPParseError as err:
        return ("error", err.offset, err.expected, err.position)
    return ("ok", r, r.spans, r.offsets, r.positions)


# ---------------------------------------------------------------------------- canonical form
def test_canonical_example_parses_with_offsets() -> None:
    r = parse(CANONICAL)
    assert r.triplets == (
        Triplet("person", "box", refs(2)),
        Triplet("dog", "box", refs(1)),
    )
    assert r.task == TaskBlock(
        decode=True, entries=(TaskEntry("person", "box", 2), TaskEntry("dog", "box", 1))
    )
    assert r.texts == ("", ", ", ".")
    assert r.diagnostics == ()
    assert r.ok
    for triplet_offsets in r.offsets:
        for (o,) in triplet_offsets:
            assert CANONICAL[o : o + 5] == "<REF>"
    for start, end in r.spans:
        assert CANONICAL[start : start + 8] == "<Phrase>"
        assert CANONICAL[end - 1] == ")"


def test_canonical_example_is_what_format_writes() -> None:
    fa = format_detection([("person", "b0"), ("dog", "b1"), ("person", "b2")], task_block=True)
    assert fa.text == CANONICAL
    assert fa.labels == (("b0", "b2"), ("b1",))


def test_vrt_targets_and_mixed_kinds() -> None:
    text = "<Phrase>car</Phrase>(<Unit>mask</Unit><|VRT_3|><|VRT_4|>, <|VRT_9|>[2]<REF>)"
    r = parse(text)
    assert r.triplets[0].targets == (Target(patches=(3, 4)), Target(patches=(9,)), Target(slot=2))
    assert [[text[o : o + 9] for o in t] for t in r.offsets[0]] == [
        ["<|VRT_3|>", "<|VRT_4|>"],
        ["<|VRT_9|>"],
        ["<REF>)"],
    ]


# ---------------------------------------------------------------------------- task families
def test_family_rec_both_target_kinds() -> None:
    fa = format_rec("the dog on the left", payload=(1, 2, 3, 4))
    assert fa.text == "<Phrase>the dog on the left</Phrase>(<Unit>box</Unit>[0]<REF>)."
    assert parse(fa.text).triplets == fa.triplets
    assert fa.labels == (((1, 2, 3, 4),),)
    fv = format_rec("the dog", patches=[7, 8], task_block=True)
    assert fv.text == (
        "<Task>\nUnit decode (True). Class name, target unit and number:\n"
        "- Name: the dog Unit: box Num: 1\n</Task>\n"
        "<Phrase>the dog</Phrase>(<Unit>box</Unit><|VRT_7|><|VRT_8|>)."
    )
    assert parse(fv.text).triplets[0].targets == (Target(patches=(7, 8)),)


def test_family_res() -> None:
    fa = format_res("red car", payload="mask0")
    assert fa.text == "<Phrase>red car</Phrase>(<Unit>mask</Unit>[0]<REF>)."
    assert parse(fa.text).triplets == (Triplet("red car", "mask", refs(1)),)


def test_family_reg_and_vqa_are_unit_free() -> None:
    for fn in (format_reg, format_vqa):
        fa = fn("A brown dog.", task_block=True)
        assert fa.text == "<Task>\nUnit decode (False).\n</Task>\nA brown dog."
        r = parse(fa.text)
        assert r.triplets == ()
        assert r.texts == ("A brown dog.",)
        assert r.task == TaskBlock(decode=False)
        assert fn("Yes.").text == "Yes."
        assert parse("Yes.").triplets == ()


def test_family_detection_and_segmentation_multi_instance() -> None:
    inst = [("cat", 0), ("dog", 1), ("cat", 2), ("cat", 3)]
    fa = format_detection(inst, patches=[[1], [2, 3], [4], [5, 6]])
    assert fa.text == (
        "<Phrase>cat</Phrase>(<Unit>box</Unit><|VRT_1|>, <|VRT_4|>, <|VRT_5|><|VRT_6|>), "
        "<Phrase>dog</Phrase>(<Unit>box</Unit><|VRT_2|><|VRT_3|>)."
    )
    assert fa.labels == ((0, 2, 3), (1,))
    assert parse(fa.text).triplets == fa.triplets
    fs = format_segmentation(inst, task_block=True)
    r = parse(fs.text)
    assert [(t.concept, t.unit, len(t.targets)) for t in r.triplets] == [
        ("cat", "mask", 3),
        ("dog", "mask", 1),
    ]
    assert format_detection([]).text == "None."
    assert parse("None.").triplets == ()


def test_family_grounded_caption_inline() -> None:
    caption = "A man walks two dogs."
    fa = format_grounded_caption(caption, [(2, 5, ["m"]), (12, 20, ["d0", "d1"])])
    assert fa.text == (
        "A <Phrase>man</Phrase>(<Unit>box</Unit>[0]<REF>) walks "
        "<Phrase>two dogs</Phrase>(<Unit>box</Unit>[0]<REF>[1]<REF>)."
    )
    r = parse(fa.text)
    assert r.texts == ("A ", " walks ", ".")
    assert r.triplets == fa.triplets
    assert fa.labels == (("m",), ("d0", "d1"))
    with pytest.raises(ValueError, match="out of order"):
        format_grounded_caption(caption, [(12, 20, [1]), (2, 5, [1])])


def test_family_keypoints_have_their_own_unit() -> None:
    kp = torch.zeros(17, 3)
    fa = format_keypoints([("person", {"box": (0, 0, 5, 5), "keypoints": kp})] * 2)
    assert fa.text == "<Phrase>person</Phrase>(<Unit>keypoint</Unit>[0]<REF>[1]<REF>)."
    assert parse(fa.text).triplets == (Triplet("person", "keypoint", refs(2)),)
    assert all(lab["keypoints"] is kp for lab in fa.labels[0])
    vrt = format_keypoints([("star", {"keypoints": kp})], patches=[[4, 5]])
    assert vrt.text == "<Phrase>star</Phrase>(<Unit>keypoint</Unit><|VRT_4|><|VRT_5|>)."
    assert format_keypoints([]).text == "None."
    with pytest.raises(ValueError, match="keypoints"):
        format_keypoints([("person", {"box": (0, 0, 1, 1)})])
    with pytest.raises(TypeError, match="tuple"):
        format_keypoints(["person"])  # type: ignore[list-item]


def test_boxes_and_keypoints_in_one_answer_route_to_their_heads() -> None:
    kp = {"keypoints": torch.zeros(5, 3)}
    box = format_detection([("circle", (0, 0, 4, 4)), ("star", (5, 5, 9, 9))])
    key = format_keypoints([("circle", kp)])
    text = format_answer(box.triplets + key.triplets)
    tok = offline_tokenizer("bpe")
    routed = route_targets(
        [parse_ids(encode_text(tok, text), vocab=TokenVocab.from_tokenizer(tok))]
    )
    assert routed["box"].concepts == ("circle", "star")
    assert routed["keypoint"].concepts == ("circle",)
    assert routed["keypoint"].triplet.tolist() == [2]


def test_family_depth() -> None:
    fa = format_depth(payload="d", task_block=True)
    assert fa.text.endswith("<Phrase>depth map</Phrase>(<Unit>depth</Unit>[0]<REF>).")
    r = parse(fa.text)
    assert r.triplets == (Triplet("depth map", "depth", refs(1)),)
    assert r.task == TaskBlock(decode=True, entries=(TaskEntry("depth map", "depth", 1),))


def test_family_visual_prompt_questions() -> None:
    prompts = [
        VisualPrompt("point", (3, 4)),
        VisualPrompt("box", (1, 1, 4, 2)),
        VisualPrompt("scribble", [(0, 0), (7, 7)]),
        VisualPrompt("mask", torch.eye(8, dtype=torch.bool)),
    ]
    q = format_vpt_question("Compare {}, {}, {} and {}.", prompts)
    assert q == "Compare [VPT], [VPT], [VPT] and [VPT]."
    masks = [p.to_mask(8, 8, radius=1) for p in prompts]
    assert masks[0][4, 3]
    assert masks[0].sum() == 5
    assert masks[1].sum() == 4 * 2
    assert masks[1][2, 4]
    assert not masks[1][3, 4]
    assert all(masks[2][i, i] for i in range(8))
    assert not masks[2][0, 7]
    assert torch.equal(masks[3], torch.eye(8, dtype=torch.bool))
    with pytest.raises(ValueError, match="prompts"):
        format_vpt_question("What is {}?", prompts)
    with pytest.raises(ValueError, match="kind"):
        VisualPrompt("lasso", None)


def test_format_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="slot"):
        format_triplet(Triplet("a", "box", (Target(slot=1),)))
    with pytest.raises(ValueError, match="not registered"):
        format_triplet(Triplet("a", "pose", refs(1)))
    with pytest.raises(ValueError, match="must not contain"):
        format_rec("a </Phrase> b")
    with pytest.raises(ValueError, match="VRT"):
        format_vqa("look at <|VRT_3|>")
    with pytest.raises(ValueError, match="task line"):
        format_rec("a Unit: b", task_block=True)
    with pytest.raises(ValueError, match="repeats"):
        format_triplet(Triplet("a", "box", (Target(patches=(1, 1)),)))
    with pytest.raises(ValueError, match="texts"):
        format_answer([Triplet("a", "box", refs(1))], texts=["x"])
    with pytest.raises(ValueError, match="decode"):
        format_task_block(TaskBlock(decode=True))
    with pytest.raises(ValueError):
        Target(slot=0, patches=(1,))
    with pytest.raises(ValueError):
        Target(patches=())
    with pytest.raises(TypeError):
        parse(b"bytes")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- legacy forms
def legacy(text: str) -> ParseResult:
    with pytest.raises(TRPParseError):
        parse(text)
    r = parse(text, strict=False)
    assert any(d.kind == "legacy" for d in r.diagnostics)
    return r


def test_legacy_ref_before_slot() -> None:
    r = legacy("<Phrase>dog</Phrase>(<Unit>box</Unit><REF>[0]<REF>[1]).")
    assert r.triplets == (Triplet("dog", "box", refs(2)),)
    assert r.texts == ("", ".")


def test_legacy_task_lines_with_tagged_names() -> None:
    text = (
        "<Task>\nUnit decode (True). Class name, target unit and number:\n"
        "- Name: <Phrase>dog</Phrase> Unit: <Unit>mask</Unit> Num: 1\n</Task>\n"
        "<Phrase>dog</Phrase>(<Unit>mask</Unit>[0]<REF>)."
    )
    r = legacy(text)
    assert r.task == TaskBlock(decode=True, entries=(TaskEntry("dog", "mask", 1),))
    assert r.triplets == (Triplet("dog", "mask", refs(1)),)
    assert [d.kind for d in r.diagnostics] == ["legacy"]


def test_legacy_padt_quoted_label() -> None:
    text = 'The "the car on the left" refers to <|VRT_122|><|VRT_107|> in this image.'
    r = legacy(text)
    assert r.triplets == (Triplet("the car on the left", "box", (Target(patches=(122, 107)),)),)
    assert r.texts == ('The "the car on the left" refers to ', " in this image.")
    assert parse(text, strict=False, legacy_unit="mask").triplets[0].unit == "mask"


def test_legacy_category_lists_after_vrt_substitution() -> None:
    text = 'In this image, there are 2 "car" (<|VRT_3|><|VRT_4|>, <|VRT_9|>), 1 "cup" (<|VRT_1|>).'
    r = legacy(text)
    assert r.triplets == (
        Triplet("car", "box", (Target(patches=(3, 4)), Target(patches=(9,)))),
        Triplet("cup", "box", (Target(patches=(1,)),)),
    )
    assert r.texts[1] == '), 1 "cup" ('
    miscount = parse('2 "car" (<|VRT_3|>).', strict=False)
    assert any("announced" in d.message for d in miscount.diagnostics)


def test_legacy_and_as_separator() -> None:
    r = legacy('3 "dog" (<|VRT_1|>, <|VRT_2|> and <|VRT_5|>)')
    assert r.triplets[0].targets == tuple(Target(patches=(k,)) for k in (1, 2, 5))
    r = legacy("<Phrase>dog</Phrase>(<Unit>box</Unit><|VRT_1|> and <|VRT_2|>).")
    assert r.triplets[0].targets == (Target(patches=(1,)), Target(patches=(2,)))


def test_legacy_repeated_vrt_ids() -> None:
    r = legacy("<Phrase>dog</Phrase>(<Unit>box</Unit><|VRT_4|><|VRT_4|><|VRT_5|>).")
    assert r.triplets[0].targets == (Target(patches=(4, 5)),)
    r = legacy('The "dog" refers to <|VRT_2|><|VRT_2|>.')
    assert r.triplets[0].targets == (Target(patches=(2,)),)


# ---------------------------------------------------------------------------- strict errors
_TWO_DOGS = (
    "<Task>\nUnit decode (True). Class name, target unit and number:\n"
    "- Name: dog Unit: box Num: 2\n</Task>\n<Phrase>dog</Phrase>(<Unit>box</Unit>[0]<REF>)"
)
_ONE_DOG = (
    "<Task>\nUnit decode (True). Class name, target unit and number:\n"
    "- Name: dog Unit: box Num: 1\n</Task>\n<Phrase>cat</Phrase>"
)


@pytest.mark.parametrize(
    ("text", "offset", "expected"),
    [
        ("<Phrase>dog</Phrase>(<Unit>box</Unit>[1]<REF>)", 38, "[0]<REF>"),
        ("<Phrase>dog</Phrase>(<Unit>boxx</Unit>[0]<REF>)", 30, "box</Unit>"),
        ("<Phrase>dog</Phrase>(<Unit>box</Unit>[0]<REF>", 45, "')'"),
        ("<Phrase>dog</Phrase> (<Unit>box</Unit>[0]<REF>)", 20, "(<Unit>"),
        ("<Phrase></Phrase>(<Unit>box</Unit>[0]<REF>)", 8, "phrase text"),
        ("a </Unit> b", 2, "free text or '<Phrase>'"),
        ("see <|VRT_3|>", 4, "free text or '<Phrase>'"),
        ("<Phrase>dog</Phrase>(<Unit>box</Unit>)", 37, "[0]<REF>"),
        ("<Phrase>d</Phrase>(<Unit>box</Unit><|VRT_x|>)", 41, "VRT token"),
        (
            "<Task>\nUnit decode (False).\n</Task>\n<Phrase>a</Phrase>(<Unit>box</Unit>[0]<REF>)",
            36,
            "no more triplets",
        ),
        (_TWO_DOGS, len(_TWO_DOGS) - 1, "[1]<REF>"),
        (_ONE_DOG, _ONE_DOG.index("cat"), "dog</Phrase>"),
        ("x <Task>\n", 2, "free text or '<Phrase>'"),
    ],
)
def test_strict_errors_name_offset_and_expectation(text: str, offset: int, expected: str) -> None:
    with pytest.raises(TRPParseError) as info:
        parse(text)
    assert info.value.offset == offset
    assert expected in info.value.expected
    assert f"offset {offset}" in str(info.value)
    parse(text, strict=False)


def test_strict_rejects_incomplete_task_plan() -> None:
    text = CANONICAL.split(", <Phrase>dog")[0]
    with pytest.raises(TRPParseError, match="1 more triplet"):
        parse(text)
    r = parse(text, strict=False)
    assert r.triplets == (Triplet("person", "box", refs(2)),)
    assert any("does not match" in d.message for d in r.diagnostics)


def test_units_registry_extends_parser_and_formatter() -> None:
    text = "<Phrase>man</Phrase>(<Unit>pose</Unit>[0]<REF>)"
    with pytest.raises(TRPParseError):
        parse(text)
    assert any("unknown unit" in d.message for d in parse(text, strict=False).diagnostics)
    register_unit("pose")
    try:
        register_unit("pose")
        assert registered_units() == (*DEFAULT_UNITS, "pose")
        assert parse(text).triplets == (Triplet("man", "pose", refs(1)),)
        assert format_triplet(Triplet("man", "pose", refs(1))) == text
    finally:
        unregister_unit("pose")
    assert registered_units() == DEFAULT_UNITS
    assert parse(text, units=["pose"]).triplets[0].unit == "pose"
    for bad in ("Pose", "a b", ""):
        with pytest.raises(ValueError):
            register_unit(bad)
    with pytest.raises(KeyError):
        unregister_unit("pose")


def test_vrt_text_helpers() -> None:
    assert vrt_token(5) == "<|VRT_5|>"
    assert render_vrt([105, 100], vrt_base=100) == "<|VRT_5|><|VRT_0|>"
    assert parse_vrt("<|VRT_5|><|VRT_0|>", vrt_base=100) == [105, 100]
    with pytest.raises(ValueError):
        render_vrt([99], vrt_base=100)
    with pytest.raises(ValueError):
        parse_vrt("<|VRT_5|> x")
    with pytest.raises(ValueError):
        vrt_token(-1)


def test_incremental_parser_api() -> None:
    inc = IncrementalParser()
    for ch in CANONICAL[:140]:
        inc.feed(ch)
    assert inc.triplets == ()
    assert not inc.accepting
    inc.feed(CANONICAL[140:])
    assert inc.accepting
    assert len(inc.triplets) == 2
    assert same(inc.snapshot(), parse(CANONICAL))
    assert same(inc.finish(), parse(CANONICAL))
    with pytest.raises(RuntimeError):
        inc.feed("x")
    bad = IncrementalParser()
    with pytest.raises(TRPParseError) as first:
        bad.feed("<Phrase>a</Phrase>[")
    with pytest.raises(TRPParseError) as again:
        bad.feed("x")
    assert first.value is again.value
    assert first.value.offset == 18
    with pytest.raises(TypeError):
        bad.feed_token(3)


# ---------------------------------------------------------------------------- properties
_ALPHABET = 'ab <>/|()[],."\n_0PVRTUnit:'
concepts = st.text(alphabet=_ALPHABET, min_size=1, max_size=10)
free_texts = st.text(alphabet=_ALPHABET, max_size=8)


def _target_lists(draw: st.DrawFn) -> tuple[Target, ...]:
    n = draw(st.integers(1, 3))
    out = []
    for j in range(n):
        if draw(st.booleans()):
            out.append(Target(slot=j))
        else:
            run = draw(st.lists(st.integers(0, 300), min_size=1, max_size=3, unique=True))
            out.append(Target(patches=tuple(run)))
    return tuple(out)


@st.composite
def answers(draw: st.DrawFn) -> tuple[str, tuple[Triplet, ...], tuple[str, ...], bool]:
    """A valid answer: random triplets, texts and task block (texts/concepts that cannot be
    written are redrawn by ``assume``-like filtering through the formatter)."""
    task = draw(st.booleans())
    n = draw(st.integers(0, 3))
    triplets = tuple(
        Triplet(draw(concepts), draw(st.sampled_from(DEFAULT_UNITS)), _target_lists(draw))
        for _ in range(n)
    )
    texts = tuple(draw(free_texts) for _ in range(n + 1))
    try:
        text = format_answer(triplets, texts=texts, task_block=task)
    except ValueError:
        from hypothesis import assume

        assume(False)
    return text, triplets, texts, task


PROPS = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.filter_too_much]
)


@PROPS
@given(answers())
def test_property_format_parse_round_trip(answer) -> None:
    text, triplets, texts, task = answer
    r = parse(text)
    assert r.triplets == triplets
    assert r.texts == texts
    assert r.task == (TaskBlock.for_triplets(triplets) if task else None)
    assert r.diagnostics == ()
    assert same(parse(text, strict=False), r)


@PROPS
@given(answers())
def test_property_incremental_agrees_on_every_prefix(answer) -> None:
    text = answer[0]
    inc = IncrementalParser()
    for i in range(len(text) + 1):
        batch = outcome(parse, text[:i])
        assert outcome(inc.snapshot) == batch
        assert inc.accepting == (batch[0] == "ok")
        if i < len(text):
            inc.feed(text[i])


_NOISE = (
    "<REF>",
    "<|VRT_3|>",
    "</Unit>",
    "<Unit>",
    "<Phrase>",
    "</Phrase>",
    " and ",
    ", ",
    "[0]",
    "[",
    "]",
    ")",
    "(",
    "<",
    "\n",
    "<Task>",
    "</Task>",
    '"x" ',
    "- Name: ",
    " Num: ",
)


@st.composite
def corrupted(draw: st.DrawFn) -> str:
    text = draw(answers())[0]
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(("insert", "delete", "replace")))
        piece = draw(st.sampled_from(_NOISE))
        j = min(len(text), i + draw(st.integers(1, 6)))
        if op == "insert":
            text = text[:i] + piece + text[i:]
        elif op == "delete":
            text = text[:i] + text[j:]
        else:
            text = text[:i] + piece + text[j:]
    return text


@st.composite
def chunkings(draw: st.DrawFn, text: str) -> list[str]:
    cuts = sorted(set(draw(st.lists(st.integers(0, len(text)), max_size=12))))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


@PROPS
@given(st.data())
def test_property_corruption_strict_raises_only_parse_errors(data) -> None:
    text = data.draw(corrupted())
    chunks = data.draw(chunkings(text))
    inc = IncrementalParser()

    def streamed() -> ParseResult:
        for c in chunks:
            inc.feed(c)
        return inc.finish()

    assert outcome(streamed) == outcome(parse, text)


@PROPS
@given(st.data())
def test_property_corruption_lenient_never_raises_and_ignores_chunking(data) -> None:
    text = data.draw(corrupted())
    result = parse(text, strict=False)
    assert len(result.texts) == len(result.triplets) + 1
    inc = IncrementalParser(strict=False)
    for c in data.draw(chunkings(text)):
        inc.feed(c)
    assert same(inc.finish(), result)
    assert result.diagnostics == parse(text, strict=False).diagnostics

import pytest
import torch

from latexblend.errors import LatexBlendError
from latexblend.tokens import (
    Span,
    add_identifier_token,
    expand_placeholders,
    locate_spans,
    placeholder_names,
    prompt_ids,
    token_ids,
)


def concepts(tokenizer, *pairs):
    return [(name, noun, token_ids(tokenizer, noun)) for name, noun in pairs]


def test_tokenizer_reproduces_clip_ids(tiny_pipe):
    assert tiny_pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tiny_pipe.tokenizer) == 49408
    assert tiny_pipe.tokenizer.model_max_length == 77
    # SDXL's second tokenizer pads with "!" (id 0), the first with <|endoftext|>
    padded2 = tiny_pipe.tokenizer_2("a cat", padding="max_length", max_length=8).input_ids
    padded1 = tiny_pipe.tokenizer("a cat", padding="max_length", max_length=8).input_ids
    assert padded2 == [49406, 320, 2368, 49407, 0, 0, 0, 0]
    assert padded1 == [49406, 320, 2368, 49407, 49407, 49407, 49407, 49407]


def test_add_identifier_token_copies_init_row_in_both_encoders(tiny_dir):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    toks = [CLIPTokenizer.from_pretrained(tiny_dir, subfolder=s) for s in ("tokenizer", "tokenizer_2")]
    encs = [CLIPTextModel.from_pretrained(tiny_dir, subfolder="text_encoder"),
            CLIPTextModelWithProjection.from_pretrained(tiny_dir, subfolder="text_encoder_2")]
    before = [e.get_input_embeddings().weight.detach().clone() for e in encs]
    new_id = add_identifier_token(toks, encs, "<new1>", init_token="pll")
    assert new_id == 49408
    ktn = toks[0]("pll", add_special_tokens=False).input_ids[0]
    for enc, old in zip(encs, before, strict=False):
        w = enc.get_input_embeddings().weight
        assert w.shape[0] == 49409
        assert torch.equal(w[new_id], old[ktn])
        assert torch.equal(w[:49408], old)
    for tok in toks:
        assert tok("photo of <new1> dog").input_ids == [49406, 1125, 539, 49408, 1929, 49407]
    assert add_identifier_token(toks, encs, "<new1>") == new_id  # idempotent
    assert encs[0].get_input_embeddings().weight.shape[0] == 49409
    with pytest.raises(LatexBlendError, match="single-token"):
        add_identifier_token(toks, encs, "<new2>", init_token="guitar amplifier")


def test_span_after_article(tokenizer):
    text, spans = locate_spans(tokenizer, "a dog wearing sunglasses", concepts(tokenizer, ("corgi", "dog")))
    assert text == "a dog wearing sunglasses"
    assert spans == [Span("corgi", 1, 2)]  # [a, dog] at positions 1, 2 (0 is BOS)


def test_multi_token_noun(tokenizer):
    c = concepts(tokenizer, ("amp", "guitar amplifier"))
    assert len(c[0][2]) == 2
    _, spans = locate_spans(tokenizer, "photo of my guitar amplifier on stage", c)
    ids = prompt_ids(tokenizer, "photo of my guitar amplifier on stage")
    assert spans == [Span("amp", 3, 3)]
    assert ids[4:6] == c[0][2]


def test_repeated_noun_is_taken_in_order(tokenizer):
    c = concepts(tokenizer, ("corgi", "dog"), ("husky", "dog"))
    _, spans = locate_spans(tokenizer, "a dog next to a dog", c)
    assert spans == [Span("corgi", 1, 2), Span("husky", 5, 2)]
    with pytest.raises(LatexBlendError, match="'corgi' and 'husky' claim the same 'dog' span"):
        locate_spans(tokenizer, "a dog on grass", c)


def test_two_concepts_of_one_class_through_placeholders(tokenizer):
    c = concepts(tokenizer, ("corgi", "dog"), ("husky", "dog"))
    prompt = "<husky> playing with <corgi>, a dog on a beach"
    assert placeholder_names(prompt) == ["husky", "corgi"]
    text, spans = locate_spans(tokenizer, prompt, c)
    assert text == "a dog playing with a dog, a dog on a beach"
    # returned in the order of `concepts`: corgi is the second placeholder
    assert spans == [Span("corgi", 5, 2), Span("husky", 1, 2)]


def test_placeholder_mixed_with_plain_noun(tokenizer):
    c = concepts(tokenizer, ("corgi", "dog"), ("shades", "sunglasses"))
    text, spans = locate_spans(tokenizer, "<corgi> wearing a sunglasses", c)
    assert text == "a dog wearing a sunglasses"
    assert spans == [Span("corgi", 1, 2), Span("shades", 4, 2)]


def test_noun_inside_longer_word_is_not_a_match(tokenizer):
    ids = prompt_ids(tokenizer, "a hotdog and a dog")
    c = concepts(tokenizer, ("corgi", "dog"))
    _, spans = locate_spans(tokenizer, "a hotdog and a dog", c)
    assert ids[spans[0].start + 1] == c[0][2][0] and spans[0].start == 4


@pytest.mark.parametrize(
    "prompt, pairs, message",
    [
        ("a cat on a sofa", [("corgi", "dog")], "noun 'dog' is not in the prompt"),
        ("dogs on a sofa", [("corgi", "dog")], "noun 'dog' is not in the prompt"),
        ("dog on a sofa", [("corgi", "dog")], "starts with 'dog'"),
        ("a dog cat", [("corgi", "dog"), ("tabby", "cat")], "overlapping"),
        ("a dog " + "very " * 80, [("corgi", "dog")], "over CLIP's limit of 77"),
        ("<rex> on a sofa", [("corgi", "dog")], "no concept named 'rex'"),
        ("<corgi> and <corgi>", [("corgi", "dog")], "more than once"),
    ],
)
def test_span_errors(tokenizer, prompt, pairs, message):
    with pytest.raises(LatexBlendError, match=message):
        locate_spans(tokenizer, prompt, concepts(tokenizer, *pairs))


def test_prompt_ids_limit(tokenizer):
    assert len(prompt_ids(tokenizer, "word " * 75)) == 77
    with pytest.raises(LatexBlendError, match="78 tokens"):
        prompt_ids(tokenizer, "word " * 76)


def test_expand_placeholders_marks():
    text, marks = expand_placeholders("x <a> y <b>", {"a": "dog", "b": "guitar amplifier"})
    assert text == "x a dog y a guitar amplifier"
    assert [text[lo:hi] for _, lo, hi in marks] == ["a dog", "a guitar amplifier"]


@pytest.mark.parametrize("prompt, names", [
    ("a <rex> on grass", ["rex"]), ("<a> and <b.2>", ["a", "b.2"]), ("i <3 nyc", []), ("a -> b", []),
    ("a < b", []), ("photo of <new1> dog", ["new1"]),
])
def test_placeholders_are_found(prompt, names):
    assert placeholder_names(prompt) == names


@pytest.mark.parametrize("prompt, where", [
    ("a <rex on grass", "'<' at '<rex'"), ("a rex> on grass", "'>' at 'rex>'"), ("<rex> and <corgi", "'<' at '<corgi'"),
    ("a <re x> dog", "'<' at '<re'"),
])
def test_an_unmatched_placeholder_is_an_error(prompt, where):
    with pytest.raises(LatexBlendError, match=f"has an unmatched {where}"):
        placeholder_names(prompt)

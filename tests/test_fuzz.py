"""Property-based fuzzing of what users type: the request schema and the command line.

Arbitrary unicode (lone surrogates included), bytes and JSON shapes go in; nothing may come out but the
project's own errors (RequestError for HTTP bodies, SDEngineError or argparse's exit 2 on the command line).
The tokenizer's own fuzz test is in test_tokenizer.py.
"""

from __future__ import annotations

import json

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from sdengine.config import ModelConfig  # noqa: E402
from sdengine.errors import SDEngineError  # noqa: E402
from sdengine.serve.schema import FIELDS, Limits, RequestError, parse_generation  # noqa: E402
from sdengine.prompts import chunk_prompt  # noqa: E402
from sdengine.tokenizer import ClipTokenizer  # noqa: E402

TOKENIZER = ClipTokenizer.default()
LIMITS = Limits(factor=8, default_size=(512, 512),
                count_chunks=lambda text, weighting: chunk_prompt(TOKENIZER, text, weighting).chunks,
                scheduler=ModelConfig().scheduler)
# Any code point, lone surrogates drawn on purpose (2,048 of 1.1M code points: rare otherwise), and the
# characters prompts and sizes are made of.
ANY_TEXT = st.lists(st.one_of(st.characters(exclude_categories=()), st.characters(categories=["Cs"]),
                              st.sampled_from(list("(),:x0123456789 \n"))), max_size=60).map("".join)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), ANY_TEXT)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ANY_TEXT, inner,
                                                                                            max_size=3), max_leaves=6)
KEYS = st.one_of(st.sampled_from(FIELDS), ANY_TEXT)
# derandomize: the same examples on every run, so CI cannot fail by chance.
FUZZ = settings(max_examples=300, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


def _refused_or_valid(body: bytes) -> None:
    try:
        req = parse_generation(body, LIMITS)
    except RequestError as exc:
        assert exc.status in (400, 413, 422) and exc.message
        json.dumps({"message": exc.message, "param": exc.param})  # the error body can be written
    else:
        assert 1 <= req.steps and req.width % 8 == 0 and req.height % 8 == 0
        req.prompt.encode("utf-8")  # what the model thread gets is valid text


@FUZZ
@given(st.dictionaries(KEYS, VALUES, max_size=8))
def test_json_objects_only_raise_request_errors(data):
    _refused_or_valid(json.dumps(data, ensure_ascii=True, allow_nan=True).encode())


@FUZZ
@given(st.fixed_dictionaries({"prompt": ANY_TEXT}, optional={"negative_prompt": ANY_TEXT, "size": ANY_TEXT,
                                                             "steps": SCALARS, "seed": SCALARS, "n": SCALARS}))
def test_likely_requests_only_raise_request_errors(data):
    _refused_or_valid(json.dumps(data, ensure_ascii=True, allow_nan=True).encode())


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_raise_request_errors(body):
    _refused_or_valid(body)


ARGV_TEXT = st.one_of(ANY_TEXT, st.binary(max_size=30).map(lambda b: b.decode("utf-8", "surrogateescape")))
OPTIONS = ["--steps", "--guidance", "--eta", "--seed", "--height", "--width", "--num-images", "--out", "--threads",
           "--negative-prompt", "--option", "--backend", "--device", "--prediction-type", "--model"]


@FUZZ
@given(ARGV_TEXT, st.lists(st.tuples(st.sampled_from(OPTIONS), ARGV_TEXT), max_size=4))
def test_command_line_only_raises_its_own_errors(prompt, pairs):
    """`sdengine generate` argument parsing and the checks before loading: argparse's exit 2 or SDEngineError."""
    from sdengine.bench.settings import load_options
    from sdengine.cli import _validate, build_parser

    argv = ["generate", prompt] + [part for pair in pairs for part in pair]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        assert exc.code == 2
        return
    if args.backend == "tensorrt" or (args.model and args.backend != "torch"):
        return  # those read engine sets and export folders; their errors are tested with real folders
    try:
        _validate(args)
        load_options(args.option)
    except SDEngineError:
        pass

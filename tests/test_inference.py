"""The key/value-cached inference session against plain uncached forward passes."""

from __future__ import annotations

import pytest
import torch

from noodle.config import ModelConfig
from noodle.inference import Session, generate
from noodle.model import NoodleModel
from noodle.precision import (
    packed_float16_available,
    prepare_for_inference,
    select_inference_dtype,
)
from noodle.sampling import SamplingSettings
from tests.conftest import TINY_CONFIG

GREEDY = SamplingSettings(temperature=0, repetition_penalty=1.0)
TOLERANCE = 1e-4

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(ctx_len: int = TINY_CONFIG["ctx_len"], seed: int = 0) -> NoodleModel:
    torch.manual_seed(seed)
    config = ModelConfig(**{**TINY_CONFIG, "ctx_len": ctx_len})
    return NoodleModel(config).eval()


def uncached_next_logits(model: NoodleModel, window: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([window]))[0, -1]


def random_ids(count: int, seed: int = 1) -> list[int]:
    """Token ids of the packaged tokenizer, none of them end-of-text."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, 50277, (count,), generator=generator).tolist()


def test_prefill_then_decode_matches_uncached_forward():
    model = tiny_model()
    ids = torch.tensor([random_ids(48)])
    with torch.no_grad():
        expected = model(ids)
        model.setup_cache()
        prefill = model(ids[:, :20], start=0)
        decoded = [model(ids[:, i : i + 1], start=i) for i in range(20, 40)]
        chunk = model(ids[:, 40:], start=40)  # a later prompt: several tokens at once
    got = torch.cat([prefill, *decoded, chunk], dim=1)
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)


def test_token_at_a_time_matches_uncached_forward():
    model = tiny_model()
    ids = torch.tensor([random_ids(30)])
    with torch.no_grad():
        expected = model(ids)
        model.setup_cache()
        got = torch.cat([model(ids[:, i : i + 1], start=i) for i in range(30)], dim=1)
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)


def test_a_tensor_start_matches_an_int_start():
    """The compiled decode step passes its position as a tensor."""
    model = tiny_model()
    ids = torch.tensor([random_ids(12)])
    with torch.no_grad():
        model.setup_cache()
        model(ids[:, :11], start=0)
        by_int = model(ids[:, 11:], start=11)
        by_tensor = model(ids[:, 11:], start=torch.tensor(11))
    torch.testing.assert_close(by_tensor, by_int)


def test_session_keeps_the_conversation_across_turns(tokenizer):
    model = tiny_model()
    session = Session(model, tokenizer)
    session.push(random_ids(10, seed=2))
    for _ in range(5):
        session.next_token(GREEDY)
    session.push(random_ids(7, seed=3))  # the next turn, prefilled onto the warm cache
    torch.testing.assert_close(
        session.logits(), uncached_next_logits(model, session.history), atol=TOLERANCE, rtol=0
    )
    assert len(session.history) == 10 + 5 + 7


def test_eviction_keeps_generating_past_the_context_window(tokenizer):
    model = tiny_model(ctx_len=16)
    session = Session(model, tokenizer)
    session.push(random_ids(10))
    starts = []
    for _ in range(40):
        logits = session.logits()
        assert len(session.window) <= 16
        # The rebuilt cache gives what a fresh pass over the kept window gives.
        torch.testing.assert_close(
            logits, uncached_next_logits(model, session.window), atol=TOLERANCE, rtol=0
        )
        starts.append(session.window_start)
        session.next_token(GREEDY)
    assert len(session.history) == 50
    # The oldest half of the window (8 tokens) goes at once, not a token at a time.
    assert sorted(set(starts)) == [0, 8, 16, 24, 32, 40]


def test_a_prompt_longer_than_the_window_keeps_its_end(tokenizer):
    model = tiny_model(ctx_len=16)
    session = Session(model, tokenizer)
    prompt = random_ids(37)
    session.push(prompt)
    logits = session.logits()
    assert session.window == prompt[-13:]  # three halves of 8 dropped: 37 - 24 tokens left
    torch.testing.assert_close(
        logits, uncached_next_logits(model, prompt[-13:]), atol=TOLERANCE, rtol=0
    )


def test_context_of_one_token_keeps_generating(tokenizer):
    model = tiny_model(ctx_len=1)
    session = Session(model, tokenizer)
    session.push(random_ids(3))
    for _ in range(6):
        logits = session.logits()
        assert session.window == session.history[-1:]
        torch.testing.assert_close(
            logits, uncached_next_logits(model, session.history[-1:]), atol=TOLERANCE, rtol=0
        )
        session.next_token(GREEDY)
    assert len(session.history) == 9


@pytest.mark.parametrize("run_through_model", [False, True])
def test_discard_last_leaves_no_trace(tokenizer, run_through_model):
    model = tiny_model()
    session = Session(model, tokenizer)
    first_turn = random_ids(6, seed=4)
    session.push(first_turn)
    token = session.next_token(SamplingSettings(), torch.Generator().manual_seed(0))
    if run_through_model:
        session.logits()  # its keys and values are in the cache now
    assert session.discard_last() == token
    assert session.history == first_turn

    second_turn = random_ids(4, seed=5)
    session.push(second_turn)
    torch.testing.assert_close(
        session.logits(),
        uncached_next_logits(model, first_turn + second_turn),
        atol=TOLERANCE,
        rtol=0,
    )


def test_an_interrupted_forward_pass_leaves_the_session_consistent(tokenizer):
    model = tiny_model()
    session = Session(model, tokenizer)
    session.push(random_ids(8))
    session.next_token(GREEDY)

    def interrupt(*_):
        raise KeyboardInterrupt

    # Ctrl-C after the first block has already written its keys and values.
    hook = model.blocks[1].register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        session.logits()
    hook.remove()
    torch.testing.assert_close(
        session.logits(), uncached_next_logits(model, session.history), atol=TOLERANCE, rtol=0
    )


def test_end_of_text_ends_the_reply_and_stays_out_of_the_history(tokenizer):
    model = tiny_model()
    with torch.no_grad():
        model.head.bias[tokenizer.eot_id] = 1e4  # the model always wants to stop
    session = Session(model, tokenizer)
    assert list(generate(session, "hello there", 10, GREEDY)) == []
    assert session.history == tokenizer.encode("hello there")


def test_generate_stops_after_max_tokens(tokenizer):
    model = tiny_model()
    with torch.no_grad():
        model.head.bias[tokenizer.eot_id] = -1e4  # never stops by itself
    session = Session(model, tokenizer)
    reply = list(generate(session, "hello", 7, GREEDY))
    assert len(reply) == 7
    assert session.history == tokenizer.encode("hello") + reply


def test_logits_without_new_tokens_are_those_of_the_last_position(tokenizer):
    model = tiny_model()
    session = Session(model, tokenizer)
    session.push(random_ids(5))
    first = session.logits()
    torch.testing.assert_close(session.logits(), first, atol=TOLERANCE, rtol=0)


def favour_padded_ids(model: NoodleModel, vocab_size: int) -> NoodleModel:
    """Make the padding rows of the output layer win every comparison, as an untrained
    output layer's padding may: a path that forgets to cut them off will produce them."""
    with torch.no_grad():
        model.head.bias[vocab_size:] = 1e4
    return model


def conversation(session: Session, settings: SamplingSettings, prompt: list[int]) -> list[int]:
    """The tokens of a conversation through every change of a session's state: turns past
    the window (evictions), discard_last, a one-token push and a reset."""
    generator = torch.Generator().manual_seed(3)
    ctx_len = session.ctx_len
    session.push(prompt)
    tokens = [session.next_token(settings, generator) for _ in range(2 * ctx_len + 3)]
    session.discard_last()
    session.push(random_ids(1, seed=5))
    tokens += [session.next_token(settings, generator) for _ in range(ctx_len + 2)]
    session.reset()
    session.push(prompt)
    return tokens + [session.next_token(settings, generator) for _ in range(3)]


@pytest.mark.parametrize("ctx_len", [1, 8])
def test_the_compiled_decode_step_chooses_what_the_eager_path_chooses(tokenizer, ctx_len):
    """The decode-and-choose step that CUDA captures as one graph, compiled for real (on
    CPU here): greedy tokens with a repetition penalty equal the eager path's through every
    state change, a seed fixes the samples, and padded vocabulary ids never come out."""
    prompt = random_ids(5)[:ctx_len]

    def tokens(compiled: bool, settings: SamplingSettings) -> list[int]:
        model = favour_padded_ids(tiny_model(ctx_len=ctx_len), tokenizer.vocab_size)
        session = Session(model, tokenizer, compile_decode=compiled)
        tokens = conversation(session, settings, prompt)
        assert None not in session.decode_steps.values()  # compiled, not fallen back
        assert len(session.decode_steps) == compiled
        return tokens

    penalised_greedy = SamplingSettings(temperature=0, repetition_penalty=1.5)
    greedy = tokens(True, penalised_greedy)
    assert greedy == tokens(False, penalised_greedy)
    sampled = tokens(True, SamplingSettings())
    assert sampled == tokens(True, SamplingSettings())
    assert max(greedy + sampled) < tokenizer.vocab_size


def test_past_the_compilers_recompile_limit_decoding_goes_on_eagerly(tokenizer):
    """The compiler keeps a bounded number of versions of the decode step per process (one
    per set of sampling settings); a session asked for more decodes those eagerly."""
    prompt = random_ids(5)
    compiled = Session(tiny_model(), tokenizer, compile_decode=True)
    eager = Session(tiny_model(), tokenizer)
    with torch._dynamo.config.patch(recompile_limit=1):
        for penalty in (1.5, 1.3):
            settings = SamplingSettings(temperature=0, repetition_penalty=penalty)
            for session in (compiled, eager):
                session.reset()
            assert conversation(compiled, settings, prompt) == conversation(eager, settings, prompt)
    assert None in compiled.decode_steps.values()


@pytest.mark.skipif(not packed_float16_available(), reason="needs FBGEMM (x86 builds)")
def test_float16_on_cpu_means_float16_weights_with_float32_arithmetic(tokenizer):
    cpu = torch.device("cpu")
    assert select_inference_dtype("auto", cpu, compiled=False) == torch.float16
    # The compiler cannot trace FBGEMM's packed weights: compiled decoding stays float32.
    assert select_inference_dtype("auto", cpu, compiled=True) == torch.float32
    assert select_inference_dtype("float32", cpu, compiled=False) == torch.float32
    reference = tiny_model()
    ids = torch.tensor([random_ids(12)])
    with torch.no_grad():
        expected = reference(ids)
    packed = prepare_for_inference(tiny_model(), torch.float16)
    assert all(not isinstance(m, torch.nn.Linear) for m in packed.modules())
    with torch.no_grad():
        got = packed(ids)
    assert got.dtype == torch.float32
    # float16 weights: about three significant digits, not float32's seven.
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=0)
    assert not torch.equal(got, expected)
    session = Session(packed, tokenizer)  # the cached path agrees with the uncached one
    session.push(ids[0, :8].tolist())
    session.logits()
    session.push(ids[0, 8:].tolist())
    torch.testing.assert_close(session.logits(), got[0, -1], atol=TOLERANCE, rtol=0)


def test_without_fbgemm_auto_is_float32_and_float16_a_plain_cast(monkeypatch):
    monkeypatch.setattr("noodle.precision.packed_float16_available", lambda: False)
    assert select_inference_dtype("auto", torch.device("cpu"), compiled=False) == torch.float32
    model = prepare_for_inference(tiny_model(), torch.float16)
    assert model.head.weight.dtype == torch.float16
    assert isinstance(model.head, torch.nn.Linear)


@pytest.mark.skipif(not packed_float16_available(), reason="needs FBGEMM (x86 builds)")
def test_a_model_with_packed_weights_is_not_compiled(tokenizer):
    model = prepare_for_inference(tiny_model(), torch.float16)
    with pytest.raises(ValueError, match="cannot be compiled"):
        Session(model, tokenizer, compile_decode=True)

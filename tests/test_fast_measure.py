"""`llama3.fast.measure` reports what it actually measured (no timing asserted)."""

from conftest import make_config, make_model
from llama3.fast.measure import measure


def test_decode_tokens_is_what_was_generated_when_the_context_caps_it():
    model = make_model(make_config(max_seq_len=24)).eval()
    report = measure(model, prefill_tokens=8, new_tokens=100)
    assert report.decode_tokens == 24 - 16  # the 16-token prompt leaves room for 8
    assert measure(model, prefill_tokens=8, new_tokens=3).decode_tokens == 3

"""merges.py: the two merge loops agree (GPT-2's merges recovered from its ranks are checked in test_formats.py)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt2lab.tokenizer.merges import _bpe_heap, _bpe_scan

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@PROPERTY
@given(st.lists(st.sampled_from("ab "), min_size=1, max_size=300))
def test_heap_merge_equals_scanning_merge(gpt2, chars):
    ids = [gpt2._byte_ids[b] for b in "".join(chars).encode()]
    assert _bpe_heap(ids, gpt2._ranks, gpt2._merged) == _bpe_scan(ids, gpt2._ranks, gpt2._merged)

"""The KV cache passed and read under the installed transformers' name, for every family."""

import warnings

import pytest
import torch

from fededit_core.model.kv_cache import cache_kwargs, returned_cache
from tests.tiny import FAMILIES, tiny_model_and_tokenizer


@pytest.mark.parametrize("family", FAMILIES)
def test_a_prefix_cache_continues_the_sequence_as_the_whole_forward_does(family):
    model, _ = tiny_model_and_tokenizer(family)
    ids = torch.arange(3, 11)[None]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # a deprecated name would warn
        whole = model(input_ids=ids).logits[:, -3:]
        prefix = model(input_ids=ids[:, :5], use_cache=True)
        rest = model(input_ids=ids[:, 5:], **cache_kwargs(model, returned_cache(prefix)), use_cache=True)
    torch.testing.assert_close(rest.logits, whole, rtol=1e-4, atol=1e-5)


def test_the_older_name_is_used_where_the_forward_has_no_other():
    class Older(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            return input_ids

    class Output:
        past_key_values = "kv"

    assert cache_kwargs(Older(), "kv") == {"past_key_values": "kv"}
    assert returned_cache(Output()) == "kv"
